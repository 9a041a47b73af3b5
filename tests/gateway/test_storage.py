"""Opening the outbox (gateway/storage.py) with real files: the previous schema migrated, a newer one refused,
owner-only permissions whatever the umask, quick_check honoured, undecodable rows read as rejected items, damaged
files salvaged (from the main file and the -wal, overflow pages included), and sequence numbers that never go back.

Damage here is real bytes written into real files; the delivered counts through a real broker are in
tests/integration/test_outbox_damage.py."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from gateway import storage
from gateway.envelope import Record, WaveformMessage, record_type
from gateway.outbox import Outbox, map_rows
from gateway.preflight import EXIT_STORAGE, Fatal
from tests.helpers import record_for

SINKS = ("mqtt", "influx")

# The outbox's tables as the previous version wrote them: gateway/outbox.py at commit d878028 ("InfluxDB backlog
# read, decoded and rendered by a spawned worker process ...", the last before 3262300 added the `state` table),
# `git show d878028:gateway/outbox.py`. No user_version (0).
PREVIOUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,          -- room/device
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,         -- the JSON record, exactly as sinks receive it
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sequences (key TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    sink TEXT NOT NULL, record_id INTEGER NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL, body TEXT NOT NULL
);
"""


def _record(key: str, seq: int) -> Record:
    return record_for(key, seq)


def _previous_body(key: str, seq: int) -> str:
    """A reading's body as the previous version stored it: json.dumps of a dict (no `durable`, another key order)."""
    body = {k: v for k, v in msgspec.to_builtins(_record(key, seq)).items() if k not in ("durable", "type")}
    return json.dumps({**body, "type": "reading"}, separators=(",", ":"))


async def _filled(path: Path, counts: dict[str, int], big: int = 0) -> Outbox:
    """An open outbox holding `counts[key]` readings per key, committed; with `big`, one waveform of that many
    samples after the first reading (its body spills into overflow pages)."""
    box = Outbox(path, sinks=SINKS)
    await box.open()
    for key, n in counts.items():
        for _ in range(n):
            seq = box.next_seq(key)
            box.put(key, seq, _record(key, seq))
            if big and seq == 1:
                wave_seq = box.next_seq(key)
                box.put(key, wave_seq, record_for(key, wave_seq, "waveform", pad=big))
    await box.flush()
    return box


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- schema version ----------------------------------------------------------------------------------------------


