"""Drains one sink's outbox cursor: connect, send batches, settle each as accepted, rejected or retried.

Retry and reconnect live here (and in sessions), nowhere else: a sink only reports what happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.backoff import Backoff
from gateway.outbox import Item, Outbox
from gateway.sinks import Outcome, Sink, SinkUnavailable

log = logging.getLogger(__name__)


class SinkWorker:
    def __init__(
        self,
        outbox: Outbox,
        factory: Callable[[], Sink],
        name: str,
        batch_size: int = 1000,
        backoff: Backoff | None = None,
    ) -> None:
        self.outbox = outbox
        self.factory = factory
        self.name = name
        self.batch_size = batch_size
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.sink: Sink | None = None
        self.connected = False
        self.last_error = ""
        self.delivered = 0
        self.rejected = 0

    async def run(self) -> None:
        while True:
            try:
                async with self.factory() as sink:
                    self.sink, self.connected, self.last_error = sink, True, ""
                    self.backoff.reset()
                    await self._drain(sink)
            except SinkUnavailable as exc:
                self.last_error = str(exc)
                delay = self.backoff.next()
                log.warning("%s unavailable (%s); retrying in %.1f s", self.name, exc, delay)
                self.connected = False
                await asyncio.sleep(delay)
            finally:
                self.sink, self.connected = None, False

    async def _drain(self, sink: Sink) -> None:
        while True:
            items = await self.outbox.read(self.name, self.batch_size)
            if not items:
                await self.outbox.wait_new(self.name, max_wait_s=5.0)
                continue
            await self._settle(sink, items)

    async def _settle(self, sink: Sink, items: list[Item]) -> None:
        result = await sink.write([it.record for it in items])
        if result.outcome is Outcome.ACCEPTED:
            await self.outbox.ack(self.name, items[-1].id)
            self.delivered += len(items)
        elif result.outcome is Outcome.REJECTED:
            if len(items) > 1 and not result.rejected:
                # Find the poison instead of throwing a whole batch away with it.
                mid = len(items) // 2
                await self._settle(sink, items[:mid])
                await self._settle(sink, items[mid:])
                return
            bad = [items[i] for i in result.rejected] if result.rejected else items
            log.error("%s rejected %d record(s): %s", self.name, len(bad), result.reason)
            await self.outbox.reject(self.name, bad, result.reason)
            self.rejected += len(bad)
            await self.outbox.ack(self.name, items[-1].id)
        else:
            raise SinkUnavailable(result.reason)
