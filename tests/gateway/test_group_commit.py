"""Group commit without a task per commit: what one step of the loop puts (records and state) is one transaction,
started at the end of that step; what is put while a commit is under way goes in the next one, started as soon as it
ends; a fatal commit error stops the committer (so the gateway), a full disk does not."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.outbox import Outbox
from tests.helpers import record_for, wait_for


async def _opened(path: Path) -> Outbox:
    box = Outbox(path, sinks=("mqtt",))
    await box.open()
    return box


def _count_commits(box: Outbox, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[str]]]:
    """(records, state names) of every transaction the writer thread runs."""
    commits: list[tuple[int, list[str]]] = []
    real = box._commit_sync

    def counted(batch: list[Any], cursors: dict[str, int], state: dict[str, str]) -> int:
        commits.append((len(batch), sorted(state)))
        return real(batch, cursors, state)

    monkeypatch.setattr(box, "_commit_sync", counted)
    return commits


async def _durable(futures: list[asyncio.Future[None]], what: str) -> None:
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(*futures)
    except TimeoutError:
        raise AssertionError(f"{what}: not committed within 5 s (no flush, no committer task)") from None


async def test_one_step_of_puts_and_state_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = await _opened(tmp_path / "o.db")
    commits = _count_commits(box, monkeypatch)
    try:
        futures = [box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", i + 1)) for i in range(3)]
        box.put_state("alarms", {"v": 1})  # the alarm engine's state, with the records it explains
        await _durable(futures, "three records put in one step")
        assert commits == [(3, ["alarms"])]
        assert await box.load_state("alarms") == {"v": 1}
    finally:
        await box.close()


async def test_puts_during_a_commit_go_in_the_next_one_started_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = await _opened(tmp_path / "o.db")
    commits = _count_commits(box, monkeypatch)
    try:
        first = box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", 1))
        await asyncio.sleep(0)  # the first commit starts at the end of that step
        later = [box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", i)) for i in (2, 3)]
        await _durable([first, *later], "records put while a commit was under way")
        assert sum(n for n, _ in commits) == 3 and commits[0] == (1, [])
        assert [it.decoded().seq for it in await box.read(0, limit=10)] == [1, 2, 3]
    finally:
        await box.close()


async def test_a_fatal_commit_error_ends_the_committer(tmp_path: Path) -> None:
    box = await _opened(tmp_path / "o.db")
    committer = asyncio.create_task(box.run_committer())
    box._conn.execute("PRAGMA query_only = 1")  # every write now fails, and not for want of space
    fut = box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", 1))
    try:
        async with asyncio.timeout(5):
            with pytest.raises(sqlite3.OperationalError):
                await committer
    except TimeoutError:
        raise AssertionError("the committer went on after a commit failed for good") from None
    finally:
        committer.cancel()
        await asyncio.gather(committer, return_exceptions=True)
        box._conn.execute("PRAGMA query_only = 0")
        await box.close()
    assert isinstance(fut.exception(), sqlite3.OperationalError)


async def test_the_wal_is_checkpointed_beside_the_writer_not_by_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's default made the commit that crossed 1000 pages of WAL copy them into the database and fsync it
    (90 ms of one reading's latency); the outbox asks its reader's thread for the checkpoint at the same cadence."""
    box = await _opened(tmp_path / "o.db")
    database = tmp_path / "o.db"
    asked, release = threading.Event(), threading.Event()
    checkpoint = box._checkpoint_sync

    def held() -> None:  # the checkpoint waits until the test has looked at the database
        asked.set()
        release.wait(10)
        checkpoint()

    monkeypatch.setattr(box, "_checkpoint_sync", held)
    try:
        for round_ in range(2):  # and again: the next is asked for as the WAL grows again
            asked.clear()
            release.clear()
            before = database.stat().st_size
            for i in range(12):  # 1,200 records of a page each: past 1000 pages
                for k in range(100):
                    seq = round_ * 1200 + i * 100 + k + 1
                    box.put("1/ox", seq, record_for("1/ox", seq, pad=4000))
                await box.flush()
            assert asked.is_set(), f"round {round_ + 1}: no checkpoint asked of the reader's thread"
            assert database.stat().st_size - before < 1000 * 4096, "a commit copied the WAL into the database"
            release.set()
            grown = before + 1000 * 4096
            await wait_for(lambda: database.stat().st_size >= grown, 5)  # noqa: B023 (awaited in this iteration)
    finally:
        release.set()
        await box.close()