def _previous_version_file(path: Path) -> None:
    """An outbox exactly as the previous version left it after a stop: 10 readings, MQTT settled up to the 4th,
    InfluxDB none, one record on the rejected pile."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(PREVIOUS_SCHEMA)
    for seq in range(1, 11):
        body = _previous_body("1/ox", seq)
        db.execute(
            "INSERT INTO records(key, seq, type, body, created) VALUES (?, ?, ?, ?, ?)",
            ("1/ox", seq, "reading", body, time.time()),
        )
    db.executemany("INSERT INTO cursors(sink, last_id) VALUES (?, ?)", [("mqtt", 4), ("influx", 0)])
    db.execute("INSERT INTO sequences(key, seq) VALUES ('1/ox', 10)")
    db.execute("INSERT INTO rejected VALUES ('influx', 2, '400 field type conflict', 0, '{}')")
    db.close()


async def test_an_outbox_written_by_the_previous_version_is_migrated_and_keeps_what_it_owes(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    _previous_version_file(path)

    box = Outbox(path, sinks=SINKS)
    await box.open()
    assert box.storage is not None and box.storage.migrated_from == 0 and box.storage.damage is None
    assert box.owed() == {"mqtt": 6, "influx": 10}
    assert [it.decoded().seq for it in await box.read(box.cursor("mqtt"), limit=100)] == [5, 6, 7, 8, 9, 10]
    assert await box.rejected_count() == 1
    assert await box.load_state("alarms") is None  # the table the previous version did not have
    box.put_state("alarms", {"active": []})
    seq = box.next_seq("1/ox")
    assert seq == 11  # ids go on
    box.put("1/ox", seq, _record("1/ox", seq))
    await box.flush()
    await box.close()

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (storage.SCHEMA_VERSION,)
    db.close()
    again = Outbox(path, sinks=SINKS)
    await again.open()
    assert again.storage is not None and again.storage.migrated_from is None  # migrated once
    assert await again.load_state("alarms") == {"active": []}
    assert again.next_seq("1/ox") == 12
    await again.close()


async def test_an_outbox_of_a_newer_schema_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 3})
    await box.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA user_version = {storage.SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()

    newer = Outbox(path, sinks=SINKS)
    with pytest.raises(Fatal) as caught:
        await newer.open()
    assert caught.value.code == EXIT_STORAGE and "newer" in caught.value.message
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.corrupt-*"))


# -- permissions -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_022")
async def test_with_umask_022_the_data_dir_is_0700_and_every_outbox_file_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = data / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 5})  # open, with a commit: -wal and -shm exist now
    try:
        assert _mode(data) == 0o700
        files = {p.name: _mode(p) for p in data.iterdir()}
        assert set(files) == {"outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm", "outbox.seq"}
        assert set(files.values()) == {0o600}, files
    finally:
        await box.close()
    # Moved aside and salvaged: the damaged copy and the new outbox are owner-only too.
    with path.open("r+b") as handle:
        handle.write(b"\0" * 100)
    box = Outbox(path, sinks=SINKS)
    await box.open()
    await box.close()
    assert box.storage is not None and box.storage.aside is not None
    assert {p.name: _mode(p) for p in data.iterdir()} == {
        "outbox.sqlite3": 0o600,
        "outbox.seq": 0o600,
        box.storage.aside.name: 0o600,
    }


async def test_world_readable_outbox_files_are_made_owner_only_at_start_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    path = data / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 5})
    await box.close()
    (data / "outbox.sqlite3.corrupt-1").write_bytes(b"an old damaged copy")
    for entry in data.iterdir():
        entry.chmod(0o644)
    data.chmod(0o755)

    with caplog.at_level(logging.WARNING, logger="gateway.storage"):
        box = Outbox(path, sinks=SINKS)
        await box.open()
    try:
        assert _mode(data) == 0o700
        assert {p.name: _mode(p) for p in data.iterdir()} == {
            name: 0o600 for name in ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm", "outbox.seq",
                                     "outbox.sqlite3.corrupt-1")
        }  # fmt: skip
        assert box.storage is not None and len(box.storage.fixed_modes) == 4  # the directory and three files
        assert "open to other users" in caplog.text
    finally:
        await box.close()


async def test_a_shared_sticky_directory_is_not_changed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with caplog.at_level(logging.ERROR, logger="gateway.storage"):
        box = await _filled(shared / "outbox.sqlite3", {"1/ox": 1})
    await box.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # like /tmp: never made private
    assert _mode(shared / "outbox.sqlite3") == 0o600
    assert "shared or not ours" in caplog.text


# -- integrity ---------------------------------------------------------------------------------------------------


def _leaf_pages(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    pages = [n for (n,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf'")]
    db.close()
    return pages


async def test_quick_check_findings_move_the_file_aside_and_its_records_are_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 600, "2/ox": 600})
    await box.close()
    leaves = _leaf_pages(path)
    victim = leaves[len(leaves) // 2]
    data = bytearray(path.read_bytes())
    # Garbage over a leaf's cell pointers (after its 8-byte header; in the cells' content it may miss every cell
    # header, as records are a few hundred bytes): SQLite opens the file, quick_check finds it.
    data[(victim - 1) * 4096 + 8 : (victim - 1) * 4096 + 108] = random.Random(1).randbytes(100)
    path.write_bytes(bytes(data))
    probe = sqlite3.connect(path)
    assert storage.check(probe) is not None  # what the previous code ran and ignored
    probe.close()

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.storage is not None and box.storage.damage and box.storage.aside is not None
        assert box.storage.aside.exists()
        assert 1100 < box.storage.salvaged < 1200  # all but the one leaf's records
        assert box.owed() == {"mqtt": box.storage.salvaged, "influx": box.storage.salvaged}
    finally:
        await box.close()


async def test_an_undecodable_record_is_read_as_a_rejected_item_and_a_sound_file_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 20})
    await box.close()
    data = bytearray(path.read_bytes())
    # Two bodies damaged in place, same length: quick_check does not read record contents, so the file is sound.
    seven = data.rindex(b'{"type":"reading"', 0, data.index(b'"id":"1/ox/7"'))
    data[seven] = 0xFF  # no longer UTF-8
    twelve = data.index(b'"id":"1/ox/12"')
    data[twelve] = ord("x")  # still UTF-8, no longer JSON
    path.write_bytes(bytes(data))

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.storage is not None and box.storage.damage is None and box.storage.aside is None
        items = await box.read(box.cursor("mqtt"), limit=100)
        assert [it.id for it in items] == list(range(1, 21))
        broken = {it.body[:8]: it for it in items if it.error}
        assert {it.id for it in broken.values()} == {7, 12}
        assert all(it.error.startswith("undecodable in the outbox") for it in broken.values())
        assert [it.decoded().seq for it in items if not it.error] == [s for s in range(1, 21) if s not in (7, 12)]
        with pytest.raises(ValueError, match="record 7: undecodable"):  # the worker process's reader says which
            map_rows(str(path), len, 0, None, 100)
        assert map_rows(str(path), len, 12, None, 100) == (20, 8, 8)
    finally:
        await box.close()


async def test_records_only_in_the_wal_are_salvaged_when_the_main_file_is_damaged(tmp_path: Path) -> None:
    live = tmp_path / "live" / "outbox.sqlite3"
    box = await _filled(live, {"1/ox": 200})
    await box.close()  # checkpointed: these are in the main file
    box = await _filled(live, {"1/ox": 300})  # seq 201-500: in the -wal only
    items = await box.read(0, limit=250)
    await box.ack("mqtt", items[-1].id)
    await box.flush()
    # What a crash (SIGKILL, power cut) leaves on disk: the main file and the -wal holding every commit since.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.seq"):
        shutil.copy(live.parent / name, crashed / name)
    await box.close()
    path, wal = crashed / "outbox.sqlite3", crashed / "outbox.sqlite3-wal"
    path.write_bytes(random.Random(2).randbytes(path.stat().st_size))  # the main file: garbage

    carved = storage.carve(path, wal, SINKS)  # the -wal's frames alone, the main file has nothing left
    assert set(range(201, 501)) <= {r[2] for r in carved.records}
    assert carved.cursors == {"mqtt": 250, "influx": 0} and carved.sequences == {"1/ox": 500}

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.storage is not None and box.storage.damage and box.storage.salvaged == len(carved.records)
        seqs = [it.decoded().seq for it in await box.read(box.cursor("mqtt"), limit=1000)]
        assert seqs == list(range(251, 501))  # MQTT's cursor carried over
        assert box.owed()["influx"] == box.storage.salvaged
    finally:
        await box.close()


async def test_a_record_in_overflow_pages_is_salvaged_whole(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 50}, big=5000)  # a 25 KB waveform: six overflow pages
    await box.close()
    with path.open("r+b") as handle:
        handle.write(b"\xff" * 100)

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.storage is not None and box.storage.salvaged == 51
        items = await box.read(box.cursor("influx"), limit=100)
        assert [record_type(it.decoded()) for it in items[:3]] == ["reading", "waveform", "reading"]
        assert isinstance(items[1].record, WaveformMessage) and items[1].record.samples == list(range(5000))
    finally:
        await box.close()


async def test_a_garbage_file_salvages_nothing_and_a_new_outbox_works(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 40})
    await box.close()
    path.write_bytes(random.Random(3).randbytes(200_000))

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.storage is not None and box.storage.salvaged == 0 and box.storage.aside is not None
        assert box.storage.aside.read_bytes() == random.Random(3).randbytes(200_000)  # kept for inspection
        assert box.next_seq("1/ox") > 40  # never an id that was used
        box.put("1/ox", 41, _record("1/ox", 41))
        await box.flush()
        assert len(await box.read(box.cursor("mqtt"), limit=10)) == 1
    finally:
        await box.close()


async def test_an_interrupted_salvage_is_finished_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 30})
    await box.close()
    with path.open("r+b") as handle:
        handle.write(b"\0" * 100)

    def crash(path: Path, done: Path) -> Path | None:  # stand-in for a power cut after the salvaged file is complete
        raise OSError("power cut")

    monkeypatch.setattr(storage, "_replace_damaged", crash)
    with pytest.raises(OSError, match="power cut"):
        await Outbox(path, sinks=SINKS).open()
    monkeypatch.undo()
    assert (tmp_path / "outbox.sqlite3.salvage").exists()

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert [it.decoded().seq for it in await box.read(box.cursor("mqtt"), limit=100)] == list(range(1, 31))
        assert not (tmp_path / "outbox.sqlite3.salvage").exists()
        assert len(list(tmp_path.glob("outbox.sqlite3.corrupt-*"))) == 1
    finally:
        await box.close()


# -- sequence numbers --------------------------------------------------------------------------------------------


async def test_sequences_continue_after_a_deleted_outbox_never_going_back(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 50, "2/ox": 7})
    await box.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        first, second = box.next_seq("1/ox"), box.next_seq("2/ox")
        assert 50 < first <= 50 + storage.LEASE + 1 and 7 < second <= 7 + storage.LEASE + 1
        assert box.next_seq("3/ox") == 1  # a key never seen starts at 1
        assert box.storage is not None and set(box.storage.sequences_from_marks) == {"1/ox", "2/ox"}
    finally:
        await box.close()


async def test_a_restored_older_outbox_continues_from_its_marks(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 10})
    await box.close()
    shutil.copy(path, tmp_path / "backup")
    box = await _filled(path, {"1/ox": 3000})  # 3,010 numbers used since the copy
    await box.close()
    shutil.copy(tmp_path / "backup", path)

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.next_seq("1/ox") > 3010
    finally:
        await box.close()


async def test_a_clean_restart_continues_without_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 2500})  # past two leases
    await box.close()
    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.next_seq("1/ox") == 2501
    finally:
        await box.close()


def test_marks_survive_a_torn_write_of_one_slot(tmp_path: Path) -> None:
    marks = storage.SequenceMarks(tmp_path / "outbox.seq")
    marks.reserved = {"1/ox": 1000}
    marks.save()
    marks.reserved = {"1/ox": 2000}
    marks.save()  # the other slot
    data = bytearray(marks.path.read_bytes())
    newer = (marks._counter % 2) * (len(data) // 2)
    data[newer + 30 : newer + 40] = b"\0" * 10  # torn: the newer slot's JSON half written
    marks.path.write_bytes(bytes(data))

    again = storage.SequenceMarks(marks.path)
    assert again.load() and again.reserved == {"1/ox": 1000}
    again.reserved["1/ox"] = 3000
    again.save()  # over the torn slot
    third = storage.SequenceMarks(marks.path)
    assert third.load() and third.reserved == {"1/ox": 3000}
    assert marks.path.stat().st_size == 2 * storage._MARKS_SLOT  # written in place: no new blocks needed


def test_marks_grow_their_slots_when_the_keys_do_not_fit(tmp_path: Path) -> None:
    marks = storage.SequenceMarks(tmp_path / "outbox.seq")
    marks.reserved = {f"room-{i}/device-{i}": i for i in range(5000)}
    marks.save()
    again = storage.SequenceMarks(marks.path)
    assert again.load() and again.reserved == marks.reserved


async def test_numbers_given_while_storage_is_unusable_are_never_given_again_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = await _filled(path, {"1/ox": 50})
    # The state a full disk puts the outbox in (made for real by tests/integration/test_disk_full.py), set by hand:
    # records go to live sinks before their commit, so their numbers may be out while the file does not have them.
    box.storage_error = "database or disk is full"
    sent_undurable = [box.next_seq("1/ox") for _ in range(3)]  # 51-53: published, never committed
    await box._run(lambda: None)  # the marks' save queued on the writer thread has run
    box.storage_error = None
    await box.close()  # as after a crash: 51-53 are not in the outbox

    box = Outbox(path, sinks=SINKS)
    await box.open()
    try:
        assert box.next_seq("1/ox") > max(sent_undurable)
        assert box.storage is not None and "1/ox" in box.storage.sequences_from_marks
    finally:
        await box.close()
    box = Outbox(path, sinks=SINKS)
    await box.open()  # the flag was acted on: the next start continues from the outbox again
    try:
        assert box.storage is not None and box.storage.sequences_from_marks == {}
    finally:
        await box.close()


@pytest.mark.parametrize("page_size", [1024, 4096, 8192])
def test_with_its_header_destroyed_the_page_size_of_a_pruned_outbox_is_still_found(
    tmp_path: Path, page_size: int
) -> None:
    """The free pages a prune leaves at the start of the file made a larger page size look likelier (found when
    records grew by a few bytes: a header-damaged outbox then salvaged half of what it held)."""
    path = tmp_path / "o.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA page_size = {page_size}")
    db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO records(body) VALUES (?)", [("x" * 350,) for _ in range(7000)])
    db.commit()
    db.execute("DELETE FROM records WHERE id <= 3500")  # settled and pruned: free pages at the start
    db.commit()
    db.close()
    data = bytearray(path.read_bytes())
    data[:100] = random.Random(12).randbytes(100)
    assert storage._guess_page_size(bytes(data)) == page_size
