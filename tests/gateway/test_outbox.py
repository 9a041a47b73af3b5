"""The outbox keeps what it was given across restarts and settles each sink's cursor independently."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.envelope import Record, record_type
from gateway.outbox import Outbox
from tests.helpers import record_for


def _record(seq: int) -> Record:
    return record_for("1/ox", seq)


async def _filled(path: Path, n: int) -> Outbox:
    box = Outbox(path, sinks=("mqtt", "influx"))
    await box.open()
    futures = [box.put("1/ox", box.next_seq("1/ox"), _record(i + 1)) for i in range(n)]
    await box.flush()
    for fut in futures:
        assert fut.done() and fut.exception() is None
    return box


async def test_records_survive_reopen_and_sequences_continue(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 5)
    assert box.committed == 5
    await box.close()

    again = Outbox(tmp_path / "o.db", sinks=("mqtt", "influx"))
    await again.open()
    items = await again.read(again.cursor("mqtt"), limit=100)
    assert [it.decoded().seq for it in items] == [1, 2, 3, 4, 5]
    assert again.next_seq("1/ox") == 6  # ids stay unique across a restart
    assert again.next_seq("2/ox") == 1
    await again.close()


async def test_each_sink_has_its_own_cursor(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 4)
    items = await box.read(box.cursor("mqtt"), limit=2)
    await box.ack("mqtt", items[-1].id)
    assert await box.backlog() == {"mqtt": 2, "influx": 4}
    assert [it.decoded().seq for it in await box.read(box.cursor("mqtt"), limit=10)] == [3, 4]
    assert len(await box.read(box.cursor("influx"), limit=10)) == 4
    await box.close()


async def test_rejected_records_are_kept_aside_and_skipped(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 3)
    items = await box.read(box.cursor("influx"), limit=10)
    await box.reject("influx", items[1:2], "400 field type conflict")
    await box.ack("influx", items[0].id)
    assert await box.rejected_count() == 1
    remaining = await box.read(box.cursor("influx"), limit=10)
    assert [it.decoded().seq for it in remaining] == [3]
    await box.close()


async def test_prune_deletes_only_what_every_sink_settled(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 4)
    items = await box.read(box.cursor("mqtt"), limit=10)
    await box.ack("mqtt", items[-1].id)
    await box.ack("influx", items[1].id)
    assert await box.prune() == 2
    assert [it.decoded().seq for it in await box.read(box.cursor("influx"), limit=10)] == [3, 4]
    await box.close()


async def test_corrupt_database_is_moved_aside_not_a_crash_loop(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    box = Outbox(path, sinks=("mqtt",))
    await box.open()
    box.put("1/ox", box.next_seq("1/ox"), _record(1))
    await box.flush()
    assert len(await box.read(box.cursor("mqtt"), limit=10)) == 1
    await box.close()
    aside = list(tmp_path.glob("o.db.corrupt-*"))
    assert aside and aside[0].read_bytes().startswith(b"this is not an SQLite")


async def test_over_its_bounds_the_oldest_readings_go_first_and_are_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", sinks=("mqtt", "influx"))
    await box.open()
    box.put("1/ox", box.next_seq("1/ox"), record_for("1/ox", 1, "status"))
    for i in range(2, 1502):
        box.put("1/ox", box.next_seq("1/ox"), _record(i))
    await box.flush()
    deleted = await box.prune(max_records=1000)
    assert deleted == 501 and box.dropped == 501
    kept = await box.read(0, limit=2000)
    assert len(kept) == 1000
    assert record_type(kept[0].decoded()) == "status"  # statuses (and alarms) are kept; readings go first
    assert [it.decoded().seq for it in kept[1:3]] == [503, 504]  # the oldest readings went
    await box.close()


async def test_read_gives_the_same_records_from_memory_and_from_disk(tmp_path: Path) -> None:
    from gateway.outbox import RECENT

    box = await _filled(tmp_path / "o.db", RECENT + 50)  # the oldest 50 are only on disk now
    head = box.head()
    cases: list[tuple[int, int | None, int]] = [
        (0, None, 10),
        (40, None, 20),
        (head - 3, None, 10),
        (head - 30, None, 10),
        (head - RECENT // 2, None, 5),
    ]
    cases += [
        (head, None, 10),
        (head - 30, head - 25, 10),
        (head - RECENT * 3 // 4, head - RECENT * 3 // 4 + 10, 100),
        (40, 45, 10),
    ]
    cases += [(head - 10, head - 10, 10), (head - RECENT + 96, head, 3)]
    for after, before, limit in cases:
        got = [it.id for it in await box.read(after, before, limit=limit)]
        upper = head if before is None else before - 1
        assert got == list(range(after + 1, min(upper, after + limit) + 1)), (after, before, limit)
        on_disk = [(it.id, it.record) for it in box._read_sync(after, before, limit)]
        assert on_disk == [(it.id, it.record) for it in await box.read(after, before, limit=limit)]
    await box.close()


# --- what each sink owes, from memory (issue 12, observation 5) --------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.integers(1, 40), st.floats(0, 1)),  # n records, share of statuses
        st.tuples(st.just("ack"), st.sampled_from(["mqtt", "influx"]), st.integers(0, 30)),
        st.tuples(st.just("reject"), st.sampled_from(["mqtt", "influx"]), st.integers(1, 5)),
        st.tuples(st.just("prune"), st.integers(0, 60), st.booleans()),  # bound, and age them past the limit
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    ),
    max_size=25,
)


async def _owed_matches_count(path: Path, ops: list[tuple[str, Any, Any]]) -> None:
    box = Outbox(path, sinks=("mqtt", "influx"))
    await box.open()
    try:
        for op, a, b in ops:
            if op == "commit":
                for i in range(a):
                    kind = "status" if i < a * b else "reading"
                    seq = box.next_seq("1/ox")
                    box.put("1/ox", seq, record_for("1/ox", seq, kind))
                await box.flush()
            elif op in ("ack", "reject"):
                items = await box.read(box.cursor(a), limit=b)
                if items and op == "ack":
                    await box.ack(a, items[-1].id)
                elif items:
                    await box.reject(a, items, "test")
            elif op == "prune":
                if b:  # every record so far is older than the age bound
                    box._conn.execute("UPDATE records SET created = created - 100000")
                await box.prune(max_records=a, max_age_s=50_000 if b else None)
            else:
                await box.close()
                box = Outbox(path, sinks=("mqtt", "influx"))
                await box.open()
            assert box.owed() == await box.count_owed(), (op, a, b)
    finally:
        await box.close()


@settings(max_examples=60, deadline=None)
@given(_OPS)
def test_what_each_sink_owes_is_exact_from_memory(ops: list[tuple[str, Any, Any]]) -> None:
    """Commits, acknowledgements, rejects, settled prunes, readings dropped over the bounds (by count and by age)
    and restarts: the figure without a query equals count(*)."""
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(_owed_matches_count(Path(folder) / "o.db", ops))


async def test_dropped_readings_are_not_owed_after_a_restart(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 3000)
    await box.prune(max_records=1000)
    assert box.owed() == {"mqtt": 1000, "influx": 1000}
    await box.close()
    again = Outbox(tmp_path / "o.db", sinks=("mqtt", "influx"))
    await again.open()
    assert again.owed() == {"mqtt": 1000, "influx": 1000} == await again.count_owed()
    items = await again.read(again.cursor("influx"), limit=5000)
    await again.ack("influx", items[-1].id)
    assert again.owed() == {"mqtt": 1000, "influx": 0}
    await again.close()


async def test_a_failed_commit_reports_the_disk_error_not_a_rollback_error(tmp_path: Path) -> None:
    """SQLite rolls back a failed COMMIT itself; our ROLLBACK then raised 'no transaction is active' and hid the
    real cause (issue 12: `task status failed: cannot rollback`)."""
    box = await _filled(tmp_path / "o.db", 1)
    box._conn.execute("PRAGMA query_only = 1")  # every write now fails, as a read-only disk would
    fut = box.put("1/ox", box.next_seq("1/ox"), _record(2))
    with pytest.raises(sqlite3.OperationalError) as caught:
        await box.flush()
    assert "rollback" not in str(caught.value)
    assert isinstance(fut.exception(), sqlite3.OperationalError)
    box._conn.execute("PRAGMA query_only = 0")
    await box.close()
