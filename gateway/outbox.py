"""The durable outbox: every record is committed to SQLite (WAL) before any sink sees it.

Why: brokers, databases and cables fail; a reading that only lived in memory is lost with the process. Each
sink drains its own cursor, so a dead InfluxDB does not hold back MQTT and vice versa.

Group commit: `put()` only queues; one writer commits everything queued in a single transaction. Every commit costs an
fdatasync whatever it holds (some 0.2 ms of CPU, half of it in the kernel, on a virtual disk; and sometimes a long
wait), so commits are paced: one starts once the previous one has finished and either `commit_interval_s` has passed
since the previous one started or COMMIT_BATCH records are waiting. A quiet line commits each record at once; 100-200
devices a second wait up to the interval (a few records a commit); a site gateway's 1,000 a second fill a batch within
a few milliseconds, so its latency stays well under the interval.
`committed` futures tell callers when it is durable.
All SQLite writes run on one dedicated thread (`WriterThread`: a job queue in, call_soon_threadsafe out, one hop
each way per commit) and backlog reads on another (each with its own connection), so the event loop never waits on
the disk and a live commit never waits behind a large read.

What each sink still owes is kept in memory, exact, without a query: the head id minus the sink's cursor, minus the
ids in between that are no longer there (readings dropped to keep within bounds, tracked as `holes`). The health
endpoint and the alarm loop ask often; a count(*) over a 300k-record backlog takes ~100 ms on a thread the live path
needs.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import itertools
import json
import logging
import queue
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway import storage
from gateway.envelope import ReadingMessage, Record, WaveformMessage, decode, encode, record_type
from gateway.errors import GatewayError

log = logging.getLogger(__name__)
T = TypeVar("T")
RECENT = 2048  # committed records kept in memory for sinks that keep up: 2 s at 1,000 a second (InfluxDB lingers
# 1 s for fuller writes), about 3 MiB; a sink further behind reads them back on the reader thread
PRUNE_CHUNK = 2000  # settled records deleted per transaction (a whole backlog at once would stall live commits)
CURSOR_SAVE_S = 1.0  # the longest an acknowledged cursor waits in memory for a commit to carry it to disk
CHECKPOINT_PAGES = 1000  # SQLite's own default cadence: the WAL grows as before, its copy no longer in a commit
WAL_SELF_CHECKPOINT = 10_000  # pages (40 MB at 4 KiB) of WAL past which the writer checkpoints itself (see open)
NUDGE_S = CURSOR_SAVE_S  # every sink's wait_new returns at least this often, commit or not; cursors are saved then
# Disk full (or an I/O error) is a state, not a crash: records wait in memory, at most this many (about 1 KB each,
# so some 100 MB; at 200 devices a reading a second, over 8 minutes), oldest readings dropped first beyond it.
MAX_UNSAVED = 100_000
STORAGE_RETRY_S = 1.0  # how often a failed commit is tried again
# The shortest time between the starts of two commits (config: outbox_commit_interval_ms). What comes within it waits
# for the next commit: at most this much latency bought for fewer fdatasyncs under load (docs/benchmarks.md).
COMMIT_INTERVAL_S = 0.050
COMMIT_BATCH = 8  # records waiting that start the next commit before the interval has passed
# SQLITE_FULL, SQLITE_IOERR (primary codes): space or the device may come back.
_RETRYABLE_SQLITE = frozenset({13, 10})

SCHEMA = storage.SCHEMA  # the tables, their version and migrations live in gateway/storage.py


class OutboxFull(GatewayError):
    """A record dropped from memory while storage was unusable and memory's bound was reached."""


