"""The dashboards: generated JSON is current, every panel query runs on the real InfluxDB, thresholds follow the
alarm profile, and push sends what Grafana's HTTP API expects.

No Grafana server can run on this machine, so the dashboards are tested through their queries: each panel's
InfluxQL, with Grafana's macros substituted as Grafana would, runs against a real influxd (1.6.7) filled with the
gateway's own points (built by the gateway's record builders and its InfluxDB sink's line protocol).
`push` is tested against a STAND-IN: an aiohttp server in this file that records the requests grafana-client makes
and answers as Grafana's HTTP API documents. It checks what we send, not what a real Grafana does with it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp import web

from dashboards.build import GENERATED_DIR, build_all, panel_queries, to_text, write_all
from dashboards.push import GrafanaPushError, main_build, push
from devices.base import DeviceState, DeviceStatus, Reading
from devices.registry import get_model
from gateway.alarms import (
    ENDING,
    EXAMPLE_KETAMINE_PROFILE,
    AlarmEvent,
    AlarmProfile,
    Priority,
    RoomModeEvent,
    SessionEvent,
    ThresholdRule,
    Transition,
)
from gateway.records import (
    alarm_record,
    gateway_origin,
    gateway_status_record,
    origin_for,
    reading_record,
    room_mode_record,
    room_origin,
    session_record,
    status_record,
)
from gateway.sinks.influx import to_lines

SITE = "clinic-a"
PROFILE = EXAMPLE_KETAMINE_PROFILE.name


# --- generated JSON ------------------------------------------------------------------------------------------


def test_committed_json_is_what_the_example_profile_generates(tmp_path: Path) -> None:
    written = write_all(tmp_path, EXAMPLE_KETAMINE_PROFILE)
    assert sorted(p.name for p in written) == sorted(p.name for p in GENERATED_DIR.glob("*.json"))
    for path in written:
        committed = GENERATED_DIR / path.name
        assert path.read_text() == committed.read_text(), (
            f"{committed} is stale: run `infusion-telemetry dashboards build` and commit the result"
        )


def test_three_dashboards_with_uids_and_the_example_label() -> None:
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    assert {b["uid"] for b in boards.values()} == {"infusion-wall", "infusion-room", "infusion-gateway"}
    for board in boards.values():
        assert "example alarm limits, not advice" in board["title"]
        assert "NOT ADVICE" in board["description"]
        json.loads(to_text(board))  # plain JSON
    site = AlarmProfile(name="clinic-a-2026", rules=EXAMPLE_KETAMINE_PROFILE.rules)
    for board in build_all(site).values():
        assert "example" not in board["title"] and "example-profile" not in board["tags"]


def test_wall_repeats_a_row_per_room_and_live_tiles_are_bounded() -> None:
    wall = build_all(EXAMPLE_KETAMINE_PROFILE)["wall"]
    (room,) = wall["templating"]["list"]
    assert room["name"] == "room" and room["multi"] and room["includeAll"]
    assert room["query"] == 'SHOW TAG VALUES FROM "vitals" WITH KEY = "room"'
    rows = [p for p in wall["panels"] if p["type"] == "row"]
    assert [(r["repeat"], r["collapsed"]) for r in rows] == [("room", False)]
    for title in ("SpO2", "Pulse"):
        panel = _panel(wall, title)
        assert panel["fieldConfig"]["defaults"]["noValue"] == "NO DATA"
        (target,) = panel["targets"]
        assert "time > now() - 10s" in target["query"] and "last(" in target["query"]
        assert "$timeFilter" not in target["query"]  # the dashboard's range must not widen a live tile
    assert "time > now() - 30m" in _panel(wall, "BP")["targets"][0]["query"]
    assert _panel(wall, "BP taken")["fieldConfig"]["defaults"]["unit"] == "dateTimeFromNow"


def _box(panel: dict[str, Any]) -> tuple[int, int, int, int]:
    pos = panel["gridPos"]
    return pos["x"], pos["y"], pos["x"] + pos["w"], pos["y"] + pos["h"]


@pytest.mark.parametrize("example", [True, False], ids=["example-profile", "site-profile"])
def test_wall_room_row_keeps_its_layout_with_the_room_mode_tile(example: bool) -> None:
    """The room mode tile shares the session tile's column: the room row stays 24 wide and 7 high, nothing
    overlaps (with or without the example banner above it, which moves the row)."""
    profile = EXAMPLE_KETAMINE_PROFILE if example else AlarmProfile(name="site", rules=EXAMPLE_KETAMINE_PROFILE.rules)
    panels = build_all(profile)["wall"]["panels"]
    (row_index,) = [i for i, p in enumerate(panels) if p["type"] == "row"]
    top = panels[row_index]["gridPos"]["y"] + 1
    boxes = {p["title"]: _box(p) for p in panels[row_index + 1 :]}
    assert min(b[1] for b in boxes.values()) == top and max(b[3] for b in boxes.values()) == top + 7
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes.values()) == 24 * 7  # the row, exactly filled
    for a, (ax0, ay0, ax1, ay1) in boxes.items():
        for b, (bx0, by0, bx1, by1) in boxes.items():
            assert a == b or ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{a} overlaps {b}"
    assert boxes["Room mode"] == (16, top, 19, top + 3) and boxes["Session"] == (16, top + 3, 19, top + 7)


def test_standby_and_indeterminate_never_look_ok() -> None:
    """STANDBY and 'cannot be determined' have colours of their own, and an empty answer is never green."""
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    for name in ("wall", "room"):
        mode = _panel(boards[name], "Room mode")
        defaults = mode["fieldConfig"]["defaults"]
        (mapping,) = defaults["mappings"]
        assert mapping["options"]["standby"]["text"] == "STANDBY"
        colours = {m["color"] for m in mapping["options"].values()} | {
            t["color"] for t in defaults["thresholds"]["steps"]
        }
        assert "green" not in colours and defaults["color"]["mode"] == "thresholds"
        assert defaults["noValue"] == "monitoring"  # no room_mode point: the room is monitored, uncoloured
        assert mode["options"]["colorMode"] == "background" and mode["options"]["reduceOptions"]["fields"] == "/^mode$/"
        (target,) = mode["targets"]
        assert "time > now() - 1445m" in target["query"] and "$timeFilter" not in target["query"]

        alarms = _panel(boards[name], "Active alarms")
        shown = _column_mapping(alarms, "indeterminate")
        assert shown["true"]["text"] == "cannot be determined" and shown["true"]["color"] not in ("green", "red")
        assert shown["false"]["text"] == ""
        (cells,) = _override(alarms, "indeterminate", "custom.cellOptions")
        assert cells == {"type": "color-background", "mode": "basic", "applyToRow": True}
        # an empty quality or value cell stays empty instead of showing the table's "no active alarms"
        for column in ("quality", "value", "indeterminate"):
            assert _override(alarms, column, "noValue") == [""], column


def _override(panel: dict[str, Any], column: str, prop: str) -> list[Any]:
    """The values of property `prop` that the panel's overrides give the column `column`."""
    found = []
    for override in panel["fieldConfig"]["overrides"]:
        matcher = override["matcher"]
        hit = (matcher["id"] == "byName" and matcher["options"] == column) or (
            matcher["id"] == "byRegexp" and re.fullmatch(matcher["options"].strip("/"), column)
        )
        found += [p["value"] for p in override["properties"] if hit and p["id"] == prop]
    return found


