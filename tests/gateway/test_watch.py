"""The terminal wall tells the truth: live values only while fresh and valid, never a held value under a device
state that is not ok, STANDBY rooms without values, alarms that cannot be determined without a value, ended
alarms gone, colours from the active profile, and a CONNECTION LOST banner when the broker is away."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console, RenderableType
from rich.style import Style

from clients.watch import PRIORITY_STYLE, Link, Wall, connection_banner, watch_main
from devtools.localservices import find_free_port
from gateway.alarms import AlarmProfile, ThresholdRule
from gateway.envelope import iso_utc

OX = {"site": "s", "device": "ox", "model": "masimo-ascii1", "kind": "pulse_oximeter"}
CUFF = {"site": "s", "device": "cuff", "model": "suntech-advantage", "kind": "nibp"}


def msg(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def render(what: Wall | RenderableType, now: float | None = None) -> str:
    console = Console(record=True, width=160, height=30)
    console.print(what.render(now if now is not None else time.time()) if isinstance(what, Wall) else what)
    return console.export_text()


def style_of(wall: Wall, now: float, needle: str) -> Style:
    """The style the wall draws `needle` in (the text of exactly one segment)."""
    console = Console(width=160)
    found = [s.style for s in console.render(wall.render(now)) if s.text.strip() == needle]
    assert len(found) == 1, f"{needle!r} drawn {len(found)} times"
    return found[0] or Style()


def oximeter(
    wall: Wall, room: str, state: str, now: float, valid: bool = True, flags: tuple[str, ...] = (), **m: float
) -> None:
    wall.apply(f"infusion/s/{room}/ox/status", msg(type="status", room=room, state=state, **OX))
    reading = msg(type="reading", room=room, time=iso_utc(now - 1), metrics=m, flags=list(flags), valid=valid, **OX)
    wall.apply(f"infusion/s/{room}/ox/reading", reading)


def alarm(room: str, transition: str, value: float | None, active: bool = True, **extra: Any) -> bytes:
    return msg(
        type="alarm",
        room=room,
        device="ox",
        rule="spo2-low",
        priority="high",
        message="SpO2 low",
        value=value,
        transition=transition,
        active=active,
        **extra,
    )


def test_wall_shows_fresh_values_alarms_and_never_stale_numbers() -> None:
    now = time.time()
    wall = Wall()
    oximeter(wall, "1", "ok", now, spo2=87)
    wall.apply("infusion/s/2/ox/status", msg(type="status", room="2", state="ok", **OX))
    old = msg(type="reading", room="2", time=iso_utc(now - 60), metrics={"spo2": 99}, flags=[], valid=True, **OX)
    wall.apply("infusion/s/2/ox/reading", old)
    topic = "infusion/s/1/alarms/active/ox/spo2-low"
    wall.apply(topic, alarm("1", "raised", 87))
    text = render(wall, now)
    assert "87 %" in text and "HIGH SpO2 low (87)" in text
    assert "99" not in text and "NO DATA" in text  # room 2's value is a minute old: never shown as live
    assert "example profile colours" in text  # no --config: the shipped example profile, labelled as such
    wall.apply(topic, b"")  # the alarm ended: the retained message was removed
    assert "HIGH" not in render(wall, now)


def test_cuff_shows_last_pressure_with_its_age_and_session_time() -> None:
    now = time.time()
    wall = Wall()
    wall.apply("infusion/s/3/cuff/status", msg(type="status", room="3", state="ok", **CUFF))
    bp = {"nibp_systolic": 141, "nibp_diastolic": 90}
    wall.apply(
        "infusion/s/3/cuff/reading",
        msg(type="reading", room="3", time=iso_utc(now - 300), metrics=bp, flags=[], valid=True, **CUFF),
    )
    wall.apply(
        "infusion/s/3/session", msg(type="session", room="3", transition="baseline", started=iso_utc(now - 1800))
    )
    text = render(wall, now)
    assert "141/90 mmHg, 5 min ago" in text
    assert "session 30 min" in text
    assert "NO DATA" not in text


def test_values_are_coloured_by_the_active_profile_for_that_room_and_device() -> None:
    profile = AlarmProfile(
        name="site-policy",
        rules=(
            ThresholdRule(id="room1-low", metric="spo2", below=95, priority="low", rooms=("1",)),
            ThresholdRule(id="ox-very-low", metric="spo2", below=93, priority="high", devices=("ox",)),
            ThresholdRule(id="elsewhere", metric="spo2", below=99, priority="medium", rooms=("9",)),
            ThresholdRule(id="pr-high", metric="pulse_rate", above=120, priority="medium"),
            ThresholdRule(id="sys-rise", metric="nibp_systolic", above_baseline_pct=10, priority="high"),
        ),
    )
    now = time.time()
    wall = Wall(profile)
    oximeter(wall, "1", "ok", now, spo2=94, pulse_rate=121)  # room1-low only
    oximeter(wall, "2", "ok", now, spo2=92, pulse_rate=60)  # room1-low does not apply; ox-very-low does
    oximeter(wall, "3", "ok", now, spo2=88.5, pulse_rate=61)  # ox-very-low: high, not a fixed "below 90" yellow
    wall.apply("infusion/s/4/cuff/status", msg(type="status", room="4", state="ok", **CUFF))
    bp = {"nibp_systolic": 230, "nibp_diastolic": 95}  # only a baseline rule on systolic: not judged here
    wall.apply(
        "infusion/s/4/cuff/reading",
        msg(type="reading", room="4", time=iso_utc(now - 60), metrics=bp, flags=[], valid=True, **CUFF),
    )
    assert style_of(wall, now, "94 %") == Style.parse(PRIORITY_STYLE["low"])
    assert style_of(wall, now, "121 /min") == Style.parse(PRIORITY_STYLE["medium"])
    assert style_of(wall, now, "92 %") == Style.parse(PRIORITY_STYLE["high"])
    assert style_of(wall, now, "88.5 %") == Style.parse(PRIORITY_STYLE["high"])
    assert style_of(wall, now, "60 /min") == Style.parse("bold")
    assert style_of(wall, now, "230/95 mmHg, 1 min ago") == Style.parse("bold")
    text = render(wall, now)
    assert "colours: profile site-policy" in text and "example profile" not in text


@pytest.mark.parametrize("state", ["probe_off", "no_sensor", "sensor_fault", "searching", "no_data", "disconnected"])
def test_a_state_that_is_not_ok_is_printed_never_the_held_values(state: str) -> None:
    now = time.time()
    wall = Wall()
    oximeter(wall, "1", state, now, spo2=97, pulse_rate=72, perfusion_index=3.5)  # fresh, but held
    text = render(wall, now)
    assert state.upper() in text
    assert "97" not in text and "72" not in text and "3.5" not in text


def test_a_cuff_in_error_shows_the_error_not_its_last_pressure() -> None:
    now = time.time()
    wall = Wall()
    wall.apply("infusion/s/3/cuff/status", msg(type="status", room="3", state="cuff_error", **CUFF))
    bp = {"nibp_systolic": 141, "nibp_diastolic": 90}
    wall.apply(
        "infusion/s/3/cuff/reading",
        msg(type="reading", room="3", time=iso_utc(now - 60), metrics=bp, flags=[], valid=True, **CUFF),
    )
    text = render(wall, now)
    assert "CUFF_ERROR" in text and "141" not in text


def test_a_reading_marked_not_valid_is_never_printed_as_a_number() -> None:
    now = time.time()
    wall = Wall()
    oximeter(
        wall, "1", "ok", now, valid=False, flags=("low_signal_iq", "device_alarm_silenced"), spo2=97, pulse_rate=72
    )
    wall.apply("infusion/s/2/cuff/status", msg(type="status", room="2", state="ok", **CUFF))
    bp = {"nibp_systolic": 141, "nibp_diastolic": 90}
    wall.apply(
        "infusion/s/2/cuff/reading",
        msg(type="reading", room="2", time=iso_utc(now - 60), metrics=bp, flags=["artifact"], valid=False, **CUFF),
    )
    text = render(wall, now)
    assert "NOT VALID" in text and "low_signal_iq" in text and "not valid, 1 min ago" in text
    assert "97" not in text and "72" not in text and "141" not in text
    oximeter(wall, "1", "ok", now + 1, spo2=96)  # the next valid reading is shown again
    assert "96 %" in render(wall, now + 1)


def test_a_room_in_standby_says_so_and_shows_no_values() -> None:
    now = time.time()
    wall = Wall()
    oximeter(wall, "5", "ok", now, spo2=97, pulse_rate=72)
    until = "2030-01-02T03:04:00Z"
    local = datetime(2030, 1, 2, 3, 4, tzinfo=UTC).astimezone().strftime("%H:%M")
    mode = {"v": 1, "type": "room_mode", "site": "s", "room": "5", "device": "_room", "role": "nurse"}
    wall.apply("infusion/s/5/mode", msg(**mode, mode="standby", until=until, time=iso_utc(now)))
    text = render(wall, now)
    assert "STANDBY" in text and f"until {local}" in text
    assert "97" not in text and "72" not in text
    wall.apply("infusion/s/5/mode", msg(**mode, mode="standby", until=None, time=iso_utc(now)))
    assert "STANDBY" in (text := render(wall, now)) and "until" not in text
    wall.apply("infusion/s/5/mode", msg(**mode, mode="monitoring", until=None, time=iso_utc(now)))
    text = render(wall, now)
    assert "STANDBY" not in text and "97 %" in text
    wall.apply("infusion/s/6/mode", msg(**{**mode, "room": "6"}, mode="standby", until=None, time=iso_utc(now)))
    assert "room 6 STANDBY" in render(wall, now)  # a room with nothing but its mode still has a tile
    wall.apply("infusion/s/6/mode", b"")  # the retained mode removed
    assert "room 6" not in render(wall, now)


def test_an_alarm_that_cannot_be_determined_shows_no_value_until_it_resumes() -> None:
    now = time.time()
    wall = Wall()
    oximeter(wall, "1", "probe_off", now)
    topic = "infusion/s/1/alarms/active/ox/spo2-low"
    wall.apply(topic, alarm("1", "indeterminate", 87, indeterminate=True))
    text = render(wall, now)
    assert "HIGH SpO2 low" in text and "— cannot be determined" in text and "87" not in text
    oximeter(wall, "1", "ok", now, spo2=86)
    wall.apply(topic, alarm("1", "resumed", 86, indeterminate=False))
    text = render(wall, now)
    assert "HIGH SpO2 low (86)" in text and "cannot be determined" not in text


@pytest.mark.parametrize("payload", [b"", alarm("1", "suspended", 87, active=False)], ids=["emptied", "with-body"])
def test_a_suspended_alarm_leaves_the_wall(payload: bytes) -> None:
    now = time.time()
    wall = Wall()
    oximeter(wall, "1", "ok", now, spo2=87)
    topic = "infusion/s/1/alarms/active/ox/spo2-low"
    wall.apply(topic, alarm("1", "raised", 87))
    assert "HIGH SpO2 low" in render(wall, now)
    wall.apply(topic, payload)
    assert "ALARM" not in render(wall, now)


def test_malformed_messages_are_ignored() -> None:
    now = time.time()
    wall = Wall()
    for payload in (b"not json", b"[1]", msg(type="reading", room="1"), msg(type="session", room="1", started="x")):
        wall.apply("infusion/s/1/ox/reading", payload)
    assert "waiting for data" in render(wall, now)


def test_connection_banner_names_the_broker_and_since_when() -> None:
    link = Link("10.0.0.7:1883")
    assert "connecting to the MQTT broker at 10.0.0.7:1883" in render(connection_banner(link, time.time(), 20))
    link.up()
    link.down("[Errno 111] Connection refused", retry_in=2.0)
    since = datetime.fromtimestamp(link.since).strftime("%H:%M:%S")
    text = render(connection_banner(link, link.since + 65, 20))
    assert "CONNECTION LOST — data not live" in text
    assert f"MQTT broker 10.0.0.7:1883 unreachable since {since} (65 s)" in text
    assert "Connection refused" in text
    assert len(text.splitlines()) == 20  # the whole screen: no wall frame left showing around it


def test_once_with_no_broker_exits_1_naming_the_broker(capsys: pytest.CaptureFixture[str]) -> None:
    port = find_free_port()  # nothing listens there
    args = argparse.Namespace(config=None, host="127.0.0.1", port=port, site="s", prefix=None, once=5.0)
    started = time.monotonic()
    assert watch_main(args) == 1
    assert time.monotonic() - started < 4  # fails at once, not after the collection window
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot reach the MQTT broker at 127.0.0.1:{port}" in err[0] and "--host" in err[0]


def test_rooms_of_an_offline_gateway_show_no_values_and_say_their_alarms_are_not_current() -> None:
    now = time.time()
    wall = Wall()
    base = {"site": "s", "room": "1", "device": "ox", "model": "masimo-ascii1", "kind": "pulse_oximeter"}
    gw = {"type": "gateway", "gateway": "gw1", "devices": {"1/ox": "ok"}, "counters": {}}
    wall.apply("infusion/s/_gateway/gw1/status", msg(state="online", **gw))
    wall.apply("infusion/s/1/ox/status", msg(type="status", state="ok", **base))
    wall.apply("infusion/s/1/ox/reading", msg(type="reading", time=iso_utc(now - 1), metrics={"spo2": 87}, **base))
    alarm = msg(type="alarm", room="1", rule="spo2-low", priority="high", message="SpO2 low", value=87, active=True)
    wall.apply("infusion/s/1/alarms/active/ox/spo2-low", alarm)
    wall.apply(
        "infusion/s/_gateway/gw1/alarms/active/gw1/broker_lost",
        msg(type="alarm", room="_gateway", rule="broker_lost", priority="high", message="broker lost", active=True),
    )
    live = render(wall, now)
    assert "87 %" in live and "HIGH broker lost" in live
    wall.apply("infusion/s/_gateway/gw1/status", msg(state="offline", **{**gw, "devices": {}}))
    text = render(wall, now)
    assert "gw1 OFFLINE" in text and "not current" in text and "HIGH SpO2 low" in text
    assert "87" not in text  # neither the value nor the alarm's value: nobody is judging the room now
