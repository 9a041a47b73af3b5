"""Room commands through the real Gateway wiring: acknowledge and sessions, recorded in the outbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from devices.base import Reading
from gateway.app import Gateway
from gateway.commands import command_payload
from gateway.config import Config
from gateway.envelope import AlarmMessage, Envelope, SessionMessage

R = TypeVar("R", bound=Envelope)


def config(tmp_path: Path) -> Config:
    return Config(
        gateway={"site": "s", "id": "gw", "data_dir": tmp_path},
        influx={"api": "v1", "database": "x"},
        alarms={
            "profile": "test",
            "rules": [{"id": "spo2-low", "metric": "spo2", "below": 90, "priority": "high", "latching": True}],
        },
        devices=[
            {"room": "3", "name": "ox", "model": "masimo-ascii1", "port": "/dev/null"},
        ],
    )


def command(gw: Gateway, topic: str, **fields: Any) -> dict[str, Any]:
    raw = gw.router.handle(f"infusion/s/{topic}", command_payload(**fields))
    assert raw is not None
    reply: dict[str, Any] = json.loads(raw)
    return reply


async def records(gw: Gateway, kind: type[R]) -> list[R]:
    await gw.outbox.flush()
    return [it.record for it in await gw.outbox.read(0, limit=1000) if isinstance(it.record, kind)]


async def test_acknowledge_a_latched_alarm_by_mqtt_command(tmp_path: Path) -> None:
    gw = Gateway(config(tmp_path))
    await gw.outbox.open()
    ox = gw.sessions[0]
    gw._emit(ox, Reading({"spo2": 85}), 100.0)
    gw._emit(ox, Reading({"spo2": 97}), 101.0)  # condition gone, but the alarm latches
    assert [r.transition for r in await records(gw, AlarmMessage)] == ["raised"]

    bad = command(gw, "3/command", id="c1", action="acknowledge", alarm_id="3/ox/nope", operator_role="nurse")
    assert bad == {**bad, "ok": False, "id": "c1"} and "no such active alarm" in bad["reason"]
    wrong_room = command(
        gw, "4/command", id="c2", action="acknowledge", alarm_id="3/ox/spo2-low", operator_role="nurse"
    )
    assert wrong_room["ok"] is False and "no such room" in wrong_room["reason"]
    missing = command(gw, "3/command", id="c3", action="acknowledge", operator_role="nurse")
    assert missing["ok"] is False and "acknowledge needs alarm_id" in missing["reason"]

    ok = command(gw, "3/command", id="c4", action="acknowledge", alarm_id="3/ox/spo2-low", operator_role="nurse")
    assert ok["ok"] is True
    alarms = await records(gw, AlarmMessage)
    assert [(r.transition, r.role) for r in alarms] == [
        ("raised", None),
        ("acknowledged", "nurse"),
        ("cleared", None),
    ]
    assert alarms[-1].active is False
    await gw.outbox.close()


async def test_sessions_by_command_and_baseline_from_the_first_pressure(tmp_path: Path) -> None:
    gw = Gateway(config(tmp_path))
    await gw.outbox.open()
    started = command(gw, "3/command", id="s1", action="start_session", operator_role="nurse")
    assert started["ok"] is True and started["reason"].startswith("session 3-")
    again = command(gw, "3/command", id="s2", action="start_session", operator_role="nurse")
    assert again["ok"] is False and "already has a session" in again["reason"]
    gw._emit(gw.sessions[0], Reading({"nibp_systolic": 121, "nibp_diastolic": 79, "nibp_mean": 93}), 200.0)
    assert command(gw, "3/command", id="s3", action="stop_session", operator_role="nurse")["ok"] is True
    sessions = await records(gw, SessionMessage)
    assert [s.transition for s in sessions] == ["started", "baseline", "stopped"]
    assert sessions[1].baseline == {"nibp_systolic": 121, "nibp_diastolic": 79, "nibp_mean": 93}
    assert sessions[0].room == "3" and sessions[0].device == "_room"
    await gw.outbox.close()


async def test_records_of_one_device_never_share_a_time(tmp_path: Path) -> None:
    """InfluxDB keeps one point per series and time: lines that arrive in one read (the same receive time) and an
    acknowledgement with the clear it causes must not overwrite each other there (found under CPU load: 109 of 200
    readings missing from InfluxDB after a disk-full test)."""
    gw = Gateway(config(tmp_path))
    await gw.outbox.open()
    ox = gw.sessions[0]
    for spo2 in (85, 86, 87):
        gw._emit(ox, Reading({"spo2": spo2}), 100.0)  # one read, three lines
    command(gw, "3/command", id="c9", action="acknowledge", alarm_id="3/ox/spo2-low", operator_role="nurse")
    gw._emit(ox, Reading({"spo2": 97}), 100.5)
    await gw.outbox.flush()
    times = [it.decoded().time for it in await gw.outbox.read(0, limit=1000) if it.decoded().room == "3"]
    assert len(times) == len(set(times)) and times == sorted(times)
    await gw.outbox.close()