def retryable(exc: BaseException) -> bool:
    """Whether a failed write may succeed later without anyone changing the gateway: a full disk or an I/O error."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _RETRYABLE_SQLITE
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT)


def storage_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class Item:
    """A committed record: its id, its JSON body as stored (what MQTT publishes as it is) and the record decoded
    from that body (gateway/envelope.py)."""

    id: int
    # None when the stored body is not a record (damaged on disk): `error` says why, and the sink worker puts the
    # item on the rejected pile with that reason instead of sending it.
    record: Record | None
    body: bytes
    error: str = ""

    def decoded(self) -> Record:
        """The record; for a damaged body a ValueError (a record's fault: the sink worker rejects it)."""
        if self.record is None:
            raise ValueError(self.error or f"record {self.id} has no decoded body")
        return self.record


class WriterThread:
    """The outbox's one writer: runs jobs in the order given, on one thread (one SQLite connection, so one at a
    time), and hands each outcome back to the event loop with call_soon_threadsafe. A commit a reading costs one hop
    each way; concurrent.futures' executor cost twice as much CPU per commit (its future, condition and wrapper)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on the writer thread; the future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._start()
        self._jobs.put((fn, args, (loop, fut)))
        return fut

    def call(
        self, fn: Callable[..., T], args: tuple[Any, ...], then: Callable[[T | None, BaseException | None], None]
    ) -> None:
        """`fn(*args)` on the writer thread; `then(result, error)` is called on the running loop when it is done
        (a callback: no future and no task step between a commit and what follows it)."""
        loop = asyncio.get_running_loop()
        self._start()
        self._jobs.put((fn, args, (loop, then)))

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """`fn(*args)` on the writer thread, in turn, nobody waiting for it: what it raises is logged there."""
        self._start()
        self._jobs.put((fn, args, None))

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, reply = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            if reply is None:
                if error is not None:
                    log.error("outbox writer: %s failed: %r", getattr(fn, "__qualname__", fn), error)
                continue
            loop, target = reply
            try:
                if isinstance(target, asyncio.Future):
                    loop.call_soon_threadsafe(_settle, target, result, error)
                else:
                    loop.call_soon_threadsafe(target, result, error)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                log.error("outbox writer: %s finished after the event loop closed", getattr(fn, "__qualname__", fn))

    def shutdown(self) -> None:
        """Run what is queued, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def _state_json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


Queued = tuple[str, int, Record, bytes]  # key, seq, record, its body: put, waiting for the next commit


def _select_range(db: sqlite3.Connection, after_id: int, before_id: int | None, limit: int) -> list[tuple[int, bytes]]:
    """Bodies as bytes: a body that is no longer UTF-8 would make SQLite's text decoding fail the whole read."""
    upper = before_id if before_id is not None else 2**62
    rows: list[tuple[int, bytes]] = db.execute(
        "SELECT id, CAST(body AS BLOB) FROM records WHERE id > ? AND id < ? ORDER BY id LIMIT ?",
        (after_id, upper, limit),
    ).fetchall()
    return rows


def _decode(record_id: int, body: bytes) -> Item:
    """The record of a stored body; a body that is not a record (not UTF-8, not JSON, an unknown type, a field
    missing or of the wrong type) becomes an Item with `error` set, never an exception."""
    try:
        return Item(record_id, decode(body), body)
    except ValueError as exc:  # msgspec's DecodeError and ValidationError are ValueErrors
        return Item(record_id, None, body, f"undecodable in the outbox: {type(exc).__name__}: {exc}"[:500])


_worker_dbs: dict[str, sqlite3.Connection] = {}  # map_rows' connections, one per outbox file in a worker process


def map_rows(
    path: str, fn: Callable[[list[Record]], T], after_id: int, before_id: int | None, limit: int
) -> tuple[int, int, T] | None:
    """The worker-process read (the sink worker's RenderedBacklog): read and decode a range and apply `fn` to it in
    that process, so the gateway's interpreter (and its GIL) never holds the records. (last id, count, fn's result),
    or None when the range is empty."""
    db = _worker_dbs.get(path)
    if db is None:
        db = _worker_dbs[path] = sqlite3.connect(path, timeout=5.0)  # reads only: WAL lets it beside the writer
    rows = _select_range(db, after_id, before_id, limit)
    if not rows:
        return None
    items = [_decode(i, body) for i, body in rows]
    records = [it.record for it in items if it.record is not None]
    if len(records) < len(items):  # the caller sends this range the usual way: the bad record goes to the rejected pile
        bad = next(it for it in items if it.record is None)
        raise ValueError(f"record {bad.id}: {bad.error}")
    return rows[-1][0], len(rows), fn(records)


class Outbox:
    def __init__(self, path: Path, sinks: tuple[str, ...], commit_interval_s: float = COMMIT_INTERVAL_S) -> None:
        self.path = path
        self.sinks = sinks
        self.commit_interval_s = commit_interval_s
        self._commit_started = float("-inf")  # loop time the last commit was handed to the writer
        self._pacer: asyncio.TimerHandle | None = None  # the next commit's start, when it waits for the interval
        self._pool = WriterThread("outbox")  # every SQLite write, in order
        # Reading a backlog back (thousands of rows) runs on a connection and thread of its own, so a commit of
        # live records never queues behind it (WAL lets readers and the writer work at the same time).
        self._read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-read")
        self._db: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        self._pending: list[Queued] = []
        self._pending_done: list[asyncio.Future[None]] = []
        # name -> its JSON (or what makes it), written in the same transaction as the records
        self._pending_state: dict[str, str | Callable[[], dict[str, Any]]] = {}
        self._wake = asyncio.Event()
        self._new: dict[str, asyncio.Event] = {s: asyncio.Event() for s in sinks}
        self._seq: dict[str, int] = {}
        self._marks: storage.SequenceMarks | None = None  # reserved sequence numbers, beside the outbox
        self.storage: storage.OpenReport | None = None  # what opening found: damage, salvage, migration, modes
        # The latest committed records, shared by every sink: a sink that keeps up takes its next batch from
        # here instead of reading back from SQLite (three thread hops fewer on the live path).
        self._recent: collections.deque[Item] = collections.deque(maxlen=RECENT)
        self._cursors: dict[str, int] = {}
        self._dirty: dict[str, int] = {}  # acknowledged in memory, not yet written
        self._head = 0
        # Ids in (min cursor, head] that are not in the table (readings dropped over the bounds), sorted: what a
        # sink owes is head - cursor - holes above the cursor. Ids at or below every cursor are forgotten.
        self._holes = array("q")
        self._stored = 0  # rows in the records table, so the bounds check needs no count(*) either
        self.committed = 0
        self.dropped = 0  # undelivered readings deleted to keep within bounds
        # Why the last commit failed while storage is unusable (None: healthy), since when, and what waits in memory.
        self.storage_error: str | None = None
        self.storage_error_since: float | None = None
        self.unsaved_dropped = 0  # readings lost because memory's bound was reached while storage was unusable
        self._unsaved_new: list[Record] = []  # records to hand to live sinks before they are durable
        self.unsaved_ready = asyncio.Event()
        self._nudger: asyncio.TimerHandle | None = None
        self._listeners: dict[str, Callable[[list[Item]], None]] = {}  # sink -> its listen() callback
        self._kick_due = False  # a _kick is scheduled (at the end of this step of the loop)
        # The commit under way: its batch, futures, cursors, state, and a future of its fatal error (None: fine).
        self._inflight: (
            tuple[
                list[Queued],
                list[asyncio.Future[None]],
                dict[str, int],
                dict[str, str],
                asyncio.Future[BaseException | None],
            ]
            | None
        ) = None
        self._failure: BaseException | None = None  # a commit's fatal error, raised by run_committer
        self._cursors_saved = 0.0  # monotonic time cursors last went with a commit
        self._checkpointing = False  # a checkpoint is queued on the reader's thread
        self._wal_pages = 0  # about how many pages commits added to the WAL since the last checkpoint was queued
        self._checkpoint_warned = float("-inf")

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_sync)
        # Checkpoints off the commit path: the commit that crossed SQLite's default 1000 pages of WAL copied them into
        # the database and fsynced it before it returned (90 ms of a reading's latency, seen at 200 devices). At the
        # same cadence (about CHECKPOINT_PAGES written since the last), they are made PASSIVE on the reader's
        # connection and thread instead (`_checkpoint_sync`), which never holds up a writer; the writer still
        # checkpoints by itself past WAL_SELF_CHECKPOINT pages (a checkpointer that failed must not let the WAL grow
        # without bound).
        await self._run(lambda: self._conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_SELF_CHECKPOINT}"))
        self._rdb = await self._run_read(sqlite3.connect, self.path, 5.0, 0, None, False)
        self._seq = await self._run(lambda: dict(self._conn.execute("SELECT key, seq FROM sequences").fetchall()))
        if self.storage is not None:  # continued after their marks, even where the outbox could not take the write
            for key, seq in self.storage.sequences_from_marks.items():
                self._seq[key] = max(seq, self._seq.get(key, 0))
        # This run's sinks only: the cursor of a sink no longer configured (notify removed from the config) stays in
        # the file but is owed nothing, and holds back neither pruning nor a clean stop.
        marks = ",".join("?" * len(self.sinks))
        query = f"SELECT sink, last_id FROM cursors WHERE sink IN ({marks})"
        self._cursors = await self._run(lambda: dict(self._conn.execute(query, self.sinks).fetchall()))
        self._head, self._stored, holes = await self._run(self._tally_sync, min(self._cursors.values(), default=0))
        self._holes = array("q", holes)
        for sink in self.sinks:
            self._new[sink].set()  # a backlog from the last run may be waiting
        self._nudger = asyncio.get_running_loop().call_later(NUDGE_S, self._nudge)

    def _nudge(self) -> None:
        """Wake every sink once a NUDGE_S, and the committer when cursors wait to be written: one timer for all of
        them, not one per wait (a wait per reading)."""
        for event in self._new.values():
            event.set()
        if self._dirty:
            self._wake.set()
        self._nudger = asyncio.get_running_loop().call_later(NUDGE_S, self._nudge)

    def _count_wal_pages(self, batch: list[Queued], cursors: dict[str, int], state: dict[str, str]) -> None:
        """After a commit: about how many pages it added to the WAL (its records' pages, the sequences and the
        autoincrement page, the records' page it appended to, cursors, state); a checkpoint is due past
        CHECKPOINT_PAGES."""
        self._wal_pages += 3 + bool(cursors) + len(state) + sum(len(body) for _, _, _, body in batch) // 3500
        if self._wal_pages >= CHECKPOINT_PAGES and self._rdb is not None and not self._checkpointing:
            self._wal_pages = 0
            self._checkpointing = True
            self._read_pool.submit(self._checkpoint_sync)

    def _checkpoint_sync(self) -> None:
        """Copy what the WAL holds into the database, as far as no reader still needs it, beside the writer (PASSIVE:
        never waits for it, never makes it wait); the writer rewinds the WAL when it has all been copied."""
        try:
            self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the writer checkpoints by itself past WAL_SELF_CHECKPOINT pages
            now = time.monotonic()
            if now - self._checkpoint_warned > 60:
                self._checkpoint_warned = now
                log.warning("outbox checkpoint failed (%s): the writer will checkpoint by itself", exc)
        finally:
            self._checkpointing = False

    def _tally_sync(self, after_id: int) -> tuple[int, int, list[int]]:
        """At open, once: the last id ever given (sqlite_sequence: the newest rows may have been dropped), the
        number of rows, and the missing ids above `after_id` (one pass over what is owed)."""
        db = self._conn
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        (top,) = db.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()
        head = max(int(top), int(row[0]) if row is not None else 0)
        (stored,) = db.execute("SELECT count(*) FROM records").fetchone()
        holes: list[int] = []
        expected = after_id + 1
        for (record_id,) in db.execute("SELECT id FROM records WHERE id > ? ORDER BY id", (after_id,)):
            if record_id > expected:
                holes.extend(range(expected, record_id))
            expected = record_id + 1
        holes.extend(range(expected, head + 1))
        return head, int(stored), holes

    def _open_sync(self) -> None:
        """Permissions, quick_check, schema version, salvage of a damaged file, sequence marks: gateway/storage.py.
        A disk or permission error is raised as it is (not damage: moving the file aside would strand its backlog)."""
        self._db, self._marks, self.storage = storage.open_outbox(self.path, self.sinks)

    async def close(self) -> None:
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None
        if self._nudger is not None:
            self._nudger.cancel()
            self._nudger = None
        await self.flush()
        if self._pending:
            log.error(
                "outbox closed with %d records not saved (%s): they are lost with this process",
                len(self._pending),
                self.storage_error,
            )
        if self._rdb is not None:
            await self._run_read(self._rdb.close)
            self._rdb = None
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._read_pool.shutdown(wait=True)
        self._pool.shutdown()

    @property
    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "outbox is not open"
        return self._db

    @property
    def _reader(self) -> sqlite3.Connection:
        assert self._rdb is not None, "outbox is not open"
        return self._rdb

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._pool.run(fn, *args)

    async def _run_read(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, *args)

    # -- writing ---------------------------------------------------------------------------------------------

    def next_seq(self, key: str) -> int:
        """Sequence numbers continue across restarts, so ids stay unique and readings can be counted."""
        seq = self._seq.get(key, 0) + 1
        self._seq[key] = seq
        # A new reservation, written on the writer thread ahead of the commit that carries this number; and whether
        # numbers go out before their commit (storage unusable: records reach live sinks undurable).
        if self._marks is not None and self._marks.due(key, seq, self.storage_error is not None):
            self._pool.submit(self._marks.save)
        return seq

    def put_state(self, name: str, value: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """Keep `value` as the durable state `name`, committed in the same transaction as the records queued with
        it: after a crash the state and the records it explains agree (the alarm engine's active alarms). A callable
        is called once, when the commit starts, however often it was put since the last: a snapshot of 1,000 alarms
        raised one by one (a device server gone) is taken once a commit, not once an alarm."""
        self._pending_state[name] = value if callable(value) else _state_json(value)
        if self.storage_error is None:
            self._want_commit()

    async def load_state(self, name: str) -> dict[str, Any] | None:
        query = "SELECT CAST(body AS BLOB) FROM state WHERE name = ?"
        row = await self._run(lambda: self._conn.execute(query, (name,)).fetchone())
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError as exc:  # damaged on disk: start without it rather than not at all
            log.error("outbox state %r is undecodable (%s): starting without it", name, exc)
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, seq: int, record: Record) -> asyncio.Future[None]:
        """Queue a record for the next group commit; the future resolves once it is durable. Its JSON is encoded
        here, once: the commit stores those bytes and MQTT publishes them."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((key, seq, record, encode(record)))
        self._pending_done.append(fut)
        if self.storage_error is not None:
            self._unsaved_new.append(record)
            self.unsaved_ready.set()
            self._bound_unsaved()
        else:
            self._want_commit()
        return fut

    def _want_commit(self) -> None:
        """Something was queued: a commit at the end of this step of the loop (with what else it puts), unless one
        is under way (its end starts the next) or already timed by the pacer and the batch is not full."""
        if self._kick_due or self._inflight is not None:
            return
        if self._pacer is not None and len(self._pending) < COMMIT_BATCH:
            return
        self._kick_due = True
        asyncio.get_running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        """Start the next group commit if none is under way (one under way starts the next when it ends): what one
        step of the loop put is one transaction (a device's status and reading, an alarm and the engine's state)."""
        self._kick_due = False
        if self._may_commit():
            self._start_paced()

    def _may_commit(self) -> bool:
        """Something is queued, no commit is under way and storage is usable (else the committer retries)."""
        return self._inflight is None and self.storage_error is None and bool(self._pending or self._pending_state)

    def _start_paced(self) -> None:
        """Start the next commit now, or when commit_interval_s has passed since the last one started (sooner, at
        the end of a step of the loop that brought the records waiting to COMMIT_BATCH)."""
        loop = asyncio.get_running_loop()
        due = self._commit_started + self.commit_interval_s
        if loop.time() >= due or len(self._pending) >= COMMIT_BATCH:
            self._start_commit()
        elif self._pacer is None:
            self._pacer = loop.call_at(due, self._paced)

    def _paced(self) -> None:
        self._pacer = None
        if self._may_commit():
            self._start_commit()

    @property
    def unsaved(self) -> int:
        """Records waiting in memory for a commit (while storage is unusable: not yet durable)."""
        return len(self._pending)

    def take_unsaved(self) -> list[Record]:
        """Records put since the last call while storage is unusable: for live sinks to send them before they are
        durable (the wall and the alarms keep working); they are sent again, durable, once committed."""
        taken, self._unsaved_new = self._unsaved_new, []
        self.unsaved_ready.clear()
        return taken

    def _bound_unsaved(self) -> None:
        over = len(self._pending) - MAX_UNSAVED
        if over <= 0:
            return
        keep: list[int] = []
        for i, (_, _, record, _) in enumerate(self._pending):
            if over > 0 and isinstance(record, ReadingMessage | WaveformMessage):
                over -= 1
                fut = self._pending_done[i]
                if not fut.done():
                    fut.set_exception(OutboxFull("dropped: storage unusable and memory's bound reached"))
                    fut.exception()
                self.unsaved_dropped += 1
            else:
                keep.append(i)
        self._pending = [self._pending[i] for i in keep]
        self._pending_done = [self._pending_done[i] for i in keep]
        if self.unsaved_dropped % 1000 == 1:
            log.error(
                "storage unusable and %d records in memory: %d oldest readings dropped so far",
                MAX_UNSAVED,
                self.unsaved_dropped,
            )

    async def run_committer(self) -> None:
        """The commits' supervisor, until cancelled (then flush). Records are committed by `_kick` and `_committed`
        as they come, one transaction at a time; this loop writes acknowledged cursors on a quiet line (woken by the
        nudge within CURSOR_SAVE_S: a transaction and an fsync each, so not once per acknowledgement), retries every
        STORAGE_RETRY_S while storage is unusable (records wait in memory), and raises a commit's fatal error."""
        try:
            while True:
                if self._failure is not None:
                    raise self._failure
                if self.storage_error is not None:
                    await asyncio.sleep(STORAGE_RETRY_S)
                else:
                    await self._wake.wait()
                self._wake.clear()
                if self._failure is not None:
                    raise self._failure
                await self.flush()
        finally:
            await asyncio.shield(self.flush())

    def _start_commit(self, cursors_now: bool = False) -> None:
        """Hand everything queued (records, state) to the writer thread as one transaction, with the acknowledged
        cursors when they last went to disk CURSOR_SAVE_S ago or more (or `cursors_now`): a sink that keeps up
        acknowledges every commit, and its cursor's page need not be written with every one."""
        try:  # first: a state that cannot be taken leaves everything queued
            state = {name: v if isinstance(v, str) else _state_json(v()) for name, v in self._pending_state.items()}
        except Exception as exc:  # a bug in a snapshot: the gateway stops (run_committer raises it), nothing is lost
            log.exception("outbox: the state to commit could not be taken; stopping")
            self._failure = exc
            self._wake.set()
            return
        self._pending_state = {}
        batch, self._pending = self._pending, []
        done, self._pending_done = self._pending_done, []
        cursors: dict[str, int] = {}
        now = time.monotonic()
        if self._dirty and (cursors_now or now - self._cursors_saved >= CURSOR_SAVE_S):
            cursors, self._dirty = self._dirty, {}
            self._cursors_saved = now
        loop = asyncio.get_running_loop()
        if self._pacer is not None:  # a flush does not wait for the interval
            self._pacer.cancel()
            self._pacer = None
        self._commit_started = loop.time()
        self._inflight = (batch, done, cursors, state, loop.create_future())
        self._pool.call(self._commit_sync, (batch, cursors, state), self._committed)

    async def flush(self) -> None:
        """Commit everything queued now (after the commit under way, if any) and return once it is durable; a
        commit's error that is not a full disk or an I/O error is raised here."""
        # The commit under way, then the one its end started with what was queued meanwhile (ours with it): after
        # those two, what was queued before this call is durable, however fast records keep coming.
        for _ in range(2):
            if self._inflight is None:
                break
            error = await asyncio.shield(self._inflight[4])
            if error is not None:
                raise error
        if self._inflight is not None:
            return
        if not self._pending and not self._pending_state:
            if self._dirty:
                cursors, self._dirty = self._dirty, {}
                try:
                    await self._run(self._cursors_sync, cursors)
                except Exception as exc:
                    if not retryable(exc):
                        raise
                    self._keep_unsaved([], [], cursors, {}, exc)
                    return
                if self.storage_error is not None:  # a write went through: storage is usable again
                    log.warning("outbox storage usable again (a cursor write went through)")
                    self.storage_error = self.storage_error_since = None
            return
        self._start_commit(cursors_now=True)
        if self._inflight is None:  # the state to commit could not be taken (logged): the gateway stops
            assert self._failure is not None
            raise self._failure
        failed = await asyncio.shield(self._inflight[4])
        if failed is not None:
            raise failed

    def _committed(self, last: int | None, exc: BaseException | None) -> None:
        """On the loop, when the writer thread has committed (or failed): what the commit makes true, then the next
        commit at once if more was queued meanwhile (group commit: the window is one commit)."""
        assert self._inflight is not None
        batch, done, cursors, state, ended = self._inflight
        self._inflight = None
        error: BaseException | None = None
        if exc is not None:
            if isinstance(exc, Exception) and retryable(exc):
                self._keep_unsaved(batch, done, cursors, state, exc)
            else:
                for fut in done:
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()  # raised to whoever flushes or supervises: not again as "never retrieved"
                error = exc
                self._failure = exc  # the committer raises it: the gateway stops (exit code by gateway.preflight)
                self._wake.set()
        else:
            assert last is not None
            self._after_commit(batch, done, last)
            self._count_wal_pages(batch, cursors, state)
        ended.set_result(error)
        if self._may_commit():
            self._start_paced()

    def _after_commit(self, batch: list[Queued], done: list[asyncio.Future[None]], last: int) -> None:
        if self.storage_error is not None:
            log.warning(
                "outbox storage usable again after %.0f s: %d records waiting in memory committed",
                time.time() - (self.storage_error_since or time.time()),
                len(batch),
            )
            self.storage_error = self.storage_error_since = None
            self._unsaved_new = []
            self.unsaved_ready.clear()
        self.committed += len(batch)
        self._stored += len(batch)
        first = last - len(batch) + 1
        items = [Item(first + i, record, body) for i, (_, _, record, body) in enumerate(batch)]
        self._recent.extend(items)
        self._head = last
        for fut in done:
            if not fut.done():
                fut.set_result(None)
        for event in self._new.values():
            event.set()
        if items:
            for listener in list(self._listeners.values()):
                listener(items)

    def _keep_unsaved(
        self,
        batch: list[Queued],
        done: list[asyncio.Future[None]],
        cursors: dict[str, int],
        state: dict[str, str],
        exc: Exception,
    ) -> None:
        """A commit failed for want of space (or an I/O error): put everything back in front of what came since,
        in order, to be committed when storage is back; meanwhile live sinks get the records undurable."""
        self._pending = batch + self._pending
        self._pending_done = done + self._pending_done
        self._pending_state = {**state, **self._pending_state}
        for sink, up_to in cursors.items():
            self._dirty[sink] = max(up_to, self._dirty.get(sink, 0))
        if self.storage_error is None:
            self.storage_error = storage_reason(exc)
            self.storage_error_since = time.time()
            log.error(
                "outbox %s cannot be written (%s): records wait in memory (up to %d) and go to MQTT undurable; "
                "free space in %s",
                self.path,
                self.storage_error,
                MAX_UNSAVED,
                self.path.parent,
            )
            self._unsaved_new = [record for _, _, record, _ in batch] + self._unsaved_new
            self.unsaved_ready.set()
        self._bound_unsaved()

    def _cursors_sync(self, cursors: dict[str, int]) -> None:
        self._save_cursors(self._conn, cursors)

    def _commit_sync(self, batch: list[Queued], cursors: dict[str, int], state: dict[str, str]) -> int:
        """One transaction; returns the last id (ids within it are consecutive: one writer, AUTOINCREMENT)."""
        db = self._conn
        now = time.time()
        with storage.transaction(db):
            if state:
                db.executemany(
                    "INSERT INTO state(name, body) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET body = excluded.body",
                    list(state.items()),
                )
            db.executemany(
                "INSERT INTO records(key, seq, type, body, created) VALUES (?, ?, ?, ?, ?)",
                [(k, s, record_type(r), body.decode(), now) for k, s, r, body in batch],  # TEXT, as ever
            )
            last: dict[str, int] = {}
            for k, s, _, _ in batch:
                last[k] = max(s, last.get(k, 0))
            db.executemany(
                "INSERT INTO sequences(key, seq) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET seq = max(seq, excluded.seq)",
                list(last.items()),
            )
            if cursors:
                self._save_cursors(db, cursors)
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
            last_id = row[0] if row is not None else 0
        return int(last_id)

    # -- draining --------------------------------------------------------------------------------------------

    async def wait_new(self, sink: str, max_wait_s: float) -> None:
        """Wait until a commit may have given `sink` something to do (or max_wait_s passes, or, when that is longer
        than NUDGE_S, the next nudge: every sink is woken once every NUDGE_S, see `_nudge`)."""
        event = self._new[sink]
        if event.is_set():
            pass  # a sink that keeps up: no wait at all
        elif max_wait_s >= NUDGE_S:  # nudged at least this often anyway: no timer armed and cancelled per wait
            await event.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max_wait_s):
                    await event.wait()
        event.clear()

    async def read(self, after_id: int, before_id: int | None = None, *, limit: int) -> list[Item]:
        """Up to `limit` records with after_id < id (< before_id), oldest first. What a sink owes starts after its
        `cursor`; a backlog ends before the first record sent live. From memory when they are recent (a sink that
        keeps up: no thread hop), else from SQLite on the reader thread, decoded there, not on the event loop."""
        recent = self._recent
        if recent and recent[0].id <= after_id + 1:
            # Ids in `recent` are consecutive. A sink that keeps up wants the last few: walk in from the right end
            # (islice from the left would step over up to RECENT items on every read).
            last = recent[-1].id if before_id is None else min(recent[-1].id, before_id - 1)
            count = min(limit, last - after_id)
            if count <= 0:
                return []
            first = after_id + 1 - recent[0].id  # the index of the first record wanted
            tail = len(recent) - first
            if tail <= 2 * count:
                wanted = list(itertools.islice(reversed(recent), tail))
                wanted.reverse()
                return wanted[:count]
            return list(itertools.islice(recent, first, first + count))
        items: list[Item] = await self._run_read(self._read_sync, after_id, before_id, limit)
        return items

    def _read_sync(self, after_id: int, before_id: int | None, limit: int) -> list[Item]:
        rows = _select_range(self._reader, after_id, before_id, limit)
        return [_decode(i, body) for i, body in rows]  # decoded here, not on the event loop

    def cursor(self, sink: str) -> int:
        """The last id `sink` has settled (its records after this are owed)."""
        return self._cursors[sink]

    def head(self) -> int:
        """The newest committed record's id (0 before the first)."""
        return self._head

    def listen(self, sink: str, listener: Callable[[list[Item]], None] | None) -> None:
        """Hand `sink`'s listener each commit's records as soon as they are durable, from the commit's own step on
        the loop (a sink that keeps up sends them at once: no task to wake); None stops it. The listener must not
        raise: whatever it cannot do, it hands back to its own task."""
        if listener is None:
            self._listeners.pop(sink, None)
        else:
            self._listeners[sink] = listener

    def listening(self, sink: str) -> bool:
        """Whether `sink` takes commits from its listener now (it has caught up)."""
        return sink in self._listeners

    async def ack(self, sink: str, up_to_id: int) -> None:
        """Settle up to `up_to_id` (settle(), for the callers that await)."""
        self.settle(sink, up_to_id)

    def settle(self, sink: str, up_to_id: int) -> None:
        """Settle up to `up_to_id`. Written to disk within CURSOR_SAVE_S (with a commit, or on its own on a quiet
        line; at once by flush, prune and close), not per acknowledgement: a crash in between only sends those
        records again, which at-least-once delivery allows."""
        if up_to_id > self._cursors[sink]:
            self._cursors[sink] = up_to_id
            self._dirty[sink] = up_to_id

    def _save_cursors(self, db: sqlite3.Connection, cursors: dict[str, int]) -> None:
        db.executemany(
            "UPDATE cursors SET last_id = max(last_id, ?) WHERE sink = ?", [(v, k) for k, v in cursors.items()]
        )

    async def reject(self, sink: str, items: list[Item], reason: str, advance: bool = True) -> None:
        """Poison: keep it aside with the reason and move on, so one bad record cannot block a sink forever.
        `advance=False` when the records were sent ahead of the backlog (the cursor must not jump the gap)."""
        await self._run(self._reject_sync, sink, items, reason, advance)
        if advance:  # only once the pile holds them: a write that failed (disk full) leaves the cursor before them
            self._cursors[sink] = max(self._cursors[sink], *(it.id for it in items))

    def _reject_sync(self, sink: str, items: list[Item], reason: str, advance: bool) -> None:
        db = self._conn
        now = time.time()
        with storage.transaction(db):  # rolled back on an error: the connection is not left mid-transaction
            db.executemany(
                "INSERT INTO rejected(sink, record_id, reason, at, body) VALUES (?, ?, ?, ?, ?)",
                [(sink, it.id, reason, now, it.body.decode("utf-8", "backslashreplace")) for it in items],
            )
            if advance:
                last = max(it.id for it in items)
                db.execute("UPDATE cursors SET last_id = max(last_id, ?) WHERE sink = ?", (last, sink))

    def owed(self) -> dict[str, int]:
        """Records each sink still owes, from memory (exact: see the module's docstring)."""
        holes, head = self._holes, self._head
        return {
            sink: max(0, head - last - (len(holes) - bisect.bisect_right(holes, last)))
            for sink, last in self._cursors.items()
        }

    async def backlog(self) -> dict[str, int]:
        """Records each sink still owes (owed(); a coroutine for the callers that await it)."""
        return self.owed()

    async def count_owed(self) -> dict[str, int]:
        """The same figures by count(*) on the reader thread: for tests and diagnosis, never per request."""
        owed: dict[str, int] = await self._run_read(self._count_owed_sync, dict(self._cursors))
        return owed

    def _count_owed_sync(self, cursors: dict[str, int]) -> dict[str, int]:
        query = "SELECT count(*) FROM records WHERE id > ?"
        return {sink: int(self._reader.execute(query, (last,)).fetchone()[0]) for sink, last in cursors.items()}

    async def rejected_count(self) -> int:
        row = await self._run_read(lambda: self._reader.execute("SELECT count(*) FROM rejected").fetchone())
        return int(row[0])

    async def prune(self, max_records: int | None = None, max_age_s: float | None = None) -> int:
        """Delete records every sink has settled; the outbox holds only what is still owed.

        Past `max_records` or `max_age_s` (a long outage on a small disk), the oldest readings and waveforms go
        first, counted in `dropped`: statuses, alarms and sessions are kept, they are few and they matter most.
        Returns how many records were deleted in all.
        """
        await self.flush()  # cursors first: prune deletes what every sink has settled on disk
        if self.storage_error is not None:
            return 0  # nothing can be written; deleting needs the journal too
        try:
            return await self._prune(max_records, max_age_s)
        except Exception as exc:
            if not retryable(exc):
                raise
            log.warning("outbox prune skipped: %s", storage_reason(exc))
            return 0

    async def _prune(self, max_records: int | None, max_age_s: float | None) -> int:
        settled = 0
        while True:  # in chunks, each its own transaction, so live commits slip in between
            deleted: int = await self._run(self._prune_settled_sync, PRUNE_CHUNK)
            settled += deleted
            self._stored -= deleted
            if deleted < PRUNE_CHUNK:
                break
        over = self._stored - max_records if max_records is not None else 0
        ids: list[int] = await self._run(self._prune_bounds_sync, over, max_age_s)
        if ids:
            self._stored -= len(ids)
            self.dropped += len(ids)
            if ids[0] > (self._holes[-1] if self._holes else 0):
                self._holes.extend(ids)  # the usual case: the oldest remaining readings, above earlier holes
            else:
                self._holes = array("q", sorted(itertools.chain(self._holes, ids)))
            # Memory keeps only records still on disk: read() from there must not hand out a dropped one (what is
            # left below the last dropped id, statuses among them, is read back from SQLite instead).
            while self._recent and self._recent[0].id <= ids[-1]:
                self._recent.popleft()
            log.error("outbox over its bounds: dropped the %d oldest undelivered readings", len(ids))
        settled_everywhere = min(self._cursors.values(), default=0)
        del self._holes[: bisect.bisect_right(self._holes, settled_everywhere)]
        return settled + len(ids)

    def _prune_settled_sync(self, limit: int) -> int:
        marks = ",".join("?" * len(self.sinks))
        return int(
            self._conn.execute(
                "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE id <= "
                f"(SELECT min(last_id) FROM cursors WHERE sink IN ({marks})) ORDER BY id LIMIT ?)",
                (*self.sinks, limit),
            ).rowcount
        )

    def _prune_bounds_sync(self, over: int, max_age_s: float | None) -> list[int]:
        """Drop readings and waveforms older than max_age_s, then the oldest `over` more (minus those): the ids
        dropped, ascending, in one transaction."""
        db = self._conn
        dropped: list[int] = []
        kinds = "type IN ('reading', 'waveform')"
        with storage.transaction(db):
            if max_age_s is not None:
                cutoff = time.time() - max_age_s
                oldest = db.execute("SELECT created FROM records ORDER BY id LIMIT 1").fetchone()
                # Rows are created in id order: when the oldest is young enough, so is every other, and the
                # table (no index on `created`) is not scanned every few seconds on the thread live commits use.
                if oldest is not None and oldest[0] < cutoff:
                    aged = f"{kinds} AND created < ?"
                    dropped += [i for (i,) in db.execute(f"SELECT id FROM records WHERE {aged}", (cutoff,))]
                    db.execute(f"DELETE FROM records WHERE {aged}", (cutoff,))
            if over - len(dropped) > 0:
                oldest_first = f"SELECT id FROM records WHERE {kinds} ORDER BY id LIMIT ?"
                more = [i for (i,) in db.execute(oldest_first, (over - len(dropped),))]
                db.execute(f"DELETE FROM records WHERE id IN ({oldest_first})", (len(more),))
                dropped += more
        dropped.sort()
        return dropped
