"""Every host-command exchange through real ptys, with the real CLI on both sides.

`infusion-telemetry simulate` serves each device from its emulator on a pty (as separate processes, as engineers run
them) and `infusion-telemetry run` reads them, into a real mosquitto and influxd. Each device here only yields
readings if the gateway's commands reached it over the pty and were understood:
- a Nonin whose stored format is DF8 sends DF7 packets only after the gateway's set-format command in its 5-s window
  (DF8 records cannot pass the DF7 checksums);
- a Contec CMS50 is silent until the gateway's start command;
- a SunTech cuff measures only when the gateway starts a measurement, here from its schedule (`measure_every_s`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.config import MqttSection
from gateway.sinks.mqtt import subscribe
from tests.helpers import start_gateway, stop_gateway, wait_for, write_gateway_config


@contextmanager
def simulators(*args: list[str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`python -m gateway simulate ARGS` for each ARGS; stopped with SIGTERM, as an engineer's Ctrl-C would."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "simulate", *a],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for a in args
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


async def test_nonin_format_contec_start_and_scheduled_nibp_over_real_ptys(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    nonin, contec, rooms = tmp_path / "nonin", tmp_path / "contec", tmp_path / "rooms"
    cuff = rooms / "room-5" / "cuff"
    config = write_gateway_config(
        tmp_path,
        "gw-devices",
        mosquitto.port,
        influxd.url,
        influx_db,
        f"""
[[devices]]
room = "5"
name = "nonin"
model = "nonin-df7"
port = "{nonin}"
[[devices]]
room = "5"
name = "contec"
model = "contec-cms50"
port = "{contec}"
[[devices]]
room = "5"
name = "cuff"
model = "suntech-advantage"
port = "{cuff}"
measure_every_s = 60
""",
    )
    readings: dict[str, list[dict[str, Any]]] = {"nonin": [], "contec": [], "cuff": []}

    async def collect() -> None:
        mqtt = MqttSection(host="127.0.0.1", port=mosquitto.port)
        async with subscribe(mqtt, ["infusion/test-site/5/+/reading"], "devices-observer") as messages:
            async for topic, payload in messages:
                readings[topic.split("/")[3]].append(json.loads(payload))

    collecting = asyncio.create_task(collect())
    with simulators(
        ["--model", "nonin-df8", "--pty", "--link", str(nonin), "--seed", "3"],
        ["--model", "contec-cms50", "--pty", "--link", str(contec), "--seed", "4"],
        # --room serves a Masimo oximeter and a SunTech cuff; the cuff's inflation (25 s) runs 10x faster here
        ["--room", "5", "--link-dir", str(rooms), "--speed", "10"],
    ):
        await wait_for(lambda: nonin.exists() and contec.exists() and cuff.exists(), 15)
        proc = start_gateway(config)
        try:
            await wait_for(lambda: len(readings["nonin"]) >= 3 and len(readings["contec"]) >= 3, 30)
            # the first scheduled measurement starts 5 s after the port opens; inflation takes 2.5 s at speed 10
            await wait_for(lambda: len(readings["cuff"]) >= 1, 30)
        finally:
            out = stop_gateway(proc)
    collecting.cancel()
    await asyncio.gather(collecting, return_exceptions=True)

    for r in readings["nonin"]:  # the baseline scenario: a resting adult
        assert r["model"] == "nonin-df7"
        assert 90 <= r["metrics"]["spo2"] <= 100 and 40 <= r["metrics"]["pulse_rate"] <= 140, r
    for r in readings["contec"]:
        assert 90 <= r["metrics"]["spo2"] <= 100 and 40 <= r["metrics"]["pulse_rate"] <= 140, r
    bp = readings["cuff"][0]["metrics"]
    assert 80 <= bp["nibp_systolic"] <= 180 and 40 <= bp["nibp_diastolic"] < bp["nibp_systolic"], bp
    assert "scheduled measurement skipped" not in out

    def stored() -> dict[str, int]:
        rows = influxd.query(influx_db, 'SELECT count("seq") FROM "vitals" GROUP BY "device"')
        return {row["tags"]["device"]: int(row["values"][0][1]) for row in rows}

    # every reading published before the stop was committed first, and SIGTERM flushes the InfluxDB sink
    await wait_for(lambda: all(stored().get(d, 0) >= len(readings[d]) for d in readings), 10)
