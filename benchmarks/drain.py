"""Backlog drain: an outage left K readings in the outbox; the gateway starts, live devices keep talking.

Measures readings/s into InfluxDB and onto MQTT while the backlog drains, and the live readings' delay meanwhile
(MQTT arrival minus the gateway's receive time: the part of the delay the backlog could add to) at a subscriber to
the live rooms, as a wall would be; the replayed backlog is counted by a second subscriber in the same process."""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.harness import collector, percentiles, rig
from devices.base import Reading, Sample
from devices.registry import get_model
from gateway.outbox import Outbox
from gateway.records import origin_for, parse_iso_ns, reading_record

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
        async with (
            collector(r.broker.port, live_topics) as got,
            collector(r.broker.port, ["infusion/bench/backlog/+/reading"], parse=False) as replayed,
        ):
            t0 = time.monotonic()
            r.start_gateway(r.config(devices))
            influx_done: list[float] = []
            mqtt_done: list[float] = []
            second = 0

            def backlog_on_mqtt() -> int:
                return len(replayed)

            while time.monotonic() - t0 < 120 and not (influx_done and mqtt_done):
                for i, endpoint in enumerate(endpoints):  # independent devices: each at its own phase
                    when = datetime(2026, 1, 1) + timedelta(seconds=second)
                    endpoint.write(masimo.encode(Sample({"spo2": 97, "pulse_rate": 70 + i}, device_time=when)))
                    await asyncio.sleep(1.0 / len(endpoints))
                    if not mqtt_done and backlog_on_mqtt() >= k:
                        mqtt_done.append(time.monotonic() - t0)
                    if not influx_done and r.count(BACKLOG_COUNT) >= k:
                        influx_done.append(time.monotonic() - t0)
                second += 1
            live = [arrived - parse_iso_ns(m["time"]) / 1e9 for arrived, _t, m in got]
    return {
        "backlog": k,
        "live_devices": live_devices,
        "influx_drain_s": round(influx_done[0], 1) if influx_done else None,
        "influx_readings_per_s": round(k / influx_done[0]) if influx_done else None,
        "mqtt_drain_s": round(mqtt_done[0], 1) if mqtt_done else None,
        "mqtt_readings_per_s": round(k / mqtt_done[0]) if mqtt_done else None,
        "live_during_drain": percentiles(live),
        "note": "drain times include the gateway's start-up (about 1 s) and are read every 1/live_devices s",
        "live_median_ms": round(statistics.median(live) * 1000, 2) if live else None,
    }
