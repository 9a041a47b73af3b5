"""Drains one sink's outbox cursor: connect, send batches, settle each as accepted, rejected or retried.

Retry and reconnect live here (and in sessions), nowhere else: a sink only reports what happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
        linger_s: float = 0.0,
    ) -> None:
        self.linger_s = linger_s  # InfluxDB: gather up to this long for a fuller batch (MQTT: 0, live first)
        self._last_write = 0.0
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
        """Normal mode: oldest first. With a backlog (after an outage), live first: records that arrive from now
        on are sent as they come, and the backlog drains behind them one batch per round, so a nurse sees the
        present while the past catches up. The cursor only moves over the backlog; once it reaches the live
        range it jumps to what was sent live."""
        live_from: int | None = None  # records with id >= live_from go out live, ahead of the backlog
        live_sent = 0  # the newest id sent live
        while True:
            cursor = await self.outbox.cursor(self.name)
            if live_from is None:
                head = await self.outbox.head()
                if head - cursor > self.batch_size:
                    live_from, live_sent = head + 1, head
                    log.info("%s: %d records owed; live data first, the backlog behind it", self.name, head - cursor)
            if live_from is None:
                items = await self.outbox.read(self.name, self.batch_size)
                if not items:
                    await self.outbox.wait_new(self.name, max_wait_s=5.0)
                    continue
                wait = self._last_write + self.linger_s - time.monotonic()
                if len(items) < self.batch_size and wait > 0:
                    await asyncio.sleep(wait)
                    items = await self.outbox.read(self.name, self.batch_size)
                self._last_write = time.monotonic()
                await self._settle(sink, items)
                continue
            live = await self.outbox.read_range(live_sent, None, self.batch_size)
            if live:
                await self._settle(sink, live, advance=False)
                live_sent = live[-1].id
            backlog = await self.outbox.read_range(cursor, live_from, self.batch_size)
            if backlog:
                await self._settle(sink, backlog)
            else:
                await self.outbox.ack(self.name, live_sent)
                live_from = None
                log.info("%s: backlog delivered", self.name)
            if not live and not backlog:
                await self.outbox.wait_new(self.name, max_wait_s=1.0)

    async def _settle(self, sink: Sink, items: list[Item], advance: bool = True) -> None:
        result = await sink.write([it.record for it in items])
        if result.outcome is Outcome.ACCEPTED:
            if advance:
                await self.outbox.ack(self.name, items[-1].id)
            self.delivered += len(items)
        elif result.outcome is Outcome.REJECTED:
            if len(items) > 1 and not result.rejected:
                # Find the poison instead of throwing a whole batch away with it.
                mid = len(items) // 2
                await self._settle(sink, items[:mid], advance)
                await self._settle(sink, items[mid:], advance)
                return
            bad = [items[i] for i in result.rejected] if result.rejected else items
            log.error("%s rejected %d record(s): %s", self.name, len(bad), result.reason)
            await self.outbox.reject(self.name, bad, result.reason, advance)
            self.rejected += len(bad)
            if advance:
                await self.outbox.ack(self.name, items[-1].id)
        else:
            raise SinkUnavailable(result.reason)
