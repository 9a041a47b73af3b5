"""The sink worker: one sink's delivery from the outbox, and the only place that retries or reconnects a sink.

One loop: connect, then read -> write -> settle, batch after batch. Settling is the same for every batch, however it
was read: accepted (the cursor moves past it), rejected (the batch is halved down to the poison record, which goes to
the rejected pile with the sink's reason; the cursor moves on), or retry (SinkUnavailable: back off, reconnect, read
the same records again). The cursor never passes a record that was neither accepted nor put on the rejected pile.

A sink that owes more than a batch (after an outage, or a backlog found at start) drains it by two named strategies:
- LiveFirst: records committed from now on go out as they come while the backlog drains behind them (every sink);
- RenderedBacklog: the backlog's batches are read and rendered by a niced worker process (Prerenderable sinks).

A Pushed sink (MQTT) that has caught up is handed each commit's records by the outbox's listener, in the commit's own
step on the loop, and its cursor moves in the acknowledgement's callback (`_push_live`): a reading costs no task
wake-up, read or settle of its own. Whatever that path cannot do (a record it cannot route, a lost link) goes back to
the loop above, which reads again from the cursor: the cursor only moves past what the sink acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gateway.backoff import Backoff
from gateway.outbox import Item, Outbox, map_rows, retryable
from gateway.sinks import LinkWatched, Outcome, Prerenderable, Sink, SinkUnavailable, WriteResult

log = logging.getLogger(__name__)
NICE = 10  # the backlog renderer's priority below the gateway's
PUSH_SETTLE_S = 15.0  # the longest a handed-back push waits for the batches in flight (their PUBACK timeout is 10 s)
# What a sink raises for a record it cannot shape (a missing field, a wrong type): that record's fault, not the link's.
RECORD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


@runtime_checkable
class Pushed(Protocol):
    """A sink that can take committed records from a callback: `push` sends them before it returns and calls
    `finished(None)` once the target has them all, or `finished(error)`; it raises for a record it cannot shape
    (RECORD_ERRORS) or SinkUnavailable, and then never calls `finished`."""

    def push(self, batch: Sequence[Item], finished: Callable[[BaseException | None], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class Batch:
    """The records after `after_id` up to `last_id` that one write carries: read in this process (`items`), or read
    and rendered by the renderer process (`rendered`, the body ready to send: these records never enter this
    interpreter)."""

    after_id: int
    last_id: int
    count: int
    items: list[Item] | None = None
    rendered: Any = None

    @classmethod
    def of(cls, after_id: int, items: list[Item]) -> Batch:
        return cls(after_id, items[-1].id, len(items), items)


class SinkWorker:
    """One sink's cursor, drained by `run()`: next_batch (read) -> deliver (write, then _settle). `live_first` says
    how a backlog shares the sink with live records; `renderer` (Prerenderable sinks) where its batches are read."""

    def __init__(
        self,
        outbox: Outbox,
        factory: Callable[[], Sink],
        name: str,
        batch_size: int = 1000,
        backoff: Backoff | None = None,
        linger_s: float = 0.0,
        live_first: LiveFirst | None = None,
        renderer: RenderedBacklog | None = None,
    ) -> None:
        self.outbox = outbox
        self.factory = factory
        self.name = name
        self.batch_size = batch_size
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.linger_s = linger_s  # InfluxDB: gather up to this long for a fuller batch (MQTT: 0, live first)
        self.live_first = live_first or LiveFirst()
        self.renderer = renderer  # None: a backlog is read and sent in this process
        self.sink: Sink | None = None
        self.connected = False
        self.last_error = ""
        self.delivered = 0
        self.offloaded = 0  # of `delivered`: rendered by the renderer process
        self.rejected = 0
        self._last_write = 0.0
        self._losses: collections.deque[float] = collections.deque(maxlen=32)  # monotonic times a link was lost

    def losses_within(self, seconds: float) -> int:
        """How often an established link was lost in the last `seconds` (the health check's flapping test)."""
        since = time.monotonic() - seconds
        return sum(1 for t in self._losses if t >= since)

    async def run(self) -> None:
        """Until cancelled: connect, drain until the link is lost, back off, connect again."""
        try:
            while True:
                if self.outbox.head() - self.outbox.cursor(self.name) > self.batch_size:
                    self._start_renderer()  # a backlog from the last run
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
                    self._start_renderer()  # a backlog is building up: its renderer starts now, not when it drains
                    await asyncio.sleep(delay)
                finally:
                    self.sink, self.connected = None, False
        finally:
            if self.renderer is not None:
                self.renderer.stop()

    def _start_renderer(self) -> None:
        if self.renderer is not None:
            self.renderer.start(self.name)

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
        """The loop: oldest first, one batch at a time; more than a batch owed goes to the LiveFirst strategy."""
        while True:
            cursor, head = self.outbox.cursor(self.name), self.outbox.head()
            if head - cursor > self.batch_size:
                log.info("%s: %d records owed; live data first, the backlog behind it", self.name, head - cursor)
                self._start_renderer()
                await self.live_first.drain(self, sink, head + 1)
                log.info("%s: backlog delivered", self.name)
                continue
            if self.renderer is not None:
                self.renderer.stop()  # the backlog is through (or an outage left less than a batch behind)
            batch = await self.next_batch(cursor, linger=True)
            if batch is None:
                if isinstance(sink, Pushed) and not self.linger_s and self.outbox.cursor(self.name) == head:
                    await self._push_live(sink)  # caught up: records go out from the commit's step
                    continue
                await self.outbox.wait_new(self.name, max_wait_s=5.0)
                continue
            await self.deliver(sink, batch)

    async def _push_live(self, sink: Pushed) -> None:
        """While caught up: each commit's records are pushed to the sink by the outbox's listener, and the cursor
        moves, in order, as batches are acknowledged. Returns to the read loop (after what is in flight has ended) for
        a record the sink cannot shape or one that was damaged (the loop rejects it the usual way); raises
        SinkUnavailable when the link fails. The cursor never passes a batch that was not acknowledged."""
        loop = asyncio.get_running_loop()
        handback: asyncio.Future[None] = loop.create_future()
        inflight: collections.deque[list[Any]] = collections.deque()  # [last id, count, acknowledged]
        drained: list[asyncio.Future[None]] = []
        expected = [self.outbox.head() + 1]  # the id the next commit must start with: nothing skipped

        def finished(entry: list[Any], error: BaseException | None) -> None:
            if error is not None:
                lost = error if isinstance(error, SinkUnavailable) else SinkUnavailable(str(error))
                for fut in (handback, *drained):
                    if not fut.done():
                        fut.set_exception(lost)
                return
            entry[2] = True
            while inflight and inflight[0][2]:
                last_id, count, _ = inflight.popleft()
                self.outbox.settle(self.name, last_id)
                self.delivered += count
            if not inflight and drained and not drained[0].done():
                drained[0].set_result(None)

        def committed(items: list[Item]) -> None:
            if handback.done() or not items:
                return
            if items[0].id != expected[0]:  # not the next records (never expected): the read loop reads from the cursor
                handback.set_result(None)
                return
            expected[0] = items[-1].id + 1
            if any(it.error for it in items):
                handback.set_result(None)  # the read loop puts it on the rejected pile
                return
            entry: list[Any] = [items[-1].id, len(items), False]
            try:
                sink.push(items, lambda error: finished(entry, error))
            except RECORD_ERRORS:
                handback.set_result(None)  # the read loop finds the record and rejects it with the reason
                return
            except BaseException as exc:  # SinkUnavailable, or a bug: raised in this worker's task, not lost here
                handback.set_exception(exc)
                return
            inflight.append(entry)

        self.outbox.listen(self.name, committed)
        try:
            await handback
            if inflight:  # sent before the record handed back: let them settle, so none is sent twice
                drained.append(loop.create_future())
                try:
                    async with asyncio.timeout(PUSH_SETTLE_S):
                        await drained[0]
                except TimeoutError:
                    late = f"{len(inflight)} pushed batch(es) not settled in {PUSH_SETTLE_S:g} s"
                    raise SinkUnavailable(late) from None
        finally:
            self.outbox.listen(self.name, None)

    async def next_batch(self, after_id: int, before_id: int | None = None, *, linger: bool = False) -> Batch | None:
        """Read: the next batch after `after_id` (below `before_id`), None when there is none. With `linger`, a
        short batch waits until linger_s after the last write for more (InfluxDB: fewer, fuller writes)."""
        items = await self.outbox.read(after_id, before_id, limit=self.batch_size)
        if linger:
            wait = self._last_write + self.linger_s - time.monotonic()
            if items and len(items) < self.batch_size and wait > 0:
                await asyncio.sleep(wait)
                items = await self.outbox.read(after_id, before_id, limit=self.batch_size)
            if items:
                self._last_write = time.monotonic()
        return Batch.of(after_id, items) if items else None

    async def next_backlog_batch(self, sink: Sink, before_id: int) -> Batch | None:
        """Read the backlog's next batch (after the cursor, below `before_id`): rendered by the renderer process when
        this sink has one, else (or when it cannot) read here."""
        after_id = self.outbox.cursor(self.name)
        if self.renderer is not None and isinstance(sink, Prerenderable):
            batch = await self.renderer.render(self.outbox.path, sink, after_id, before_id, self.batch_size)
            if batch is not None:
                return batch
        return await self.next_batch(after_id, before_id)

    async def deliver(self, sink: Sink, batch: Batch, *, advance: bool = True) -> None:
        """Write, then settle. `advance=False` for records sent ahead of a backlog: the cursor must not pass it."""
        result = await self._write(sink, batch)
        await self._settle(sink, batch, result, advance)

    async def _write(self, sink: Sink, batch: Batch) -> WriteResult:
        """The sink's verdict on `batch`. A record that cannot be read back from the outbox, or that the sink cannot
        even route or encode, is refused here, never raised: the batch is halved down to it (nothing of a refused
        batch was sent) and it goes to the rejected pile with the reason, so one damaged record cannot end the
        sink's task."""
        if batch.items is None:
            assert isinstance(sink, Prerenderable), "a rendered batch for a sink that does not render"
            return await sink.write_rendered(batch.rendered)
        broken = next((it for it in batch.items if it.error), None)
        if broken is not None:
            return WriteResult(Outcome.REJECTED, broken.error)
        try:
            return await sink.write(batch.items)
        except RECORD_ERRORS as exc:
            return WriteResult(Outcome.REJECTED, f"{self.name} cannot encode the record: {exc!r}"[:500])

    async def _settle(self, sink: Sink, batch: Batch, result: WriteResult, advance: bool) -> None:
        """The one settle path, whichever way the batch was read."""
        if result.outcome is Outcome.ACCEPTED:
            if advance:
                await self.outbox.ack(self.name, batch.last_id)
            self.delivered += batch.count
            if batch.items is None:
                self.offloaded += batch.count
            return
        if result.outcome is not Outcome.REJECTED:
            raise SinkUnavailable(result.reason)
        items = batch.items
        if items is None:  # rendered elsewhere: read it here to find the poison record by record
            items = await self.outbox.read(batch.after_id, batch.last_id + 1, limit=batch.count)
            if items:
                await self.deliver(sink, Batch.of(batch.after_id, items), advance=advance)
            return
        if len(items) > 1 and not result.rejected:
            # Find the poison instead of throwing a whole batch away with it.
            mid = len(items) // 2
            await self.deliver(sink, Batch.of(batch.after_id, items[:mid]), advance=advance)
            await self.deliver(sink, Batch.of(items[mid - 1].id, items[mid:]), advance=advance)
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
            await self.outbox.ack(self.name, batch.last_id)


@dataclass(frozen=True, slots=True)
class LiveFirst:
    """Applies when a sink owes more than a batch (after an outage, or at start): records committed from then on
    go out as they come, by a task of their own, while the backlog below them drains oldest first. A nurse sees the
    present at once while the past catches up, and a live record never waits for a backlog batch. The cursor only
    moves over the backlog; once the backlog is through, it jumps to what was sent live.

    `backlog_share`: the share of time the backlog may keep the sink busy while live data flows (MQTT, 0.5:
    publishing is all on the event loop, so an unpaced replay would leave live readings queueing behind it)."""

    backlog_share: float = 1.0

    async def drain(self, worker: SinkWorker, sink: Sink, live_from: int) -> None:
        """Until the backlog below `live_from` is settled; a lost sink's error is raised here."""
        live_sent = live_from - 1  # the newest id sent live
        stop = asyncio.Event()

        async def live() -> None:
            nonlocal live_sent
            while not stop.is_set():
                batch = await worker.next_batch(live_sent, linger=True)
                if batch is None:
                    await worker.outbox.wait_new(worker.name, max_wait_s=0.2)
                    continue
                await worker.deliver(sink, batch, advance=False)
                live_sent = batch.last_id

        sending = asyncio.create_task(live(), name=f"{worker.name}-live")
        try:
            while await self._backlog_batch(worker, sink, live_from):
                if sending.done():
                    sending.result()  # the live side lost the sink: raise its error here
            stop.set()
            await sending  # lets its batch finish, so live_sent is exact
        finally:
            if not sending.done():
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        await worker.outbox.ack(worker.name, live_sent)

    async def _backlog_batch(self, worker: SinkWorker, sink: Sink, live_from: int) -> bool:
        """One backlog batch, then a pause that keeps it to backlog_share; False when the backlog is through."""
        began = time.monotonic()
        batch = await worker.next_backlog_batch(sink, live_from)
        if batch is None:
            return False
        await worker.deliver(sink, batch)
        if self.backlog_share < 1.0:
            busy = time.monotonic() - began
            await asyncio.sleep(busy * (1.0 - self.backlog_share) / self.backlog_share)
        return True


def _exit_with(parent: int) -> None:
    """In the renderer process: leave when the gateway (pid `parent`, given, since it may be gone before this runs)
    is gone. A pool's workers outlive a SIGKILLed parent otherwise (each holds both ends of its own task queue, so it
    never reads an end of file)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class RenderedBacklog:
    """Applies to a Prerenderable sink (InfluxDB) draining a backlog: each backlog batch is read from the outbox file,
    decoded and rendered into the request body by a spawned worker process at a lower priority (NICE), and only the
    finished body is sent from here. A backlog of thousands of records then never holds the gateway's interpreter,
    and live readings do not queue for its GIL. Started as soon as a backlog builds up (an outage begins, or one is
    found at start), so its start-up, a second interpreter on what may be a two-core room PC, is over before the
    drain; stopped once the backlog is through; it exits with a killed gateway. Where it cannot start or render, the
    batch is read and sent in the gateway's process; a batch the sink rejects is sent again from there, where the
    poison record can be found."""

    def __init__(self) -> None:
        self.name = "renderer"  # the sink's, from start(): in its logs, thread and task names
        self._pool: ProcessPoolExecutor | None = None
        self._started: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._pool is not None

    def start(self, name: str) -> None:
        """Start the process now, if it is not running (for the sink `name`)."""
        if self._pool is not None:
            return
        self.name = name
        # spawn: a fork of a process with running threads may inherit a held lock; the child only imports the sink
        context = multiprocessing.get_context("spawn")
        pool = self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
        )

        def start() -> None:
            # The first submit starts the worker, multiprocessing's resource tracker and the pool's manager thread
            # from this thread. Niced first (on Linux that is this thread only, and what it starts inherits it): a
            # replay can wait, a live reading should not.
            with contextlib.suppress(OSError):
                os.nice(NICE)
            pool.submit(os.getpid).result()

        async def started() -> None:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-offload") as starter:
                await asyncio.get_running_loop().run_in_executor(starter, start)

        self._started = asyncio.create_task(started(), name=f"{name}-renderer")

    async def ready(self) -> ProcessPoolExecutor | None:
        """The started process, or None (not started, or it could not start: the backlog is read in the gateway)."""
        if self._started is None:
            return None
        try:
            await asyncio.shield(self._started)
        except Exception as exc:
            log.warning("%s: the backlog renderer did not start (%r); rendering here", self.name, exc)
            self.stop()
            return None
        return self._pool

    async def render(self, path: Path, sink: Prerenderable, after_id: int, before_id: int, limit: int) -> Batch | None:
        """The batch after `after_id` (below `before_id`) read and rendered in the process; None: read it here."""
        pool = await self.ready()
        if pool is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            rendered = await loop.run_in_executor(pool, map_rows, str(path), sink.render, after_id, before_id, limit)
        except Exception as exc:  # a dead process, or a record it could not read back
            log.warning("%s: rendering the backlog in a worker failed (%r); rendering here", self.name, exc)
            return None
        if rendered is None:
            return None
        last_id, count, body = rendered
        return Batch(after_id, last_id, count, rendered=body)

    def stop(self) -> None:
        if self._started is not None and not self._started.done():
            self._started.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._started = None, None