def _column_mapping(panel: dict[str, Any], column: str) -> dict[str, dict[str, Any]]:
    (mappings,) = _override(panel, column, "mappings")
    (mapping,) = mappings
    options: dict[str, dict[str, Any]] = mapping["options"]
    return options


def _shown(value: Any, options: dict[str, dict[str, Any]]) -> Any:
    """What a value mapping makes of a value: Grafana looks it up by its string form (true -> "true")."""
    key = json.dumps(value) if isinstance(value, bool) else str(value)
    return options[key]["text"] if key in options else value


# --- thresholds follow the profile ---------------------------------------------------------------------------


def _steps(panel: dict[str, Any]) -> list[tuple[float | None, str]]:
    return [(s["value"], s["color"]) for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


def test_wall_thresholds_come_from_the_profile() -> None:
    custom = AlarmProfile(
        name="clinic-b",
        rules=(
            ThresholdRule(id="spo2-low", metric="spo2", below=93, priority="medium"),
            ThresholdRule(id="spo2-crit", metric="spo2", below=85, priority="high"),
            ThresholdRule(id="hr-high", metric="pulse_rate", above=120, priority="low"),
            ThresholdRule(id="only-3", metric="pulse_rate", below=40, priority="high", rooms=("3",)),
        ),
    )
    wall = build_all(custom)["wall"]
    assert _steps(_panel(wall, "SpO2")) == [(None, "red"), (85, "yellow"), (93, "green")]
    # above = 120 is violated for v > 120: the step sits at the next float above 120, so 120 itself stays green
    (base, (step, colour)) = _steps(_panel(wall, "Pulse"))
    assert base == (None, "green") and colour == "blue" and step is not None and 120 < step < 120.000001
    # a room-specific rule cannot colour a panel repeated for every room: it is left out, not misapplied
    assert all(v is None or v > 100 for v, _ in _steps(_panel(wall, "Pulse")))

    example = build_all(EXAMPLE_KETAMINE_PROFILE)
    assert _steps(_panel(example["wall"], "SpO2")) == [(None, "red"), (88, "yellow"), (92, "green")]
    assert _steps(_panel(example["room"], "SpO2")) == [(None, "red"), (88, "yellow"), (92, "green")]
    for board, title in ((example["wall"], "BP"), (example["room"], "Blood pressure")):
        steps = _override_steps(_panel(board, title))
        assert [s["color"] for s in steps["SYS"]] == ["green", "red"] and 179 < steps["SYS"][1]["value"] < 179.001
        assert [s["color"] for s in steps["DIA"]] == ["green", "red"] and 109 < steps["DIA"][1]["value"] < 109.001
        assert steps["MAP"] == [{"value": None, "color": "green"}]


def _override_steps(panel: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """series name -> threshold steps of the override whose regex matches it, whether Grafana names the series
    by its alias (`SYS`) or as `measurement.column` (`vitals.SYS`)."""
    out = {}
    for name in ("SYS", "DIA", "MAP"):
        (steps,) = [
            o["properties"][0]["value"]["steps"]
            for o in panel["fieldConfig"]["overrides"]
            if o["matcher"]["id"] == "byRegexp"
            and re.search(o["matcher"]["options"].strip("/"), name)
            and re.search(o["matcher"]["options"].strip("/"), f"vitals.{name}")
        ]
        out[name] = steps
    return out


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in board["panels"] if p.get("title") == title]
    found: dict[str, Any] = panel
    return found


# --- every query against the real InfluxDB -------------------------------------------------------------------


def _points(now: float) -> str:
    """Two rooms as the gateway stores them: room 1 talking, room 2's oximeter silent for the last 60 s."""
    ox = get_model("masimo-ascii1").spec
    ox1, ox2 = origin_for(SITE, "1", "oximeter", ox), origin_for(SITE, "2", "oximeter", ox)
    cuff1 = {"site": SITE, "room": "1", "device": "cuff", "model": "nibp-test", "kind": "nibp"}
    records: list[dict[str, Any]] = []
    seq = 0

    def nxt() -> int:
        nonlocal seq
        seq += 1
        return seq

    records.append(status_record(ox1, nxt(), now - 120, DeviceStatus(DeviceState.CONNECTED)))
    records.append(status_record(ox1, nxt(), now - 100, DeviceStatus(DeviceState.OK)))
    for i in range(60, 0, -1):  # one a second, the last 1 s ago
        flags = ("probe_off",) if i == 30 else ()
        reading = Reading({"spo2": 97.0 if i > 40 else 90.0, "pulse_rate": 72.0, "perfusion_index": 2.5}, flags)
        records.append(reading_record(ox1, nxt(), now - i, reading))
    bp = Reading({"nibp_systolic": 128.0, "nibp_diastolic": 82.0, "nibp_mean": 97.0, "nibp_pulse_rate": 70.0})
    records.append(reading_record(cuff1, nxt(), now - 600, bp))
    records.append(status_record(ox2, nxt(), now - 300, DeviceStatus(DeviceState.OK)))
    for i in range(300, 60, -2):  # room 2: nothing in the last 60 s
        records.append(reading_record(ox2, nxt(), now - i, Reading({"spo2": 95.0, "pulse_rate": 80.0})))
    records.append(status_record(ox2, nxt(), now - 55, DeviceStatus(DeviceState.NO_DATA)))
    ox3 = origin_for(SITE, "3", "oximeter", ox)  # room 3: empty, in standby for the last 4000 s
    for i in range(5020, 5000, -2):  # before the dashboards' 1 h range
        records.append(reading_record(ox3, nxt(), now - i, Reading({"spo2": 96.0, "pulse_rate": 70.0})))

    def alarm(
        origin: dict[str, str], rule: str, priority: Priority, transition: Transition, ago: float, **extra: Any
    ) -> None:
        kind: Literal["physiological", "technical"] = (
            "technical" if rule in ("no_data", "broker_lost", "outbox_filling") else "physiological"
        )
        room, device = origin["room"], origin["device"]
        event = AlarmEvent(
            f"{room}/{device}/{rule}",
            room,
            device,
            rule,
            kind,
            priority,
            transition,
            active=transition not in ENDING,
            time=now - ago,
            **extra,
        )
        records.append(alarm_record(origin, nxt(), event, PROFILE, True))

    spo2 = {"metric": "spo2", "message": "SpO2 low", "limit": 92.0}
    # room 1: spo2-low went indeterminate during the flagged reading and resumed with fresh data
    alarm(ox1, "spo2-low", "medium", "raised", 35, value=90.0, **spo2)
    alarm(ox1, "spo2-low", "medium", "indeterminate", 30, value=90.0, indeterminate=True, **spo2)
    alarm(ox1, "spo2-low", "medium", "resumed", 28, value=90.0, **spo2)
    alarm(ox2, "no_data", "high", "raised", 55, message="no data")
    # room 2: spo2-low raised on a low-perfusion value, then the oximeter fell silent: indeterminate
    low_pi = {"value": 91.0, "quality": ("low_perfusion",), **spo2}
    alarm(ox2, "spo2-low", "medium", "raised", 100, **low_pi)
    alarm(ox2, "spo2-low", "medium", "indeterminate", 58, indeterminate=True, **low_pi)
    # room 3: its no_data alarm was suspended when the room went to standby
    alarm(ox3, "no_data", "high", "raised", 4990, message="no data")
    alarm(ox3, "no_data", "high", "suspended", 4000, message="no data", role="nurse")
    very_low = {"metric": "spo2", "message": "SpO2 very low", "limit": 88.0}
    alarm(ox2, "spo2-very-low", "high", "raised", 200, value=86.0, **very_low)
    alarm(ox2, "spo2-very-low", "high", "cleared", 150, value=93.0, **very_low)
    gw = gateway_origin(SITE, "gw-1")
    alarm(gw, "broker_lost", "high", "raised", 1800, message="no MQTT connection")
    alarm(gw, "broker_lost", "high", "cleared", 1200, message="no MQTT connection")
    alarm(gw, "outbox_filling", "medium", "raised", 1500, value=0.85, message="outbox filling")

    room1, room2, room3 = (room_origin(SITE, r) for r in ("1", "2", "3"))
    # room 1 was in standby until its session started; room 2's standby point is older than any standby lasts
    # (its end point lost): neither is in standby now. Room 3 is.
    records.append(room_mode_record(room1, nxt(), RoomModeEvent("1", "standby", now - 3000, now + 11400, "nurse")))
    records.append(
        room_mode_record(room1, nxt(), RoomModeEvent("1", "monitoring", now - 1500, reason="session started"))
    )
    records.append(room_mode_record(room2, nxt(), RoomModeEvent("2", "standby", now - 25 * 3600, now - 21 * 3600)))
    records.append(room_mode_record(room3, nxt(), RoomModeEvent("3", "standby", now - 4000, now + 10400, "nurse")))
    records.append(session_record(room1, nxt(), SessionEvent("1", "started", now - 1500, "s-1", now - 1500)))
    base = {"nibp_systolic": 128.0, "nibp_diastolic": 82.0, "nibp_mean": 97.0}
    records.append(session_record(room1, nxt(), SessionEvent("1", "baseline", now - 600, "s-1", now - 1500, base)))
    for ago, backlog in ((120, 0), (60, 340), (5, 12)):  # the gateway's own counters, every status interval
        counters = {
            "received": 400,
            "committed": 400,
            "published": 390,
            "written": 60,
            "protocol_errors": 2,
            "backlog_mqtt": 0,
            "backlog_influx": backlog,
            "rejected": 1,
            "dropped": 0,
        }
        status = {"state": "degraded" if backlog else "online", "counters": counters, "links": {"mqtt": "up"}}
        records.append(gateway_status_record(gw, nxt(), now - ago, status))
    return "\n".join(to_lines(records))


def substitute(query: str, room: str = "1") -> str:
    """Grafana's macros as Grafana expands them for InfluxQL (a relative range; one selected room, regex-escaped
    inside the /^...$/ the queries put around it)."""
    return (
        query.replace("$timeFilter", "time > now() - 1h")
        .replace("$__interval_ms", "10000")
        .replace("$__interval", "10s")
        .replace("$room", re.escape(room))
    )


ACTIVE_COLUMNS = ["time", "priority", "indeterminate", "device", "rule", "message", "value", "transition", "quality"]

# (dashboard, panel title) -> the columns its query returns for room 1
EXPECTED_COLUMNS: dict[tuple[str, str], list[str]] = {
    ("wall", "Gateway alarms"): ACTIVE_COLUMNS,
    ("wall", "SpO2"): ["time", "SpO2"],
    ("wall", "Pulse"): ["time", "Pulse"],
    ("wall", "BP"): ["time", "SYS", "DIA", "MAP"],
    ("wall", "BP taken"): ["time", "SYS"],
    ("wall", "Room mode"): ["time", "mode"],
    ("wall", "Session"): ["time", "session"],
    ("wall", "Active alarms"): ACTIVE_COLUMNS,
    ("room", "SpO2"): ["time", "SpO2", "SpO2 min"],
    ("room", "Pulse rate"): ["time", "pulse"],
    ("room", "Blood pressure"): ["time", "SYS", "DIA", "MAP"],
    ("room", "Active alarms"): ACTIVE_COLUMNS,
    ("room", "Device status"): ["time", "state"],
    ("room", "Room mode"): ["time", "mode"],
    ("room", "Alarm history"): [
        "time",
        "priority",
        "alarm_kind",
        "device",
        "rule",
        "transition",
        "value",
        "limit",
        "quality",
        "message",
        "role",
    ],
    ("room", "Sessions"): ["time", "transition", "session_id", "baseline_nibp_systolic", "baseline_nibp_diastolic"],
    ("gateway", "Outbox backlog"): ["time", "to MQTT", "to InfluxDB"],
    ("gateway", "Rejected and dropped"): ["time", "rejected", "dropped", "protocol errors"],
    ("gateway", "Readings per second"): ["time", "readings/s"],
    ("gateway", "Flagged readings per second"): ["time", "flagged/s"],
    ("gateway", "Device links"): ["time", "state"],
    ("gateway", "Last reading"): ["time", "seq"],
    ("gateway", "Broker link and outbox"): ["time", "active"],
    ("gateway", "Technical alarms"): ["time", "priority", "room", "device", "rule", "transition", "value", "message"],
    ("gateway", "Gateway alarms"): ["time", "priority", "device", "rule", "transition", "value", "message"],
}


def _values(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(zip(s["columns"], row, strict=True)) | s.get("tags", {}) for s in series for row in s["values"]]


def test_every_panel_query_runs_on_the_real_influxdb(influxd: Any, influx_db: str) -> None:
    now = time.time()
    influxd.write(influx_db, _points(now))
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)

    seen = set()
    for name, board in boards.items():
        for title, query in panel_queries(board):
            key = (name, title)
            assert key not in seen, f"two queries in {key}: give each its own expectation"
            seen.add(key)
            series = influxd.query(influx_db, substitute(query))  # an InfluxQL error raises here
            assert series, f"{key}: no rows for room 1: {substitute(query)}"
            for s in series:
                assert s["columns"] == EXPECTED_COLUMNS[key], f"{key}: {s['columns']}"
    assert seen == set(EXPECTED_COLUMNS)

    # the $room variable lists the rooms that report vitals
    (rooms,) = influxd.query(influx_db, boards["wall"]["templating"]["list"][0]["query"])
    assert [v[1] for v in rooms["values"]] == ["1", "2", "3"]

    wall = dict(panel_queries(boards["wall"]))
    # LIVE: room 1 talks (its last trustworthy value), room 2 has been silent for 60 s: no row at all -> NO DATA
    assert [row["SpO2"] for row in _values(influxd.query(influx_db, substitute(wall["SpO2"], "1")))] == [90]
    assert influxd.query(influx_db, substitute(wall["SpO2"], "2")) == []
    assert influxd.query(influx_db, substitute(wall["Pulse"], "2")) == []
    # the flagged reading 30 s ago never counts; the BP from 10 minutes ago is shown, with its own time
    (bp,) = _values(influxd.query(influx_db, substitute(wall["BP"], "1")))
    assert (bp["SYS"], bp["DIA"], bp["MAP"]) == (128, 82, 97)
    (taken,) = _values(influxd.query(influx_db, substitute(wall["BP taken"], "1")))
    assert abs(taken["time"] / 1e9 - (now - 600)) < 1
    assert influxd.query(influx_db, substitute(wall["BP"], "2")) == []
    # the session: running since its start (the baseline event is not the start)
    (session,) = _values(influxd.query(influx_db, substitute(wall["Session"], "1")))
    assert session["session"] == "started" and abs(session["time"] / 1e9 - (now - 1500)) < 1
    # active alarms: room 1's spo2-low, determinate again (resumed); in room 2 the no_data alarm and the
    # spo2-low whose condition cannot be determined (with the quality of the value that raised it), not the
    # cleared spo2-very-low; in room 3 nothing: its alarm was suspended by standby
    shown = _column_mapping(_panel(boards["wall"], "Active alarms"), "indeterminate")
    active1 = _values(influxd.query(influx_db, substitute(wall["Active alarms"], "1")))
    assert [
        (a["rule"], a["priority"], a["value"], a["transition"], _shown(a["indeterminate"], shown)) for a in active1
    ] == [("spo2-low", "medium", 90, "resumed", "")]
    active2 = _values(influxd.query(influx_db, substitute(wall["Active alarms"], "2")))
    assert [(a["rule"], a["priority"], _shown(a["indeterminate"], shown), a["quality"]) for a in active2] == [
        ("no_data", "high", "", ""),
        ("spo2-low", "medium", "cannot be determined", "low_perfusion"),
    ]
    assert influxd.query(influx_db, substitute(wall["Active alarms"], "3")) == []
    # room mode: STANDBY only in room 3; room 1 resumed monitoring; room 2's 25-hour-old standby is out of the
    # window, and no row at all shows the panel's "monitoring"
    for which in ("wall", "room"):
        panel = _panel(boards[which], "Room mode")
        (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
        query = dict(panel_queries(boards[which]))["Room mode"]
        for room, expected in (("1", "monitoring"), ("2", "monitoring"), ("3", "STANDBY")):
            rows = _values(influxd.query(influx_db, substitute(query, room)))
            mode = [_shown(r["mode"], mapping["options"]) for r in rows] or [
                panel["fieldConfig"]["defaults"]["noValue"]
            ]
            assert mode == [expected], (which, room, rows)
    assert influxd.query(influx_db, substitute(wall["Room mode"], "2")) == []
    gateway = _values(influxd.query(influx_db, wall["Gateway alarms"]))
    assert [a["rule"] for a in gateway] == ["outbox_filling"]  # broker_lost has cleared

    detail = dict(panel_queries(boards["room"]))
    history = _values(influxd.query(influx_db, substitute(detail["Alarm history"], "2")))
    assert [(a["rule"], a["transition"], a["quality"]) for a in history if a["rule"] == "spo2-low"] == [
        ("spo2-low", "indeterminate", "low_perfusion"),
        ("spo2-low", "raised", "low_perfusion"),
    ]

    health = dict(panel_queries(boards["gateway"]))
    technical = _values(influxd.query(influx_db, substitute(health["Technical alarms"])))
    assert [(a["room"], a["rule"]) for a in technical] == [("2", "no_data")]
    rates = {s["tags"]["room"]: s for s in influxd.query(influx_db, substitute(health["Readings per second"]))}
    assert set(rates) == {"1", "2"}
    recent = [row[1] for row in rates["2"]["values"] if row[0] / 1e9 > now - 50]
    assert recent and all(r == 0 for r in recent)  # the silent device shows as 0 readings/s


# --- push against a stand-in Grafana -------------------------------------------------------------------------


class StandInGrafana:
    """A STAND-IN for Grafana's HTTP API (no Grafana server can run here): records requests, answers as the
    API documents for /api/folders and /api/dashboards/db."""

    def __init__(self, folders: list[dict[str, Any]] | None = None, status: int = 200) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.folders = list(folders or [])
        self.status = status
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body: Any = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.headers), body))
        if self.status != 200:
            return web.json_response({"message": "invalid API key"}, status=self.status)
        if request.method == "GET" and request.path == "/api/folders":
            return web.json_response(self.folders)
        if request.method == "POST" and request.path == "/api/folders":
            folder = {"id": 7, "uid": body["uid"], "title": body["title"]}
            self.folders.append(folder)
            return web.json_response(folder)
        if request.method == "POST" and request.path == "/api/dashboards/db":
            uid = body["dashboard"]["uid"]
            return web.json_response({"id": 1, "uid": uid, "url": f"/d/{uid}/x", "status": "success", "version": 1})
        return web.json_response({"message": "not found"}, status=404)


