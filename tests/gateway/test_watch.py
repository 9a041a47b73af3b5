"""The terminal wall: live values only while fresh, alarms by priority, removed alarms gone, cuffs with their age."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console

from gateway.records import iso_utc
from gateway.watch import Wall


def msg(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def render(wall: Wall, now: float) -> str:
    console = Console(record=True, width=160)
    console.print(wall.render(now))
    return console.export_text()


def test_wall_shows_fresh_values_alarms_and_never_stale_numbers() -> None:
    now = time.time()
    wall = Wall()
    base = {"site": "s", "device": "ox", "model": "masimo-ascii1", "kind": "pulse_oximeter"}
    wall.apply("infusion/s/1/ox/status", msg(type="status", room="1", state="ok", **base))
    wall.apply("infusion/s/2/ox/status", msg(type="status", room="2", state="ok", **base))
    wall.apply(
        "infusion/s/1/ox/reading",
        msg(type="reading", room="1", time=iso_utc(now - 1), metrics={"spo2": 87}, flags=[], **base),
    )
    wall.apply(
        "infusion/s/2/ox/reading",
        msg(type="reading", room="2", time=iso_utc(now - 60), metrics={"spo2": 99}, flags=[], **base),
    )
    topic = "infusion/s/1/alarms/active/ox/spo2-low"
    wall.apply(
        topic,
        msg(
            type="alarm", room="1", rule="spo2-low", priority="high", message="SpO2 low", value=87, transition="raised"
        ),
    )
    text = render(wall, now)
    assert "87 %" in text and "HIGH SpO2 low (87)" in text
    assert "99" not in text and "NO DATA" in text  # room 2's value is a minute old: never shown as live
    wall.apply(topic, b"")  # the alarm ended: the retained message was removed
    assert "HIGH" not in render(wall, now)


def test_cuff_shows_last_pressure_with_its_age_and_session_time() -> None:
    now = time.time()
    wall = Wall()
    base = {"site": "s", "room": "3", "device": "cuff", "model": "suntech-advantage", "kind": "nibp"}
    wall.apply("infusion/s/3/cuff/status", msg(type="status", state="ok", **base))
    wall.apply(
        "infusion/s/3/cuff/reading",
        msg(
            type="reading",
            time=iso_utc(now - 300),
            metrics={"nibp_systolic": 141, "nibp_diastolic": 90},
            flags=[],
            **base,
        ),
    )
    wall.apply(
        "infusion/s/3/session", msg(type="session", room="3", transition="baseline", started=iso_utc(now - 1800))
    )
    text = render(wall, now)
    assert "141/90 mmHg, 5 min ago" in text
    assert "session 30 min" in text
    assert "NO DATA" not in text