async def test_a_busy_line_groups_what_comes_within_the_commit_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit costs an fdatasync whatever it holds: under load, records that come within the interval after a
    commit started wait for the next one (one transaction), a quiet line's first record is committed at once, and a
    flush does not wait for the interval (a stop loses nothing)."""
    box = Outbox(tmp_path / "o.db", sinks=("mqtt",), commit_interval_s=3600)
    await box.open()
    commits = _count_commits(box, monkeypatch)
    try:
        first = box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", 1))
        await _durable([first], "the first record on a quiet line")  # not held back: no commit started before it
        later = []
        for i in (2, 3, 4):  # one a step, as readings from three ports would come
            later.append(box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", i)))
            await asyncio.sleep(0.05)
        assert box.unsaved == 3 and not any(f.done() for f in later), "committed before the interval had passed"
        await box.flush()
        assert commits == [(1, []), (3, [])]
        assert all(f.done() and f.exception() is None for f in later)
    finally:
        await box.close()


async def test_a_full_batch_does_not_wait_for_the_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site gateway's 1,000 readings a second fill a batch within milliseconds: its latency is not the interval's."""
    from gateway.outbox import COMMIT_BATCH

    box = Outbox(tmp_path / "o.db", sinks=("mqtt",), commit_interval_s=3600)
    await box.open()
    commits = _count_commits(box, monkeypatch)
    try:
        await _durable([box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", 1))], "the first record")
        batch = []
        for i in range(COMMIT_BATCH):  # one a step
            batch.append(box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", i + 2)))
            await asyncio.sleep(0)
        await _durable(batch, f"{COMMIT_BATCH} records waiting, an hour's interval")
        assert commits == [(1, []), (COMMIT_BATCH, [])]
    finally:
        await box.close()


async def test_without_an_interval_each_commit_starts_when_the_last_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox(tmp_path / "o.db", sinks=("mqtt",), commit_interval_s=0)
    await box.open()
    commits = _count_commits(box, monkeypatch)
    try:
        futures = []
        for i in (1, 2, 3):
            futures.append(box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", i)))
            await _durable(futures[-1:], f"record {i}")
        assert commits == [(1, []), (1, []), (1, [])]
    finally:
        await box.close()


async def test_a_state_given_as_a_callable_is_taken_once_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alarm engine's state was serialised once per alarm event: a device server gone at 1,000 devices raised
    1,000 alarms one by one, each snapshot holding all before it (500,000 alarm copies on the event loop). Given as
    a callable, it is taken once, when the commit starts, and holds everything put before it."""
    box = await _opened(tmp_path / "o.db")
    commits = _count_commits(box, monkeypatch)
    taken: list[int] = []
    alarms: list[int] = []

    def snapshot() -> dict[str, Any]:
        taken.append(len(alarms))
        return {"alarms": list(alarms)}

    try:
        futures = []
        for i in range(1000):
            alarms.append(i)
            futures.append(box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", i + 1)))
            box.put_state("alarms", snapshot)
        await _durable(futures, "a thousand records, each with its state")
        assert commits == [(1000, ["alarms"])] and taken == [1000]
        assert await box.load_state("alarms") == {"alarms": list(range(1000))}
    finally:
        await box.close()


async def test_a_state_that_cannot_be_taken_stops_the_committer_and_loses_nothing(tmp_path: Path) -> None:
    """A bug in a snapshot must not strand the records queued with it: they stay queued and the committer (so the
    gateway) stops with the error."""
    box = await _opened(tmp_path / "o.db")
    committer = asyncio.create_task(box.run_committer())

    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot bug")

    box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", 1))
    box.put_state("alarms", broken)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError, match="snapshot bug"):
                await committer
    except TimeoutError:
        raise AssertionError("the committer went on after the state could not be taken") from None
    finally:
        committer.cancel()
        await asyncio.gather(committer, return_exceptions=True)
    assert box.unsaved == 1, "the record queued with the state was dropped"
    box._pending_state.clear()  # the bug fixed (a restart): what was queued is committed
    box._failure = None
    try:
        await box.flush()
        assert [it.decoded().seq for it in await box.read(0, limit=10)] == [1]
    finally:
        await box.close()
