"""Alarms that cannot be silently defeated, end to end: scenario bytes on a real pty -> the real gateway CLI ->
real mosquitto and influxd.

- a desaturation the device flags with low perfusion raises its alarm, marked with the flag;
- silence after a borderline value raises `no_data` and nothing else (no alarm from the held value);
- an alarm survives a SIGKILL of the gateway and is acknowledged after the restart;
- standby suspends a room's alarms, is shown on MQTT and in InfluxDB, and expires on its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path
from typing import Any

from gateway.commands import command_payload
from gateway.config import MqttSection
from gateway.sinks.mqtt import request, subscribe
from simulators.serve import serve
from tests.helpers import start_gateway, stop_gateway, wait_for
from tests.integration.test_gateway_e2e import write_config

PROFILE = """
[alarms]
profile = "e2e-test"
tick_s = 0.1
[[alarms.rules]]
id = "spo2-low"
metric = "spo2"
below = 90
priority = "medium"
delay_s = {delay}
clear_delay_s = 0.5
hysteresis = 1
latching = {latching}
escalate_after_s = {escalate}
"""


def profile(delay: float = 0.5, latching: bool = False, escalate: float = 600) -> str:
    return PROFILE.format(delay=delay, latching=str(latching).lower(), escalate=escalate)


def scenario(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(body)
    return path


class Room7:
    """Everything published for room 7: alarm events, retained topics (empty payload = removed), replies."""

    def __init__(self, port: int) -> None:
        self.cfg = MqttSection(host="127.0.0.1", port=port)
        self.events: list[dict[str, Any]] = []
        self.retained: dict[str, bytes] = {}

    async def run(self) -> None:
        async with subscribe(self.cfg, ["infusion/test-site/7/#"], f"room7-{uuid.uuid4().hex[:6]}") as messages:
            async for topic, payload in messages:
                if topic.endswith("/alarms/events"):
                    self.events.append(json.loads(payload))
                elif "/alarms/active/" in topic or topic.endswith("/mode"):
                    self.retained[topic] = payload

    def transitions(self, rule: str | None = None) -> list[tuple[str, str]]:
        return [(e["rule"], e["transition"]) for e in self.events if rule is None or e["rule"] == rule]

    async def command(self, **fields: Any) -> dict[str, Any]:
        command_id = uuid.uuid4().hex[:12]
        payload = command_payload(id=command_id, **fields)
        reply: dict[str, Any] = json.loads(
            await request(self.cfg, "infusion/test-site/7/command", payload, command_id, 10.0)
        )
        return reply


async def run_case(
    tmp_path: Path, mosquitto: Any, influxd: Any, db: str, scenario_text: str, profile_text: str
) -> tuple[Room7, asyncio.Task[None], asyncio.Task[Any], Path]:
    link = tmp_path / "room7-oximeter"
    config = write_config(tmp_path, mosquitto.port, influxd.url, db, link, profile_text)
    room = Room7(mosquitto.port)
    collecting = asyncio.create_task(room.run())
    simulating = asyncio.create_task(
        serve("masimo-ascii1", scenario(tmp_path, scenario_text), pty=True, link=link, speed=1.0, duration_s=600)
    )
    await wait_for(lambda: link.exists(), 5)
    return room, collecting, simulating, config


async def finish(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def stored(influxd: Any, db: str, query: str) -> list[list[Any]]:
    rows = influxd.query(db, query)
    return rows[0]["values"] if rows else []


LOW_PERFUSION = """
duration_s = 600
[[keyframes]]
t = 0
spo2 = 97
pulse_rate = 70
perfusion_index = 0.3
[[keyframes]]
t = 1
spo2 = 85
conditions = ["low_perfusion"]
"""


async def test_a_desaturation_flagged_low_perfusion_raises_its_alarm(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    room, collecting, simulating, config = await run_case(
        tmp_path, mosquitto, influxd, influx_db, LOW_PERFUSION, profile()
    )
    proc = start_gateway(config)
    try:
        await wait_for(lambda: ("spo2-low", "raised") in room.transitions(), 20)
        raised = next(e for e in room.events if e["transition"] == "raised")
        assert raised["quality"] == ["low_perfusion"] and raised["value"] < 90
        await wait_for(lambda: bool(stored(influxd, influx_db, 'SELECT "quality" FROM "alarms"')), 15)
        assert stored(influxd, influx_db, 'SELECT "quality" FROM "alarms"')[0][1] == "low_perfusion"
    finally:
        output = stop_gateway(proc)
        await finish(simulating, collecting)
    assert proc.returncode == 0, output


BORDERLINE_THEN_SILENCE = """
duration_s = 600
[[keyframes]]
t = 0
spo2 = 89
pulse_rate = 70
perfusion_index = 3
[[faults]]
t = 2
duration_s = 300
kind = "silence"
"""


async def test_silence_after_a_borderline_value_raises_no_data_and_nothing_else(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    """The delay (8 s) and escalation (5 s more) would both have run out on the held 89 by t = 15 s."""
    room, collecting, simulating, config = await run_case(
        tmp_path, mosquitto, influxd, influx_db, BORDERLINE_THEN_SILENCE, profile(delay=8, escalate=5)
    )
    proc = start_gateway(config)
    try:
        await wait_for(lambda: ("no_data", "raised") in room.transitions(), 20)
        await asyncio.sleep(12)  # well past where the held value would have raised and escalated spo2-low
        assert room.transitions() == [("no_data", "raised")]
    finally:
        output = stop_gateway(proc)
        await finish(simulating, collecting)
    assert proc.returncode == 0, output


SHORT_DESATURATION = """
duration_s = 600
[[keyframes]]
t = 0
spo2 = 85
pulse_rate = 70
perfusion_index = 3
[[keyframes]]
t = 6
spo2 = 85
[[keyframes]]
t = 7
spo2 = 97
"""


async def test_an_alarm_survives_a_sigkill_and_is_acknowledged_after_the_restart(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    room, collecting, simulating, config = await run_case(
        tmp_path, mosquitto, influxd, influx_db, SHORT_DESATURATION, profile(latching=True)
    )
    proc = start_gateway(config)
    topic = "infusion/test-site/7/alarms/active/oximeter/spo2-low"
    try:
        await wait_for(lambda: ("spo2-low", "raised") in room.transitions(), 20)
        proc.send_signal(signal.SIGKILL)  # the alarm event is on MQTT, so its state was committed with it
        proc.wait(10)
        await asyncio.sleep(3)  # the desaturation ends while the gateway is dead: the alarm is latched
        proc = start_gateway(config)
        await wait_for(lambda: ("spo2-low", "resumed") in room.transitions(), 20)
        assert ("spo2-low", "indeterminate") in room.transitions()  # until fresh data came
        reply = await room.command(action="acknowledge", alarm_id="7/oximeter/spo2-low", operator_role="nurse")
        assert reply["ok"] is True, reply
        acked = [("spo2-low", "acknowledged"), ("spo2-low", "cleared")]
        await wait_for(lambda: room.transitions("spo2-low")[-2:] == acked, 10)
        await wait_for(lambda: room.retained.get(topic) == b"", 10)
    finally:
        output = stop_gateway(proc)
        await finish(simulating, collecting)
    assert proc.returncode == 0, output


STEADY_DESATURATION = """
duration_s = 600
[[keyframes]]
t = 0
spo2 = 85
pulse_rate = 70
perfusion_index = 3
"""


async def test_standby_suspends_a_rooms_alarms_shows_everywhere_and_expires(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    room, collecting, simulating, config = await run_case(
        tmp_path, mosquitto, influxd, influx_db, STEADY_DESATURATION, profile()
    )
    proc = start_gateway(config)
    mode_topic = "infusion/test-site/7/mode"
    try:
        await wait_for(lambda: ("spo2-low", "raised") in room.transitions(), 20)
        reply = await room.command(action="standby", standby_s=6, operator_role="nurse")
        assert reply["ok"] is True, reply
        await wait_for(lambda: ("spo2-low", "suspended") in room.transitions(), 5)
        await wait_for(lambda: json.loads(room.retained.get(mode_topic) or b"{}").get("mode") == "standby", 5)
        await wait_for(
            lambda: bool(stored(influxd, influx_db, 'SELECT "mode" FROM "room_mode" WHERE "mode" = \'standby\'')),
            15,
        )
        suspended_at = len(room.events)
        await asyncio.sleep(3)
        assert room.events[suspended_at:] == []  # SpO2 85 all along: nothing is judged in standby
        await wait_for(lambda: json.loads(room.retained.get(mode_topic) or b"{}").get("mode") == "monitoring", 10)
        assert json.loads(room.retained[mode_topic])["reason"] == "standby expired"
        await wait_for(lambda: room.transitions()[-1:] == [("spo2-low", "raised")], 10)
    finally:
        output = stop_gateway(proc)
        await finish(simulating, collecting)
    assert proc.returncode == 0, output
