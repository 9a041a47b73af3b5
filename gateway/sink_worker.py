"""Drains one sink's outbox cursor: connect, send batches, settle each as accepted, rejected or retried.

Retry and reconnect live here (and in sessions), nowhere else: a sink only reports what happened.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from gateway.backoff import Backoff
from gateway.outbox import Item, Outbox, retryable
from gateway.sinks import LinkWatched, Outcome, Prerenderable, Sink, SinkUnavailable, WriteResult

log = logging.getLogger(__name__)
NICE = 10  # the backlog renderer's priority below the gateway's
# What a sink raises for a record it cannot shape (a missing field, a wrong type): that record's fault, not the link's.
RECORD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def _init_worker(parent: int) -> None:
    """In a worker process: leave when the gateway (pid `parent`, given, since it may be gone before this runs) is
    gone. A pool's workers outlive a SIGKILLed parent otherwise (each holds both ends of its own task queue, so it
    never reads an end of file)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class SinkWorker:
    def __init__(
        self,
        outbox: Outbox,
        factory: Callable[[], Sink],
        name: str,
        batch_size: int = 1000,
        backoff: Backoff | None = None,
        linger_s: float = 0.0,
        backlog_share: float = 1.0,
        offload: bool = False,
    ) -> None:
        # A backlog is read, decoded and rendered by a worker process (sinks that are Prerenderable: InfluxDB).
        self.offload = offload
        # The share of time a backlog may keep this sink busy while live data flows (MQTT: publishing is all on the
        # event loop, so an unpaced replay would leave live readings queueing behind it).
        self.backlog_share = backlog_share
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
        self.offloaded = 0  # of `delivered`: rendered by the worker process
        self.rejected = 0
        self._pool: ProcessPoolExecutor | None = None
        self._pool_ready: asyncio.Task[None] | None = None
        self._losses: collections.deque[float] = collections.deque(maxlen=32)  # monotonic times a link was lost

    def losses_within(self, seconds: float) -> int:
        """How often an established link was lost in the last `seconds`."""
        since = time.monotonic() - seconds
        return sum(1 for t in self._losses if t >= since)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._close_pool()

    async def _run(self) -> None:
        while True:
            if await self.outbox.head() - await self.outbox.cursor(self.name) > self.batch_size:
                self._prepare_pool()  # a backlog from the last run
            try:
                async with self.factory() as sink:
                    self.sink, self.connected, self.last_error = sink, True, ""
                    self.backoff.reset()
                    await self._drain_until_lost(sink)
            except SinkUnavailable as exc:
                if self.connected:
                    self._losses.append(time.monotonic())
                self.last_error = str(exc)
                delay = self.backoff.next()
                log.warning("%s unavailable (%s); retrying in %.1f s", self.name, exc, delay)
                self.connected = False
                self._prepare_pool()  # a backlog is building up: its renderer starts now, not when the sink is back
                await asyncio.sleep(delay)
            finally:
                self.sink, self.connected = None, False

    async def _drain_until_lost(self, sink: Sink) -> None:
        """Drain, and stop with SinkUnavailable as soon as a link-watched sink says its link is gone: a quiet
        gateway (no device talking) must notice a lost broker as fast as a busy one."""
        if not isinstance(sink, LinkWatched):
            await self._drain(sink)
            return
        draining = asyncio.create_task(self._drain(sink), name=f"{self.name}-drain")
        lost = asyncio.create_task(sink.wait_lost(), name=f"{self.name}-link")
        try:
            await asyncio.wait([draining, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (draining, lost):
                if not task.done():
                    task.cancel()
            await asyncio.gather(draining, lost, return_exceptions=True)
        if lost.done() and not lost.cancelled():
            error = lost.exception()
            raise SinkUnavailable(lost.result() if error is None else f"link watch failed: {error!r}")
        draining.result()  # its error (or a lost link's SinkUnavailable raised inside it)

    async def _drain(self, sink: Sink) -> None:
        """Normal mode: oldest first. With a backlog (after an outage), live first (see _drain_live_first)."""
        while True:
            cursor = await self.outbox.cursor(self.name)
            head = await self.outbox.head()
            if head - cursor > self.batch_size:
                log.info("%s: %d records owed; live data first, the backlog behind it", self.name, head - cursor)
                await self._drain_live_first(sink, head + 1)
                log.info("%s: backlog delivered", self.name)
                continue
            if self._pool is not None:
                self._close_pool()  # prepared for an outage that left less than a batch behind
            items = await self._lingered(lambda: self.outbox.read(self.name, self.batch_size))
            if not items:
                await self.outbox.wait_new(self.name, max_wait_s=5.0)
                continue
            await self._settle(sink, items)

    async def _lingered(self, read: Callable[[], Awaitable[list[Item]]]) -> list[Item]:
        """The next batch; with a linger, a short one waits until linger_s after the last write for more."""
        items = await read()
        wait = self._last_write + self.linger_s - time.monotonic()
        if items and len(items) < self.batch_size and wait > 0:
            await asyncio.sleep(wait)
            items = await read()
        if items:
            self._last_write = time.monotonic()
        return items

    async def _drain_live_first(self, sink: Sink, live_from: int) -> None:
        """Records from `live_from` on go out as they are committed, by a task of their own, while this one sends
        the backlog below `live_from` oldest first: a nurse sees the present at once while the past catches up, and
        a live record never waits for a backlog batch. The cursor only moves over the backlog; once the backlog is
        through, it jumps to what was sent live."""
        live_sent = live_from - 1  # the newest id sent live
        stop = asyncio.Event()

        async def live() -> None:
            nonlocal live_sent
            while not stop.is_set():
                items = await self._lingered(functools.partial(self.outbox.read_after, live_sent, self.batch_size))
                if items:
                    await self._settle(sink, items, advance=False)
                    live_sent = items[-1].id
                else:
                    await self.outbox.wait_new(self.name, max_wait_s=0.2)

        sending = asyncio.create_task(live(), name=f"{self.name}-live")
        pool = await self._ready_pool() if isinstance(sink, Prerenderable) else None
        try:
            while await self._send_backlog(sink, live_from, pool):
                if sending.done():
                    sending.result()  # the live side lost the sink: raise its error here
            stop.set()
            await sending  # lets its batch finish, so live_sent is exact
        finally:
            if not sending.done():
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        self._close_pool()  # the backlog is through (after an error it stays for the next attempt)
        await self.outbox.ack(self.name, live_sent)

    @property
    def renderer_running(self) -> bool:
        return self._pool is not None

    def _prepare_pool(self) -> None:
        """Start the backlog renderer (offload=True) ahead of the drain: its start-up, two interpreters on what may
        be a two-core room PC, then happens while there is an outage to wait out, not under the first live readings
        of the drain."""
        if not self.offload or self._pool is not None:
            return
        # spawn: a fork of a process with running threads may inherit a held lock; the child only imports the sink
        context = multiprocessing.get_context("spawn")
        pool = self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
        )

        def start() -> None:
            # The first submit starts the worker, multiprocessing's resource tracker and the pool's manager thread
            # from this thread. Niced first (on Linux that is this thread only, and what it starts inherits it): a
            # replay can wait, a live reading should not.
            with contextlib.suppress(OSError):
                os.nice(NICE)
            pool.submit(os.getpid).result()

        async def started() -> None:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-offload") as starter:
                await asyncio.get_running_loop().run_in_executor(starter, start)

        self._pool_ready = asyncio.create_task(started(), name=f"{self.name}-renderer")

    async def _ready_pool(self) -> ProcessPoolExecutor | None:
        """The started renderer, or None (offload off, or it could not start: the backlog is rendered here)."""
        self._prepare_pool()
        if self._pool_ready is None:
            return None
        try:
            await asyncio.shield(self._pool_ready)
        except Exception as exc:
            log.warning("%s: the backlog renderer did not start (%r); rendering here", self.name, exc)
            self._close_pool()
            return None
        return self._pool

    def _close_pool(self) -> None:
        if self._pool_ready is not None and not self._pool_ready.done():
            self._pool_ready.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._pool_ready = None, None

    async def _send_backlog(self, sink: Sink, live_from: int, pool: ProcessPoolExecutor | None) -> bool:
        """One backlog batch below `live_from`, oldest first; False when the backlog is through."""
        began = time.monotonic()
        cursor = await self.outbox.cursor(self.name)
        sent = None
        if pool is not None and isinstance(sink, Prerenderable):
            sent = await self._send_rendered(sink, pool, cursor, live_from)
        if sent is None:
            backlog = await self.outbox.read_range(cursor, live_from, self.batch_size)
            if backlog:
                await self._settle(sink, backlog)
            sent = bool(backlog)
        if sent and self.backlog_share < 1.0:
            busy = time.monotonic() - began
            await asyncio.sleep(busy * (1.0 - self.backlog_share) / self.backlog_share)
        return sent

    async def _send_rendered(
        self, sink: Prerenderable, pool: ProcessPoolExecutor, cursor: int, live_from: int
    ) -> bool | None:
        """The batch after `cursor`, read and rendered by the worker process; None: send it the usual way."""
        try:
            rendered = await self.outbox.map_range(pool, sink.render, cursor, live_from, self.batch_size)
        except Exception as exc:  # a dead worker, or a record it could not render
            log.warning("%s: rendering the backlog in a worker failed (%r); rendering here", self.name, exc)
            return None
        if rendered is None:
            return False
        last_id, count, body = rendered
        result = await sink.write_rendered(body)
        if result.outcome is Outcome.ACCEPTED:
            await self.outbox.ack(self.name, last_id)
            self.delivered += count
            self.offloaded += count
            return True
        if result.outcome is Outcome.REJECTED:
            return None  # find the poison record by record, in this process
        raise SinkUnavailable(result.reason)

    async def _settle(self, sink: Sink, items: list[Item], advance: bool = True) -> None:
        result = await self._write(sink, items)
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
            try:
                await self.outbox.reject(self.name, bad, result.reason, advance)
            except Exception as exc:  # a full disk: the poison waits, the cursor stays, retried later
                if not retryable(exc):
                    raise
                raise SinkUnavailable(f"outbox cannot record a rejection: {exc}") from exc
            self.rejected += len(bad)
            if advance:
                await self.outbox.ack(self.name, items[-1].id)
        else:
            raise SinkUnavailable(result.reason)

    async def _write(self, sink: Sink, items: list[Item]) -> WriteResult:
        """The sink's verdict on `items`. A record that cannot be read back from the outbox, or that the sink cannot
        even route or encode, is refused here, never raised: the batch is halved down to it (nothing of a refused
        batch was sent) and it goes to the rejected pile with the reason, so one damaged record cannot end the
        sink's task."""
        broken = next((it for it in items if it.error), None)
        if broken is not None:
            return WriteResult(Outcome.REJECTED, broken.error)
        try:
            return await sink.write([it.record for it in items])
        except RECORD_ERRORS as exc:
            return WriteResult(Outcome.REJECTED, f"{self.name} cannot encode the record: {exc!r}"[:500])
