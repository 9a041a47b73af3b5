"""A hypertensive crisis end to end: a simulated SunTech cuff on a real pty, measurements started by MQTT command,
the latching severe-hypertension alarms of the example profile raised, acknowledged and cleared."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from gateway.commands import command_payload
from gateway.config import MqttSection
from gateway.sinks.mqtt import request, subscribe
from simulators.serve import serve
from tests.helpers import start_gateway, stop_gateway, wait_for, write_gateway_config

CRISIS = """
description = "above 180/110 for a minute, then back to 130/85"
duration_s = 600
[[keyframes]]
t = 0
nibp_systolic = 192
nibp_diastolic = 116
nibp_mean = 141
nibp_pulse_rate = 96
[[keyframes]]
t = 60
nibp_systolic = 192
nibp_diastolic = 116
nibp_mean = 141
nibp_pulse_rate = 96
[[keyframes]]
t = 61
nibp_systolic = 130
nibp_diastolic = 85
nibp_mean = 100
nibp_pulse_rate = 80
"""


async def test_hypertensive_crisis_raises_latching_alarms_that_clear_after_acknowledgement(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    scenario = tmp_path / "crisis.toml"
    scenario.write_text(CRISIS)
    link = tmp_path / "room7-cuff"
    config = write_gateway_config(
        tmp_path,
        "gw-nibp",
        mosquitto.port,
        influxd.url,
        influx_db,
        f"""
[[devices]]
room = "7"
name = "cuff"
model = "suntech-advantage"
port = "{link}"
""",
    )
    mqtt = MqttSection(host="127.0.0.1", port=mosquitto.port)
    seen: list[dict[str, Any]] = []

    async def collect() -> None:
        async with subscribe(mqtt, ["infusion/test-site/7/#"], "nibp-observer") as messages:
            async for topic, payload in messages:
                if payload and not topic.endswith("/command") and "/active/" not in topic:
                    seen.append(json.loads(payload))

    async def measure() -> dict[str, Any]:
        command_id = uuid.uuid4().hex[:8]
        payload = command_payload(id=command_id, action="start_measurement", operator_role="nurse")
        topic = "infusion/test-site/7/cuff/command"
        reply: dict[str, Any] = json.loads(await request(mqtt, topic, payload, command_id))
        return reply

    def alarms(rule: str) -> list[str]:
        return [m["transition"] for m in seen if m.get("type") == "alarm" and m["rule"] == rule]

    collecting = asyncio.create_task(collect())
    simulating = asyncio.create_task(serve("suntech-advantage", scenario, pty=True, link=link, speed=10.0))
    await wait_for(link.exists, 5)
    proc = start_gateway(config)
    try:
        await wait_for(lambda: any(m.get("state") == "connected" for m in seen), 20)
        assert (await measure())["ok"] is True
        assert (await measure())["reason"] == "a measurement is already running"
        await wait_for(lambda: any(m.get("type") == "reading" for m in seen), 20)
        reading = next(m for m in seen if m.get("type") == "reading")
        assert reading["metrics"]["nibp_systolic"] >= 180 and reading["metrics"]["nibp_diastolic"] >= 110
        await wait_for(lambda: alarms("sys-severe-high") == ["raised"] and alarms("dia-severe-high") == ["raised"], 5)

        ack = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "ack",
                "--room",
                "7",
                "--alarm",
                "7/cuff/sys-severe-high",
                "--role",
                "nurse",
                "--host",
                "127.0.0.1",
                "--port",
                str(mosquitto.port),
                "--site",
                "test-site",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert ack.returncode == 0, ack.stdout + ack.stderr
        await wait_for(lambda: alarms("sys-severe-high") == ["raised", "acknowledged"], 5)

        await asyncio.sleep(6.5)  # scenario time passes 61 s: the pressure is back to 130/85
        assert (await measure())["ok"] is True
        await wait_for(lambda: sum(m.get("type") == "reading" for m in seen) == 2, 20)
        await wait_for(lambda: alarms("sys-severe-high") == ["raised", "acknowledged", "cleared"], 5)
        assert alarms("dia-severe-high") == ["raised"]  # latched: not acknowledged, so it stays

        rows = influxd.query(influx_db, 'SELECT "rule", "transition" FROM "alarms"')
        assert ("sys-severe-high", "cleared") in {(r[1], r[2]) for r in rows[0]["values"]}
    finally:
        stop_gateway(proc)
        simulating.cancel()
        collecting.cancel()
        await asyncio.gather(simulating, collecting, return_exceptions=True)
