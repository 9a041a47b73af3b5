"""Alarms end to end: scenario bytes on a real pty -> the real gateway -> alarm events on MQTT and in InfluxDB.

Desaturation, probe off and a pulled cable each raise the expected alarm and clear it; the retained active-alarm
topic appears and is removed. Delays are shortened by the test's own profile (wall-clock seconds), since the
simulator runs faster than real time.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec

from gateway.config import MqttSection
from gateway.envelope import AlarmMessage
from gateway.sinks.mqtt import subscribe
from simulators.serve import serve
from tests.helpers import start_gateway, stop_gateway, wait_for
from tests.integration.test_gateway_e2e import write_config

SCENARIO = """
description = "desaturation, probe off, cable pulled: one after the other"
duration_s = 60
[[keyframes]]
t = 0
spo2 = 98
pulse_rate = 72
perfusion_index = 3.5
[[keyframes]]
t = 4
spo2 = 85
[[keyframes]]
t = 12
spo2 = 85
[[keyframes]]
t = 13
spo2 = 98
[[keyframes]]
t = 18
conditions = ["probe_off"]
missing = ["spo2", "pulse_rate", "perfusion_index"]
[[keyframes]]
t = 24
[[faults]]
t = 30
duration_s = 6
kind = "unplug"
"""

PROFILE = """
[alarms]
profile = "e2e-test"
tick_s = 0.1
[[alarms.rules]]
id = "spo2-low"
metric = "spo2"
below = 90
priority = "high"
delay_s = 0.5
clear_delay_s = 0.5
hysteresis = 1
[alarms.technical.sensor]
priority = "medium"
delay_s = 0.5
[alarms.technical.device_disconnected]
priority = "high"
delay_s = 0.5
"""


async def test_desaturation_probe_off_and_unplug_raise_and_clear_alarms(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    scenario = tmp_path / "sequence.toml"
    scenario.write_text(SCENARIO)
    link = tmp_path / "room7-oximeter"
    config = write_config(tmp_path, mosquitto.port, influxd.url, influx_db, link, PROFILE)
    events: list[dict[str, Any]] = []
    retained: dict[str, bytes] = {}

    async def collect() -> None:
        cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
        async with subscribe(cfg, ["infusion/test-site/7/alarms/#"], "alarm-collector") as messages:
            async for topic, payload in messages:
                if topic.endswith("/events"):
                    events.append(json.loads(payload))
                else:
                    retained[topic] = payload

    collecting = asyncio.create_task(collect())
    simulating = asyncio.create_task(serve("masimo-ascii1", scenario, pty=True, link=link, speed=3.0, duration_s=60))
    await wait_for(lambda: link.exists(), 5)
    proc = start_gateway(config)
    try:

        def transitions(rule: str) -> list[str]:
            return [e["transition"] for e in events if e["rule"] == rule]

        await wait_for(lambda: transitions("spo2-low") == ["raised", "cleared"], 25)
        raised = next(e for e in events if e["rule"] == "spo2-low")
        msgspec.convert(raised, AlarmMessage)
        assert raised["value"] < 90 and raised["limit"] == 90 and raised["priority"] == "high"
        assert raised["alarm_id"] == "7/oximeter/spo2-low" and raised["profile"] == "e2e-test"
        await wait_for(lambda: transitions("sensor") == ["raised", "cleared"], 20)
        assert not [
            e for e in events if e["rule"] == "spo2-low" and e["time"] > raised["time"] and e["transition"] == "raised"
        ]
        try:
            await wait_for(lambda: transitions("device_disconnected") == ["raised", "cleared"], 30)
        except AssertionError:
            raise AssertionError(f"alarm events seen: {[(e['rule'], e['transition']) for e in events]}") from None
        # While active the alarm was retained; cleared alarms leave an empty retained message (removed). The empty
        # retained message is published right after the "cleared" event, so it may still be on its way.
        for rule in ("spo2-low", "device_disconnected"):
            topic = f"infusion/test-site/7/alarms/active/oximeter/{rule}"
            await wait_for(lambda: retained.get(topic) == b"", 5)  # noqa: B023 - awaited within the iteration

        def stored() -> list[list[Any]]:
            rows = influxd.query(influx_db, 'SELECT "rule", "transition", "value" FROM "alarms" WHERE "room" = \'7\'')
            return rows[0]["values"] if rows else []

        await wait_for(lambda: len(stored()) >= 6, 15)
        in_db = [(r[1], r[2]) for r in stored()]
        for rule in ("spo2-low", "sensor", "device_disconnected"):
            assert (rule, "raised") in in_db and (rule, "cleared") in in_db
    finally:
        output = stop_gateway(proc)
        simulating.cancel()
        collecting.cancel()
        await asyncio.gather(simulating, collecting, return_exceptions=True)
    assert proc.returncode == 0, output
