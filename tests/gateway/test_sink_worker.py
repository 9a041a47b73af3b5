"""The sink worker against a real Mosquitto: after an outage, live records go out at once while the backlog drains
behind them, every record arrives, and the cursor ends where the live records left it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from devices.base import Reading
from devices.registry import get_model
from gateway.backoff import Backoff
from gateway.config import InfluxSection, MqttSection
from gateway.envelope import origin_for, reading_record
from gateway.outbox import Outbox
from gateway.sink_worker import LiveFirst, RenderedBacklog, SinkWorker
from gateway.sinks.influx import InfluxSink
from gateway.sinks.mqtt import MqttSink, subscribe
from tests.helpers import fill, wait_for

BACKLOG = 3000
LIVE = 5


async def test_live_records_overtake_the_backlog_and_nothing_is_lost(tmp_path: Path, mosquitto: Any) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("mqtt",))
    await box.open()
    spec = get_model("masimo-ascii1").spec
    old, new = origin_for("s", "backlog", "ox", spec), origin_for("s", "live", "ox", spec)
    start = time.time() - 3600
    for i in range(BACKLOG):  # what an outage leaves behind
        box.put("backlog/ox", i + 1, reading_record(old, i + 1, start + i, Reading({"spo2": 97})))
    await box.flush()

    arrived: list[tuple[str, int, bool]] = []
    cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)

    subscribed = asyncio.Event()

    async def collect() -> None:
        async with subscribe(cfg, ["infusion/s/+/ox/reading"], "delivery-test") as messages:
            subscribed.set()
            async for _topic, payload in messages:
                body = json.loads(payload)
                arrived.append((body["room"], body["seq"], body["historical"]))

    collecting = asyncio.create_task(collect())
    async with asyncio.timeout(10):
        await subscribed.wait()  # the broker has acknowledged the subscription
    live_first = LiveFirst(backlog_share=0.5)
    worker = SinkWorker(box, lambda: MqttSink(cfg, "s", "gw", 10.0), "mqtt", batch_size=50, live_first=live_first)
    working = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: len(arrived) >= 100, 10)  # the replay is under way
        for k in range(LIVE):
            box.put("live/ox", k + 1, reading_record(new, k + 1, time.time(), Reading({"spo2": 96})))
            await box.flush()
        await wait_for(lambda: sum(1 for room, _, _ in arrived if room == "live") == LIVE, 5)
        backlog_seen = sum(1 for room, _, _ in arrived if room == "backlog")
        assert backlog_seen < BACKLOG, "live records waited for the whole backlog"
        await wait_for(lambda: len({(r, s) for r, s, _ in arrived}) == BACKLOG + LIVE, 30)
        assert {s for r, s, _ in arrived if r == "backlog"} == set(range(1, BACKLOG + 1))
        assert all(historical for room, _, historical in arrived if room == "backlog")
        assert not any(historical for room, _, historical in arrived if room == "live")
        head = box.head()
        await wait_for(lambda: box.cursor("mqtt") == head, 5)  # settled up to the newest live record
        assert await box.backlog() == {"mqtt": 0}
    finally:
        working.cancel()
        collecting.cancel()
        await asyncio.gather(working, collecting, return_exceptions=True)
        await box.close()


async def _put_with_poison(box: Outbox, key: str, n: int, poison: int, start: float) -> None:
    """Commit n readings of one device, the one at index `poison` with a float where every other point has a string:
    influxd refuses it (field type conflict)."""
    room, device = key.split("/")
    origin = origin_for("s", room, device, get_model("masimo-ascii1").spec)
    for i in range(n):
        record = reading_record(origin, i + 1, start + i, Reading({"spo2": 97}, device_time="2026-01-01T10:00:00"))
        if i == poison:
            record = replace(record, metrics={**record.metrics, "device_time": 1.0}, device_time=None)
        box.put(key, i + 1, record)
    await box.flush()


async def test_an_influx_backlog_rendered_by_a_worker_process_is_stored_once_and_its_poison_set_aside(
    tmp_path: Path, influxd: Any, influx_db: str
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("influx",))
    await box.open()
    n, poison = 1200, 700
    await _put_with_poison(box, "backlog/ox", n, poison, time.time() - 3600)
    head = box.head()

    cfg = InfluxSection(api="v1", url=influxd.url, database=influx_db)
    renderer = RenderedBacklog()
    worker = SinkWorker(box, lambda: InfluxSink(cfg), "influx", batch_size=500, renderer=renderer)
    working = asyncio.create_task(worker.run())

    def stored() -> list[int]:
        rows = influxd.query(influx_db, 'SELECT "seq" FROM "vitals"')
        return [int(v[1]) for v in rows[0]["values"]] if rows else []

    try:
        await wait_for(lambda: worker.delivered + worker.rejected == n, 60)
        assert sorted(stored()) == [i + 1 for i in range(n) if i != poison]  # each once, the poison aside
        assert worker.rejected == 1 and await box.rejected_count() == 1
        assert worker.offloaded >= n - 500  # only the batch holding the poison went the in-process way
        assert box.cursor("influx") == head
        await wait_for(lambda: not renderer.running, 5)  # the renderer process ends with the backlog
    finally:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
        await box.close()


async def test_a_rejection_a_full_disk_cannot_record_keeps_the_poison_and_the_cursor_until_space_returns(
    small_fs: Path, influxd: Any, influx_db: str
) -> None:
    """Disk full (`retryable`): the rejected pile cannot take the poison, so the sink is retried like a lost link;
    the cursor stays in front of the poison (in memory too) and nothing is lost or skipped once space returns."""
    box = Outbox(small_fs / "outbox.sqlite3", sinks=("influx",))
    await box.open()
    n, poison = 20, 7
    await _put_with_poison(box, "room/ox", n, poison, time.time() - 60)
    poison_id = box.head() - n + poison + 1
    filler = fill(small_fs)
    cfg = InfluxSection(api="v1", url=influxd.url, database=influx_db)
    worker = SinkWorker(box, lambda: InfluxSink(cfg), "influx", batch_size=50, backoff=Backoff(0.05, 0.2))
    working = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: "cannot record a rejection" in worker.last_error, 20)
        assert box.cursor("influx") == poison_id - 1  # up to the poison, not over it
        assert worker.rejected == 0 and worker.delivered == poison
        filler.unlink()
        await wait_for(lambda: worker.delivered + worker.rejected == n, 20)
        assert worker.rejected == 1 and await box.rejected_count() == 1
        assert box.cursor("influx") == box.head()
    finally:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
        await box.close()


KILLED_WHILE_RENDERING = """
import asyncio, os, signal, sys
from pathlib import Path
from gateway.sink_worker import RenderedBacklog