@pytest.fixture
async def grafana() -> AsyncIterator[StandInGrafana]:
    stand_in = StandInGrafana()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stand_in.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stand_in.url = f"http://127.0.0.1:{port}"
    try:
        yield stand_in
    finally:
        await runner.cleanup()


async def test_push_creates_the_folder_and_upserts_each_dashboard(grafana: StandInGrafana) -> None:
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    urls = await asyncio.to_thread(push, grafana.url, "glsa_secret", boards)
    assert urls == [f"{grafana.url}/d/{b['uid']}/x" for b in boards.values()]
    calls = [(method, path) for method, path, _, _ in grafana.requests]
    assert calls == [("GET", "/api/folders"), ("POST", "/api/folders")] + [("POST", "/api/dashboards/db")] * 3
    assert all(headers["Authorization"] == "Bearer glsa_secret" for _, _, headers, _ in grafana.requests)
    assert grafana.requests[1][3] == {"title": "Infusion rooms", "uid": "infusion-rooms"}
    for (_, _, _, body), board in zip(grafana.requests[2:], boards.values(), strict=True):
        assert body["overwrite"] is True and body["folderUid"] == "infusion-rooms"
        assert body["dashboard"]["uid"] == board["uid"] and body["dashboard"]["id"] is None
        assert body["dashboard"]["panels"] == board["panels"]

    # a second push finds the folder by its title and does not create another
    grafana.requests.clear()
    await asyncio.to_thread(push, grafana.url, "glsa_secret", boards, "Infusion rooms")
    assert [(m, p) for m, p, _, _ in grafana.requests][:2] == [("GET", "/api/folders"), ("POST", "/api/dashboards/db")]


