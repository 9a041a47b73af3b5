"""Added delay from the write of the byte that completes a frame on the pty to (a) the reading and (b) the alarm
message at an MQTT subscriber, with every event committed to the durable outbox first (fsync'd) before it is sent.

Run: `.venv/bin/python -m benchmarks.latency --devices 10 --seconds 30`. Each simulated Masimo Rad-8 sends one line
a second; SpO2 alternates between 85 and 98 under a rule "spo2 below 90, no delay, no clear delay", so every other
line raises an alarm and the next clears it. The subscriber runs in this process, on the same clock as the writer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import collector, percentiles, rig, wait_until
from devices.base import Sample
from devices.registry import get_model

RULE = """
[alarms]
profile = "latency-bench"
tick_s = 0.25
[[alarms.rules]]
id = "spo2-low"
metric = "spo2"
below = 90
priority = "high"
"""


async def measure(workdir: Path, devices: int, seconds: float, burst: bool = False) -> dict[str, Any]:
    """burst=False: each device writes at its own phase within the second (independent devices, as in the load
    benchmark and the peer's figures). burst=True: all devices write at the same instant, the worst case."""
    model = get_model("masimo-ascii1")
    spec = [(str(i + 1), "oximeter", "masimo-ascii1") for i in range(devices)]
    with rig(workdir) as r:
        endpoints = r.open_ptys(spec)
        r.start_gateway(r.config(spec, RULE))
        async with collector(
            r.broker.port,
            ["infusion/bench/+/oximeter/reading", "infusion/bench/+/alarms/events", "infusion/bench/+/oximeter/status"],
        ) as got:
            connected = await wait_until(
                lambda: sum(1 for _, t, m in got if t.endswith("/status") and m.get("state") == "connected") >= devices,
                30,
            )
            if not connected:
                raise RuntimeError(f"the gateway did not open all ptys; see {workdir / 'gateway.log'}")
            written: dict[str, list[float]] = {str(i + 1): [] for i in range(devices)}
            lines = int(seconds)
            start = time.monotonic()
            for k in range(lines):
                for i, endpoint in enumerate(endpoints):
                    spo2 = 85 if k % 2 == 0 else 98
                    frame = model.encode(
                        Sample(
                            {"spo2": spo2, "pulse_rate": 72, "perfusion_index": 3.5}, device_time=datetime(2026, 1, 1)
                        )
                    )
                    endpoint.write(frame)
                    written[str(i + 1)].append(time.time())
                    if burst:
                        await asyncio.sleep(0)
                    else:  # independent devices: each at its own phase within the second
                        await asyncio.sleep(max(0.0, start + k + (i + 1) / devices - time.monotonic()))
                await asyncio.sleep(max(0.0, start + (k + 1) - time.monotonic()))
            await wait_until(lambda: sum(1 for _, t, _m in got if t.endswith("/reading")) >= lines * devices, 30)
            await asyncio.sleep(1.0)
    reading_lat: list[float] = []
    alarm_lat: list[float] = []
    per_room: dict[str, int] = {}
    for arrived, topic, msg in got:
        room = msg.get("room", "")
        if topic.endswith("/reading"):
            k = per_room.get(room, 0)
            per_room[room] = k + 1
            if k < len(written[room]):
                reading_lat.append(arrived - written[room][k])
        elif topic.endswith("/events") and msg.get("transition") == "raised":
            sent = [t for t in written[room] if t <= arrived]
            alarm_lat.append(arrived - sent[-1])
    return {
        "devices": devices,
        "mode": "burst" if burst else "spread",
        "lines": lines * devices,
        "readings_received": sum(per_room.values()),
        "reading": percentiles(reading_lat),
        "alarm": percentiles(alarm_lat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[10])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--burst", action="store_true", help="all devices write at the same instant (worst case)")
    args = parser.parse_args()
    for n in args.devices:
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
            result = asyncio.run(measure(Path(tmp), n, args.seconds, args.burst))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
