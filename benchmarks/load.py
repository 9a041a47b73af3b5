"""The gateway under load: N simulated Masimo Rad-8s at 1 line/s each through real ptys, real mosquitto and influxd.

Measures over a steady window: the gateway's CPU share (of one core) and RSS (mean and peak), influxd's and
mosquitto's CPU share, readings/s delivered, and counts every reading on MQTT and in InfluxDB.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.harness import collector, rig, wait_until
from devices.base import Sample
from devices.registry import get_model

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


async def measure(
    workdir: Path,
    devices: list[tuple[str, str, str]],
    warmup_s: float = 8,
    window_s: float = 30,
) -> dict[str, Any]:
    """devices: (room, name, model). Masimo devices get one line a second each, spread over the second."""
    masimo = get_model("masimo-ascii1")
    with rig(workdir) as r:
        endpoints = r.open_ptys(devices)
        gw = r.start_gateway(r.config(devices))
        async with collector(r.broker.port, ["infusion/bench/+/+/reading", "infusion/bench/+/+/status"]) as got:
            n = len(devices)
            ok = await wait_until(
                lambda: len({t for _, t, m in got if t.endswith("/status") and m.get("state") == "connected"}) >= n, 60
            )
            if not ok:
                raise RuntimeError(f"the gateway did not open all {n} ports; see {workdir}/gateway.log")
            sent = 0
            start = time.monotonic()
            total_s = warmup_s + window_s
            marks: dict[str, Any] = {}
            k = 0
            while time.monotonic() - start < total_s:
                second = time.monotonic()
                for i, endpoint in enumerate(endpoints):
                    when = datetime(2026, 1, 1) + timedelta(seconds=k)
                    sample = Sample(
                        {"spo2": 95 + i % 4, "pulse_rate": 60 + k % 30, "perfusion_index": 3.1}, device_time=when
                    )
                    endpoint.write(masimo.encode(sample))
                    sent += 1
                    await asyncio.sleep(max(0.0, second + (i + 1) / n - time.monotonic()))
                k += 1
                elapsed = time.monotonic() - start
                if "t0" not in marks and elapsed >= warmup_s:
                    marks = {
                        "t0": time.monotonic(),
                        "gw0": cpu_seconds(gw.pid),
                        "in0": cpu_seconds(r.influx.pid),
                        "mq0": cpu_seconds(r.broker.pid),
                        "rss": [],
                        "received0": len(got),
                    }
                if "t0" in marks:
                    marks["rss"].append(rss_mb(gw.pid)[0])
            t1 = time.monotonic()
            gw_cpu = cpu_seconds(gw.pid) - marks["gw0"]
            in_cpu = cpu_seconds(r.influx.pid) - marks["in0"]
            mq_cpu = cpu_seconds(r.broker.pid) - marks["mq0"]
            peak = rss_mb(gw.pid)[1]
            window = t1 - marks["t0"]

            def on_mqtt() -> int:
                return sum(1 for _, t, _m in got if t.endswith("/reading"))

            await wait_until(lambda: on_mqtt() >= sent, 60)
            await wait_until(lambda: r.count('SELECT count("seq") FROM "vitals"') >= sent, 60)
            stored = r.count('SELECT count("seq") FROM "vitals"')
            mqtt_count = on_mqtt()
    rss = marks["rss"]
    return {
        "devices": n,
        "lines_sent": sent,
        "on_mqtt": mqtt_count,
        "in_influx": stored,
        "all_counted": mqtt_count >= sent and stored == sent,
        "gateway_cpu_pct": round(100 * gw_cpu / window, 1),
        "gateway_rss_mb_steady": round(sum(rss) / len(rss), 1),
        "gateway_rss_mb_peak": round(peak, 1),
        "influxd_cpu_pct": round(100 * in_cpu / window, 1),
        "mosquitto_cpu_pct": round(100 * mq_cpu / window, 1),
        "readings_per_s": round(n * 1.0, 1),
    }
