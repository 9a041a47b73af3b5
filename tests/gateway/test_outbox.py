"""The outbox keeps what it was given across restarts and settles each sink's cursor independently."""

from __future__ import annotations

from pathlib import Path

from gateway.outbox import Outbox


def _record(seq: int) -> dict[str, object]:
    return {"type": "reading", "seq": seq, "metrics": {"spo2": 97.0}}


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
    items = await again.read("mqtt", 100)
    assert [it.record["seq"] for it in items] == [1, 2, 3, 4, 5]
    assert again.next_seq("1/ox") == 6  # ids stay unique across a restart
    assert again.next_seq("2/ox") == 1
    await again.close()


async def test_each_sink_has_its_own_cursor(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 4)
    items = await box.read("mqtt", 2)
    await box.ack("mqtt", items[-1].id)
    assert await box.backlog() == {"mqtt": 2, "influx": 4}
    assert [it.record["seq"] for it in await box.read("mqtt", 10)] == [3, 4]
    assert len(await box.read("influx", 10)) == 4
    await box.close()


async def test_rejected_records_are_kept_aside_and_skipped(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 3)
    items = await box.read("influx", 10)
    await box.reject("influx", items[1:2], "400 field type conflict")
    await box.ack("influx", items[0].id)
    assert await box.rejected_count() == 1
    remaining = await box.read("influx", 10)
    assert [it.record["seq"] for it in remaining] == [3]
    await box.close()


async def test_prune_deletes_only_what_every_sink_settled(tmp_path: Path) -> None:
    box = await _filled(tmp_path / "o.db", 4)
    items = await box.read("mqtt", 10)
    await box.ack("mqtt", items[-1].id)
    await box.ack("influx", items[1].id)
    assert await box.prune() == 2
    assert [it.record["seq"] for it in await box.read("influx", 10)] == [3, 4]
    await box.close()


async def test_corrupt_database_is_moved_aside_not_a_crash_loop(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    box = Outbox(path, sinks=("mqtt",))
    await box.open()
    box.put("1/ox", box.next_seq("1/ox"), _record(1))
    await box.flush()
    assert len(await box.read("mqtt", 10)) == 1
    await box.close()
    aside = list(tmp_path.glob("o.db.corrupt-*"))
    assert aside and aside[0].read_bytes().startswith(b"this is not an SQLite")


async def test_over_its_bounds_the_oldest_readings_go_first_and_are_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", sinks=("mqtt", "influx"))
    await box.open()
    box.put("1/ox", box.next_seq("1/ox"), {"type": "status", "seq": 1, "state": "ok"})
    for i in range(2, 1502):
        box.put("1/ox", box.next_seq("1/ox"), _record(i))
    await box.flush()
    deleted = await box.prune(max_records=1000)
    assert deleted == 501 and box.dropped == 501
    kept = await box.read_range(0, None, 2000)
    assert len(kept) == 1000
    assert kept[0].record["type"] == "status"  # statuses (and alarms) are kept; readings go first
    assert [it.record["seq"] for it in kept[1:3]] == [503, 504]  # the oldest readings went
    await box.close()


async def test_read_after_gives_the_same_records_from_memory_and_from_disk(tmp_path: Path) -> None:
    from gateway.outbox import RECENT

    box = await _filled(tmp_path / "o.db", RECENT + 50)  # the oldest 50 are only on disk now
    head = await box.head()
    for after, limit in [(0, 10), (40, 20), (head - 3, 10), (head - 30, 10), (head - 2000, 5), (head, 10)]:
        got = [it.id for it in await box.read_after(after, limit)]
        assert got == list(range(after + 1, min(head, after + limit) + 1)), (after, limit)
        on_disk = [(it.id, it.record) for it in await box.read_range(after, None, limit)]
        assert on_disk == [(it.id, it.record) for it in await box.read_after(after, limit)]
    await box.close()
