"""Backlog drain: an outage left K readings in the outbox; the gateway starts, live devices keep talking.

Measures readings/s into InfluxDB and onto MQTT while the backlog drains, and the live readings' delay meanwhile
(MQTT arrival minus the gateway's receive time: the part of the delay the backlog could add to) at a subscriber to
the live rooms, as a wall would be. The replayed backlog is counted by a subscriber in its own process, and the
InfluxDB count is queried off the event loop, so that neither delays the live subscriber's arrival stamps."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.harness import collector, percentiles, rig, wait_until
from devices.base import Reading, Sample
from devices.registry import get_model
from gateway.envelope import origin_for, parse_iso_ns, reading_record
from gateway.outbox import Outbox

BACKLOG_COUNT = """SELECT count("seq") FROM "vitals" WHERE "room" = 'backlog'"""


async def prefill(path: Path, k: int) -> None:
    """What an outage leaves behind: K committed readings neither sink has."""
    box = Outbox(path, sinks=("mqtt", "influx"))
    await box.open()
    origin = origin_for("bench", "backlog", "oximeter", get_model("masimo-ascii1").spec)
    start = time.time() - 3600
    for i in range(k):
        reading = Reading({"spo2": 90 + i % 9, "pulse_rate": 60 + i % 40, "perfusion_index": 3.5})
        box.put(
            "backlog/oximeter",
            box.next_seq("backlog/oximeter"),
            reading_record(origin, i + 1, start + i * 0.05, reading),
        )
        if i % 5000 == 4999:
            await box.flush()
    await box.close()


async def measure(workdir: Path, k: int = 50_000, live_devices: int = 10) -> dict[str, Any]:
    masimo = get_model("masimo-ascii1")
    devices = [(str(i), "oximeter", "masimo-ascii1") for i in range(live_devices)]
    with rig(workdir) as r:
        await prefill(workdir / "gateway" / "outbox.sqlite3", k)
        endpoints = r.open_ptys(devices)
        live_topics = [f"infusion/bench/{room}/{name}/reading" for room, name, _ in devices]
        counter = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.counter",
            str(r.broker.port),
            "infusion/bench/backlog/+/reading",
            str(k),
            stdout=asyncio.subprocess.PIPE,
        )
        assert counter.stdout is not None
        assert (await counter.stdout.readline()).strip() == b"ready", "the backlog counter did not subscribe"
        counted = asyncio.create_task(counter.stdout.readline())
        async with (
            collector(r.broker.port, live_topics) as got,
            collector(r.broker.port, ["infusion/bench/_gateway/+/status"]) as gateway_status,
        ):
            t0, t_wall0 = time.monotonic(), time.time()
            r.start_gateway(r.config(devices))
            # live devices start talking once the gateway is up (its broker link included): start-up is not drain
            online = await wait_until(lambda: any(m.get("state") == "online" for _a, _t, m in gateway_status), 30)
            assert online, "the gateway did not come online within 30 s"
            online_s = time.monotonic() - t0
            influx_done: list[float] = []
            mqtt_done: list[float] = []
            second = 0
            while time.monotonic() - t0 < 120 and not (influx_done and mqtt_done):
                for i, endpoint in enumerate(endpoints):  # independent devices: each at its own phase
                    when = datetime(2026, 1, 1) + timedelta(seconds=second)
                    endpoint.write(masimo.encode(Sample({"spo2": 97, "pulse_rate": 70 + i}, device_time=when)))
                    await asyncio.sleep(1.0 / len(endpoints))
                    if not mqtt_done and counted.done():
                        line = counted.result().decode().strip()
                        assert line, "the backlog counter stopped before counting the whole backlog"
                        mqtt_done.append(float(line) - t0)
                    # the count query runs off this loop: a blocking HTTP call here would stamp live arrivals late
                    if not influx_done and await asyncio.to_thread(r.count, BACKLOG_COUNT) >= k:
                        influx_done.append(time.monotonic() - t0)
                second += 1
            counted.cancel()
            if counter.returncode is None:
                counter.kill()
            await counter.wait()
            live = [arrived - parse_iso_ns(m["time"]) / 1e9 for arrived, _t, m in got]
            influx_end = t_wall0 + influx_done[0] if influx_done else float("inf")
            during = [arrived - parse_iso_ns(m["time"]) / 1e9 for arrived, _t, m in got if arrived <= influx_end]
            after = [arrived - parse_iso_ns(m["time"]) / 1e9 for arrived, _t, m in got if arrived > influx_end]
    return {
        "backlog": k,
        "live_devices": live_devices,
        "gateway_online_s": round(online_s, 2),
        "influx_drain_s": round(influx_done[0], 1) if influx_done else None,
        "influx_readings_per_s": round(k / influx_done[0]) if influx_done else None,
        "mqtt_drain_s": round(mqtt_done[0], 1) if mqtt_done else None,
        "mqtt_readings_per_s": round(k / mqtt_done[0]) if mqtt_done else None,
        "live_during_drain": percentiles(live),
        "live_while_influx_drains": percentiles(during),
        "live_after_influx_drained": percentiles(after),
        "note": "drain times from the gateway's start (online after gateway_online_s); InfluxDB read every 0.1 s",
        "live_median_ms": round(statistics.median(live) * 1000, 2) if live else None,
    }


def main() -> None:
    """`python -m benchmarks.drain [K]`: this figure alone (`make bench` runs it with the others)."""
    import json
    import tempfile

    k = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    result = asyncio.run(measure(Path(tempfile.mkdtemp(prefix="bench-drain-")), k, 10))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