async def test_push_errors_are_ours_and_say_why(grafana: StandInGrafana) -> None:
    grafana.status = 401
    with pytest.raises(GrafanaPushError, match=r"refused the token \(401.*while listing folders"):
        await asyncio.to_thread(push, grafana.url, "wrong", build_all(EXAMPLE_KETAMINE_PROFILE))
    with pytest.raises(GrafanaPushError, match="unreachable"):
        await asyncio.to_thread(push, "http://127.0.0.1:9", "t", build_all(EXAMPLE_KETAMINE_PROFILE))
    with pytest.raises(GrafanaPushError, match="no Grafana token"):
        push(grafana.url, "", {})


def test_main_build_uses_the_config_profile(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[influx]\napi = "v1"\nurl = "http://127.0.0.1:8086"\ndatabase = "infusion"\n\n'
        '[alarms]\nprofile = "clinic-c"\n\n[[alarms.rules]]\nid = "spo2-low"\nmetric = "spo2"\nbelow = 93\n'
        'priority = "high"\n'
    )
    assert main_build(config, tmp_path / "out") == 0
    wall = json.loads((tmp_path / "out" / "infusion-wall.json").read_text())
    assert _steps(_panel(wall, "SpO2")) == [(None, "red"), (93, "green")]
    assert "example" not in wall["title"]
    assert main_build(tmp_path / "missing.toml", tmp_path / "out") == 2
