"""A damaged outbox file, then every readable undelivered record counted on a real broker (issue 13, obs. 2-3).

An outbox owing MQTT 6,015 readings (as in the issue) is damaged on disk with real bytes: garbage over eight pages,
the header overwritten, the file truncated, a page zeroed, 40 bytes flipped inside leaf pages. It is then opened
and drained by the real sink worker into mosquitto. What must arrive is decided without the code under test:
before the damage, each undelivered record's bytes are found in the file (so its page is known); after it, a record
whose page is byte-for-byte unchanged is readable and must arrive, unchanged, with its original id. New records
after the salvage must carry ids above every old one. A record that is no longer JSON must land on the rejected
pile with its reason while the sink goes on; in a sound file too, for MQTT and for InfluxDB's worker-process path.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from devices.base import Reading
from devices.registry import get_model
from gateway.config import InfluxSection, MqttSection
from gateway.envelope import ReadingMessage, encode, origin_for, reading_record
from gateway.outbox import Outbox
from gateway.sink_worker import RenderedBacklog, SinkWorker
from gateway.sinks.influx import InfluxSink
from gateway.sinks.mqtt import MqttSink, subscribe
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

SINKS = ("mqtt", "influx")
ROOMS = ("1", "2", "3")
TOTAL, MQTT_SETTLED, INFLUX_SETTLED = 7000, 985, 500  # MQTT owes 6,015
PAGE = 4096
ID = re.compile(rb'"id":"([0-9]+/ox/[0-9]+)"')


def _without_historical(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "historical"}


async def _outbox_owing_mqtt(path: Path) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """7,000 readings; MQTT settled the first 985, InfluxDB the first 500 (pruned). The undelivered ones by id, and
    the ids MQTT settled."""
    box = Outbox(path, sinks=SINKS)
    await box.open()
    spec = get_model("masimo-ascii1").spec
    origins = {room: origin_for("s", room, "ox", spec) for room in ROOMS}
    start = time.time() - 3600
    records: list[ReadingMessage] = []
    for i in range(TOTAL):
        room = ROOMS[i % 3]
        seq = box.next_seq(f"{room}/ox")
        reading = Reading({"spo2": 90 + i % 9, "pulse_rate": 60 + i % 40}, device_time=f"2026-01-01T10:{i % 60:02d}:00")
        records.append(reading_record(origins[room], seq, start + i * 0.2, reading))
        box.put(f"{room}/ox", seq, records[-1])
    await box.flush()
    await box.ack("mqtt", MQTT_SETTLED)
    await box.ack("influx", INFLUX_SETTLED)
    await box.prune()
    await box.close()
    undelivered: dict[str, dict[str, Any]] = {r.id: msgspec.to_builtins(r) for r in records[MQTT_SETTLED:]}
    return undelivered, {r.id for r in records[:MQTT_SETTLED]}


def _pages_of(data: bytes, undelivered: dict[str, dict[str, Any]]) -> dict[str, range]:
    """The pages (0-based) holding each undelivered record's stored bytes, found by a plain byte search."""
    found: dict[str, range] = {}
    for match in ID.finditer(data):
        rid = match.group(1).decode()
        record = undelivered.get(rid)
        if record is None:
            continue
        body = encode(msgspec.convert(record, ReadingMessage))  # the bytes the outbox stored
        begin = match.start() - body.index(b'"id":"')
        if data[begin : begin + len(body)] == body:
            found[rid] = range(begin // PAGE, (begin + len(body) - 1) // PAGE + 1)
    assert len(found) == len(undelivered), f"{len(undelivered) - len(found)} records not found in the file"
    return found


def _leaf_pages(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    leaves = [n for (n,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf'")]
    db.close()
    return leaves


def _garbage(data: bytearray, leaves: list[int]) -> None:
    first = leaves[len(leaves) // 2] - 1
    data[first * PAGE : (first + 8) * PAGE] = random.Random(11).randbytes(8 * PAGE)


def _header(data: bytearray, leaves: list[int]) -> None:
    data[:100] = random.Random(12).randbytes(100)


def _truncation(data: bytearray, leaves: list[int]) -> None:
    del data[int(len(data) * 0.7) + 1234 :]  # not on a page boundary


def _zeroed_page(data: bytearray, leaves: list[int]) -> None:
    page = leaves[len(leaves) // 2] - 1
    data[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)


def _flipped_bytes(data: bytearray, leaves: list[int]) -> None:
    rng = random.Random(13)
    for _ in range(40):
        data[(rng.choice(leaves) - 1) * PAGE + rng.randrange(PAGE)] ^= 0xFF


DAMAGE: dict[str, Callable[[bytearray, list[int]], None]] = {
    "garbage": _garbage,
    "header": _header,
    "truncation": _truncation,
    "zeroed_page": _zeroed_page,
    "flipped_bytes": _flipped_bytes,
}


@pytest.mark.parametrize("kind", list(DAMAGE))
async def test_every_readable_undelivered_record_of_a_damaged_outbox_is_delivered(
    tmp_path: Path, mosquitto: Any, kind: str
) -> None:
    path = tmp_path / "data" / "outbox.sqlite3"
    undelivered, settled = await _outbox_owing_mqtt(path)
    assert len(undelivered) == 6015
    before = path.read_bytes()
    pages = _pages_of(before, undelivered)
    damaged = bytearray(before)
    DAMAGE[kind](damaged, _leaf_pages(path))
    path.write_bytes(bytes(damaged))
    changed = {
        n
        for n in range((len(before) + PAGE - 1) // PAGE)
        if before[n * PAGE : (n + 1) * PAGE] != bytes(damaged[n * PAGE : (n + 1) * PAGE])
    }
    readable = {rid for rid, where in pages.items() if not changed.intersection(where)}
    assert len(readable) > 0.6 * len(undelivered), "the damage should leave most pages sound"
    old_top = {room: max(r["seq"] for r in undelivered.values() if r["room"] == room) for room in ROOMS}

    box = Outbox(path, sinks=SINKS)
    await box.open()
    report = box.storage
    assert report is not None and report.damage, "the damage went unnoticed"
    assert report.aside is not None and report.aside.exists()
    owed = box.owed()["mqtt"]

    cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
    arrived: dict[str, dict[str, Any]] = {}
    subscribed = asyncio.Event()

    async def collect() -> None:
        async with subscribe(cfg, ["infusion/s/+/ox/reading"], f"damage-{kind}") as messages:
            subscribed.set()
            async for _topic, payload in messages:
                body = json.loads(payload)
                arrived[body["id"]] = _without_historical(body)

    collecting = asyncio.create_task(collect())
    worker = SinkWorker(box, lambda: MqttSink(cfg, "s", "gw", 10.0), "mqtt", batch_size=200)
    working: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(10):
            await subscribed.wait()
        working = asyncio.create_task(worker.run())
        await wait_for(lambda: worker.delivered + worker.rejected >= owed, 60)
        await wait_for(lambda: len(arrived) >= worker.delivered, 10)
        missing = sorted(readable - set(arrived))
        assert not missing, f"{len(missing)} readable undelivered records never arrived, e.g. {missing[:5]}"
        assert all(arrived[rid] == _without_historical(undelivered[rid]) for rid in readable)
        altered = sorted(rid for rid in arrived if _without_historical(undelivered.get(rid, {})) != arrived[rid])
        if kind != "flipped_bytes":  # damage that takes whole pages away leaves nothing half-read
            assert not altered, f"records arrived that were not sent as such: {altered[:5]}"
        assert not settled & set(arrived), "a record MQTT had already settled was sent again (cursor lost)"
        assert await box.rejected_count() == worker.rejected
        assert not working.done(), "the sink's task ended"

        # New records after the salvage: ids above every one the old outbox used, and they go out.
        fresh: list[str] = []
        for room in ROOMS:
            seq = box.next_seq(f"{room}/ox")
            assert seq > old_top[room], f"room {room}: sequence {seq} was already used"
            origin = origin_for("s", room, "ox", get_model("masimo-ascii1").spec)
            box.put(f"{room}/ox", seq, reading_record(origin, seq, time.time(), Reading({"spo2": 97})))
            fresh.append(f"{room}/ox/{seq}")
        await box.flush()
        await wait_for(lambda: set(fresh) <= set(arrived), 10)
        print(
            f"\n{kind}: {len(undelivered)} undelivered, {len(readable)} on unchanged pages, {report.salvaged} "
            f"salvaged ({report.salvaged_undecodable} no longer JSON), {worker.delivered - len(fresh)} delivered, "
            f"{worker.rejected} rejected, {len(altered)} delivered altered; new ids from "
            f"{', '.join(sorted(fresh))} (old tops {old_top})"
        )
    finally:
        if working is not None:
            working.cancel()
        collecting.cancel()
        await asyncio.gather(*(t for t in (working, collecting) if t is not None), return_exceptions=True)
        await box.close()
    db = sqlite3.connect(path)
    reasons = [r for (r,) in db.execute("SELECT reason FROM rejected WHERE sink = 'mqtt'")]
    db.close()
    assert all(r.startswith(("undecodable in the outbox", "mqtt cannot encode")) for r in reasons), reasons[:3]


def _break_bodies(path: Path, ids: dict[str, bytes]) -> None:
    """Damage bodies in place, same length (quick_check does not read record contents: the file stays sound)."""
    data = bytearray(path.read_bytes())
    for rid, byte in ids.items():
        at = data.index(f'"id":"{rid}"'.encode())
        data[at] = byte[0]
    path.write_bytes(bytes(data))


async def test_an_undecodable_record_goes_to_the_rejected_pile_and_both_sinks_go_on(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    path = tmp_path / "data" / "outbox.sqlite3"
    box = Outbox(path, sinks=SINKS)
    await box.open()
    origin = origin_for("s", "1", "ox", get_model("masimo-ascii1").spec)
    n, start = 1500, time.time() - 3600
    for i in range(n):
        seq = box.next_seq("1/ox")
        reading = Reading({"spo2": 97}, device_time=f"2026-01-01T10:00:{i % 60:02d}")
        box.put("1/ox", seq, reading_record(origin, seq, start + i, reading))
    await box.flush()
    await box.close()
    _break_bodies(path, {"1/ox/700": b"\xff", "1/ox/1200": b"x"})  # not UTF-8; not JSON

    box = Outbox(path, sinks=SINKS)
    await box.open()
    assert box.storage is not None and box.storage.damage is None  # a sound file is kept
    mqtt_cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
    influx_cfg = InfluxSection(api="v1", url=influxd.url, database=influx_db)
    arrived: set[int] = set()
    subscribed = asyncio.Event()

    async def collect() -> None:
        async with subscribe(mqtt_cfg, ["infusion/s/+/ox/reading"], "undecodable") as messages:
            subscribed.set()
            async for _topic, payload in messages:
                arrived.add(json.loads(payload)["seq"])

    collecting = asyncio.create_task(collect())
    mqtt = SinkWorker(box, lambda: MqttSink(mqtt_cfg, "s", "gw", 10.0), "mqtt", batch_size=100)
    # A backlog over one batch: InfluxDB's is read and rendered by a worker process (map_rows), the path that
    # meets the bad record first.
    influx = SinkWorker(box, lambda: InfluxSink(influx_cfg), "influx", batch_size=500, renderer=RenderedBacklog())
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(10):
            await subscribed.wait()
        tasks = [asyncio.create_task(mqtt.run()), asyncio.create_task(influx.run())]
        await wait_for(lambda: mqtt.delivered + mqtt.rejected == n, 60)
        await wait_for(lambda: influx.delivered + influx.rejected == n, 60)
        assert mqtt.rejected == 2 and influx.rejected == 2
        assert not any(t.done() for t in tasks), "a sink's task ended"
        await wait_for(lambda: len(arrived) == n - 2, 10)
        assert arrived == set(range(1, n + 1)) - {700, 1200}
        rows = influxd.query(influx_db, 'SELECT "seq" FROM "vitals"')
        stored = sorted(int(v[1]) for v in rows[0]["values"]) if rows else []
        assert stored == sorted(set(range(1, n + 1)) - {700, 1200})
        assert box.owed() == {"mqtt": 0, "influx": 0}
    finally:
        for task in tasks:
            task.cancel()
        collecting.cancel()
        await asyncio.gather(*tasks, collecting, return_exceptions=True)
        await box.close()
    db = sqlite3.connect(path)
    rejected = sorted(db.execute("SELECT sink, record_id, substr(reason, 1, 40) FROM rejected"))
    db.close()
    assert [(s, i) for s, i, _ in rejected] == [("influx", 700), ("influx", 1200), ("mqtt", 700), ("mqtt", 1200)]
    assert all(reason.startswith("undecodable in the outbox") for _, _, reason in rejected)