def children() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.append(int(entry.name))
    return found

async def main() -> None:
    renderer = RenderedBacklog()
    renderer.start("influx")
    if sys.argv[2] == "started":
        await renderer.ready()
    else:  # the gateway dies as soon as the renderer process exists, while it is still importing
        while not any(b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children()):
            await asyncio.sleep(0.001)
    print(" ".join(map(str, children())), flush=True)
    import gc
    import multiprocessing.synchronize

    locks = [o for o in gc.get_objects() if isinstance(o, multiprocessing.synchronize.SemLock)]
    names = {f"/dev/shm/sem.{lock._semlock.name.lstrip('/')}" for lock in locks if lock._semlock.name}
    print(" ".join(sorted(names)), flush=True)  # the pool's named semaphores (POSIX shared memory files)
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":  # the renderer is spawned: it imports this file again
    asyncio.run(main())
"""


@pytest.mark.parametrize("when", ["starting", "started"])
def test_the_renderer_process_does_not_outlive_a_killed_gateway(tmp_path: Path, when: str) -> None:
    """Also the "leaked semaphore objects" warning after a SIGKILL (issue 15): multiprocessing's resource tracker,
    a process of its own, unlinks the pool's named semaphores when the gateway is gone and says so; the test checks
    that it did (no semaphore of the pool left in /dev/shm), which makes the warning a report, not a leak."""
    script = tmp_path / "gateway_stand_in.py"
    script.write_text(KILLED_WHILE_RENDERING)
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:  # files: a pipe would wait for the orphans holding it
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "outbox.sqlite3"), when],
            stdout=stdout,
            stderr=stderr,
            timeout=30,
            cwd=Path(__file__).parents[2],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
            check=False,
        )
    assert result.returncode == -signal.SIGKILL, err.read_text()
    lines = out.read_text().splitlines()
    pids = [int(p) for p in lines[0].split()]
    semaphores = [Path(p) for p in lines[1].split()] if len(lines) > 1 else []
    assert pids, "the renderer (and multiprocessing's resource tracker) should have been started"
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # leave nothing behind, then fail
    assert not alive, f"still running after the gateway was killed: {alive}"
    left = [p.name for p in semaphores if p.exists()]
    assert not left, f"named semaphores left behind: {left}"
