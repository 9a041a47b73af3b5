"""The dashboards: generated JSON is current, the wall fits one screen, every state has its own text and colour,
every panel query runs on the real InfluxDB, thresholds follow the alarm profile, push sends what Grafana's HTTP
API expects, and the kiosk needs no login.

No Grafana server can run on this machine, so the dashboards are tested through their queries and their JSON: each
panel's InfluxQL, with Grafana's macros substituted as Grafana would, runs against a real influxd (1.6.7) filled with
the gateway's own points (built by the gateway's record builders and its InfluxDB sink's line protocol), and what a
panel shows is worked out from its JSON the way Grafana's display processor does it (value mappings first, their
colour or else the thresholds'; a stat panel's "max" reducer skipping nulls; a table's sortBy). Those helpers are
STAND-INS for Grafana's own code, written from its documented behaviour. `push` is tested against a STAND-IN: an
aiohttp server in this file that records the requests grafana-client makes and answers as Grafana's HTTP API
documents. Nothing here asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from aiohttp import web

from dashboards.build import (
    ALARM_TABLE_COLUMNS,
    GENERATED_DIR,
    NEUTRAL_COLOUR,
    ROOM_LIST_QUERY,
    TILE_FIELDS,
    WALL_ROOMS,
    build_all,
    panel_queries,
    screen_rows,
    to_text,
    value_box_px,
    wall_layout,
    write_all,
)
from dashboards.push import GrafanaPushError, main_build, push
from dashboards.typecheck import PANEL_TYPES, source
from devices.base import DeviceState, DeviceStatus, Reading
from devices.registry import get_model
from devtools.localservices import InfluxError
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
from gateway.envelope import (
    GatewayCounters,
    GatewayStatusMessage,
    Origin,
    Record,
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

REPO = Path(__file__).resolve().parents[2]
SITE = "clinic-a"
PROFILE = EXAMPLE_KETAMINE_PROFILE.name
THRESHOLD_COLOURS = {"red", "yellow", "blue", "green"}


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


# --- what Grafana makes of the JSON (stand-ins for its display processor, reducers and layout) ----------------


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    (panel,) = [p for p in board["panels"] if p.get("title") == title]
    found: dict[str, Any] = panel
    return found


def _tile(board: dict[str, Any]) -> dict[str, Any]:
    (tile,) = [p for p in board["panels"] if p.get("repeat") == "room"]
    found: dict[str, Any] = tile
    return found


def _strip(board: dict[str, Any]) -> dict[str, Any]:
    (strip,) = [p for p in board["panels"] if p["type"] == "stat" and not p.get("title")]
    found: dict[str, Any] = strip
    return found


def _matches(matcher: dict[str, Any], name: str, ref_id: str | None) -> bool:
    if matcher["id"] == "byName":
        return bool(matcher["options"] == name)
    if matcher["id"] == "byRegexp":
        return re.fullmatch(matcher["options"].strip("/"), name) is not None
    if matcher["id"] == "byFrameRefID":
        return bool(matcher["options"] == ref_id)
    return False


def _config(panel: dict[str, Any], name: str, ref_id: str | None = None) -> dict[str, Any]:
    """A field's effective config: the defaults, then every matching override in order (later ones win)."""
    config = dict(panel["fieldConfig"]["defaults"])
    for override in panel["fieldConfig"]["overrides"]:
        if _matches(override["matcher"], name, ref_id):
            config.update({p["id"]: p["value"] for p in override["properties"]})
    return config


def _override(panel: dict[str, Any], column: str, prop: str) -> list[Any]:
    """The values of property `prop` that the panel's overrides give the column `column`."""
    return [
        p["value"]
        for o in panel["fieldConfig"]["overrides"]
        if _matches(o["matcher"], column, None)
        for p in o["properties"]
        if p["id"] == prop
    ]


def _display(config: dict[str, Any], value: Any) -> tuple[str | None, str]:
    """(text, colour) Grafana shows for a value: the first matching value mapping gives its text and colour; a
    value without one is formatted (None here) and coloured by the thresholds; null without a mapping shows the
    field's noValue in the LOWEST threshold colour (what made NO DATA red before)."""
    for mapping in config.get("mappings") or []:
        result = None
        if mapping["type"] == "value" and value is not None:
            key = (
                json.dumps(value)
                if isinstance(value, bool)
                else f"{value:g}"
                if isinstance(value, float)
                else str(value)
            )
            result = mapping["options"].get(key)
        if mapping["type"] == "special" and value is None and mapping["options"]["match"] in ("null", "null+nan"):
            result = mapping["options"]["result"]
        if result is not None:
            return result.get("text"), result.get("color") or _threshold_colour(config, value)
    if value is None:
        return config.get("noValue"), _thresholds(config)[0]["color"]
    return None, _threshold_colour(config, value)


def _thresholds(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The field's threshold steps, or Grafana's default ones (green, red from 80) when the panel sets none."""
    default: list[dict[str, Any]] = [{"value": None, "color": "green"}, {"value": 80, "color": "red"}]
    steps: list[dict[str, Any]] = (config.get("thresholds") or {}).get("steps") or default
    return steps


def _threshold_colour(config: dict[str, Any], value: Any) -> str:
    steps = _thresholds(config)
    colour: str = steps[0]["color"]
    for step in steps[1:]:
        if isinstance(value, int | float) and value >= step["value"]:
            colour = step["color"]
    return colour


def _rows(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table format: Grafana puts the rows of every series of one query in one frame (tags as columns)."""
    return [dict(zip(s["columns"], row, strict=True)) | s.get("tags", {}) for s in series for row in s["values"]]


def _reduce_max(rows: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, Any]:
    """A stat panel's "max" per field over the frame's rows, nulls skipped (null when every row is null)."""
    return {f: max((r[f] for r in rows if r.get(f) is not None), default=None) for f in fields}


def _sorted_table(panel: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A table's initial sortBy: by each column in turn, nulls last."""
    out = list(rows)
    for sort in reversed(panel["options"]["sortBy"]):
        name, desc = sort["displayName"], sort["desc"]
        present = [r for r in out if r.get(name) is not None]
        out = sorted(present, key=lambda r: r[name], reverse=desc) + [r for r in out if r.get(name) is None]
    return out


def _shown_tile(tile: dict[str, Any], values: dict[str, Any]) -> dict[str, tuple[str | None, str]]:
    return {f: _display(_config(tile, f), values[f]) for f in TILE_FIELDS}


# --- the wall fits one screen --------------------------------------------------------------------------------


def _boxes(panels: list[dict[str, Any]]) -> list[tuple[str, int, int, int, int]]:
    return [
        (str(p.get("title")), p["gridPos"]["x"], p["gridPos"]["y"], p["gridPos"]["w"], p["gridPos"]["h"])
        for p in panels
    ]


@pytest.mark.parametrize("rooms", [6, 12, 24])
@pytest.mark.parametrize("example", [True, False], ids=["example-profile", "site-profile"])
def test_the_wall_fits_one_kiosk_screen(rooms: int, example: bool) -> None:
    """1920x1080 in kiosk mode (no header): 27 grid rows of 30 px + 8 px margins. The room tiles, repeated by Grafana
    (max(24 / rooms, 24 / maxPerRow) columns each, a new row after maxPerRow), fit below the banner and the
    gateways strip without scrolling, both for a wall built for `rooms` and for the committed 24-room wall."""
    assert screen_rows() == 27 and 27 * 30 + 26 * 8 <= 1080 - 2 * 16 < 28 * 30 + 27 * 8
    profile = EXAMPLE_KETAMINE_PROFILE if example else AlarmProfile(name="site", rules=EXAMPLE_KETAMINE_PROFILE.rules)
    for built_for in (rooms, WALL_ROOMS):
        board = build_all(profile, wall_rooms=built_for)["wall"]
        tile = _tile(board)
        pos = tile["gridPos"]
        width = max(24 / rooms, 24 / tile["maxPerRow"])
        rows_of_tiles = math.ceil(rooms / tile["maxPerRow"])
        assert width * min(rooms, tile["maxPerRow"]) <= 24
        assert pos["y"] + rows_of_tiles * pos["h"] <= screen_rows(), (built_for, rooms, pos, tile["maxPerRow"])
        assert rooms * width * pos["h"] <= 24 * (screen_rows() - pos["y"])  # grid units per room x rooms <= screen
        above = [p for p in board["panels"] if p is not tile]
        assert all(p["gridPos"]["y"] + p["gridPos"]["h"] <= pos["y"] for p in above)  # nothing overlaps the tiles
        assert sum(p["gridPos"]["w"] * p["gridPos"]["h"] for p in above) == 24 * pos["y"]  # the strip is full
    layout = wall_layout(rooms, banner=example)
    assert layout.grid_for(rooms)[2] <= screen_rows()
    # the value boxes stay readable: at least 70 px square for 24 rooms, more for fewer
    assert value_box_px(layout.tile_w, layout.tile_h) >= {6: 140, 12: 100, 24: 70}[rooms]
    print(f"{rooms} rooms: {layout}, value box {value_box_px(layout.tile_w, layout.tile_h):.0f} px")


def test_the_tile_links_to_the_room_and_is_repeated_per_room() -> None:
    wall = build_all(EXAMPLE_KETAMINE_PROFILE)["wall"]
    tile = _tile(wall)
    assert tile["repeatDirection"] == "h" and tile["title"] == "Room $room"
    for link in (*tile["links"], *tile["fieldConfig"]["defaults"]["links"]):
        assert link["url"] == "/d/infusion-room?${room:queryparam}"
    assert tile["options"]["reduceOptions"] == {
        "calcs": ["max"],
        "values": False,
        "fields": "/^(" + "|".join(TILE_FIELDS) + ")$/",
    }
    (target,) = tile["targets"]
    assert target["resultFormat"] == "table"  # one frame for the rows of every measurement


def test_room_list_is_refreshed_and_bounded_to_a_day() -> None:
    for name in ("wall", "room"):
        (room,) = build_all(EXAMPLE_KETAMINE_PROFILE)[name]["templating"]["list"]
        assert room["name"] == "room" and room["refresh"] == 2  # on time range change: every kiosk refresh
        assert room["query"] == ROOM_LIST_QUERY and "time > now() - 24h" in room["query"]
        assert re.fullmatch(room["regex"].strip("/"), "3") and not re.fullmatch(room["regex"].strip("/"), "-1")
        assert room["multi"] is (name == "wall")


# --- every state has its own text and colour -----------------------------------------------------------------


def test_every_tile_state_reads_distinctly_and_no_data_is_neutral() -> None:
    tile = _tile(build_all(EXAMPLE_KETAMINE_PROFILE)["wall"])
    shown = {code: _display(_config(tile, "State"), code) for code in (None, 1, 2, 3, 4)}
    assert shown == {
        None: ("NO DATA", NEUTRAL_COLOUR),
        1: ("GATEWAY OFFLINE", "purple"),
        2: ("LIVE", "green"),
        3: ("PROBE OFF", "orange"),
        4: ("STANDBY", "dark-blue"),
    }
    alarms = {code: _display(_config(tile, "Alarm"), code) for code in (None, -1, 0, 1, 2, 3)}
    assert alarms == {
        None: ("alarm feed not current", "purple"),
        -1: ("alarm feed not current", "purple"),
        0: ("no alarm", "transparent"),
        1: ("LOW", "blue"),
        2: ("MEDIUM", "yellow"),
        3: ("HIGH", "red"),
    }
    # no value: its own neutral text and colour for every field, never a threshold colour (SpO2's lowest is red)
    nothing = _shown_tile(tile, dict.fromkeys(TILE_FIELDS))
    assert nothing == {
        "State": ("NO DATA", NEUTRAL_COLOUR),
        "Alarm": ("alarm feed not current", "purple"),
        "SpO2": ("NO DATA", NEUTRAL_COLOUR),
        "Pulse": ("NO DATA", NEUTRAL_COLOUR),
        "SYS": ("none in 30m", NEUTRAL_COLOUR),
        "DIA": ("none in 30m", NEUTRAL_COLOUR),
        "BP taken": ("none in 30m", NEUTRAL_COLOUR),
        "Session": ("no session", "transparent"),
    }
    assert _config(tile, "SpO2")["thresholds"]["steps"][0]["color"] == "red"  # what NO DATA would have taken
    # the whole tile without any answer (an error, or nothing at all): one neutral NO DATA
    assert _display(tile["fieldConfig"]["defaults"], None) == ("NO DATA", NEUTRAL_COLOUR)
    assert NEUTRAL_COLOUR not in THRESHOLD_COLOURS
    # values: coloured by the profile (SpO2 90 is between 88 and 92: medium, yellow)
    assert (
        _display(_config(tile, "SpO2"), 90.0) == (None, "yellow")
        and _display(_config(tile, "SpO2"), 97.0)[1] == "green"
    )
    assert _config(tile, "BP taken")["unit"] == _config(tile, "Session")["unit"] == "dateTimeFromNow"


def test_standby_and_indeterminate_never_look_ok() -> None:
    """STANDBY and 'cannot be determined' have colours of their own, and an empty answer is never green."""
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    mode = _panel(boards["room"], "Room mode")
    defaults = mode["fieldConfig"]["defaults"]
    (mapping,) = defaults["mappings"]
    assert mapping["options"]["standby"]["text"] == "STANDBY"
    colours = {m["color"] for m in mapping["options"].values()} | {t["color"] for t in defaults["thresholds"]["steps"]}
    assert "green" not in colours and defaults["color"]["mode"] == "thresholds"
    assert defaults["noValue"] == "monitoring"  # no room_mode point: the room is monitored, uncoloured
    (target,) = mode["targets"]
    assert "time > now() - 1445m AND time < now() + 2s" in target["query"]

    alarms = _panel(boards["room"], "Active alarms")
    shown = _config(alarms, "indeterminate")
    assert _display(shown, True) == ("cannot be determined", "purple") and _display(shown, False)[0] == ""
    # a feed row has no indeterminate value: its row is not coloured (the default threshold colour is green)
    assert _display(shown, None) == ("", "transparent")
    (cells,) = _override(alarms, "indeterminate", "custom.cellOptions")
    assert cells == {"type": "color-background", "mode": "basic", "applyToRow": True}
    for column in ("quality", "value", "indeterminate", "rule", "message"):  # an empty cell stays empty
        assert _config(alarms, column)["noValue"] == "", column
    priority = _config(alarms, "priority")
    assert [_display(priority, c)[0] for c in (4, 3, 2, 1, 0)] == [
        "ALARM FEED NOT CURRENT",
        "HIGH",
        "MEDIUM",
        "LOW",
        "alarm feed current",
    ]
    assert alarms["options"]["sortBy"] == [
        {"displayName": "priority", "desc": True},
        {"displayName": "since", "desc": False},
    ]


def test_empty_texts_are_never_reassuring() -> None:
    """What a panel says when its query returned nothing, or failed (InfluxDB down): never "all clear"."""
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    texts = {
        (name, p.get("title") or "strip"): p["fieldConfig"]["defaults"].get("noValue")
        for name, board in boards.items()
        for p in board["panels"]
        if p["type"] in ("stat", "table")
    }
    for key, text in texts.items():
        assert text, f"{key} has no empty text of its own"
        assert not re.search(r"\b(no active alarms|all clear|ok)\b", text, re.I), (key, text)
    assert texts[("room", "Active alarms")].startswith("NO DATA: no alarm feed")
    assert texts[("wall", "strip")] == texts[("gateway", "strip")] == "NO DATA: no gateway heartbeat"
    assert texts[("wall", "Room $room")] == "NO DATA"
    for key in (("room", "Alarm history"), ("gateway", "Technical alarms"), ("gateway", "Gateway alarms")):
        assert "the database did not answer" in texts[key]


def test_live_values_are_bounded_on_both_sides() -> None:
    wall = build_all(EXAMPLE_KETAMINE_PROFILE)["wall"]
    (query,) = [q for t, q in panel_queries(wall) if t == "Room $room"]
    assert query.count("time > now() - 10s AND time < now() + 2s") >= 4  # SpO2/pulse, LIVE, PROBE OFF, feed
    assert "time > now() - 30m AND time < now() + 2s" in query
    assert "$timeFilter" not in query  # the dashboard's range must not widen a live value
    for _, query in panel_queries(wall):
        for found in re.finditer(r"time > now\(\) - (\w+)( AND time < now\(\) \+ 2s)?", query):
            assert found[2] or found[1] == "24h", found[0]  # "seen in the last 24 h" allows a day ahead, on purpose


def test_trends_show_gaps_and_every_bp_series_its_own_limits() -> None:
    room = build_all(EXAMPLE_KETAMINE_PROFILE)["room"]
    for title in ("SpO2", "Pulse rate", "Blood pressure"):
        panel = _panel(room, title)
        assert panel["fieldConfig"]["defaults"]["custom"]["spanNulls"] is False
        (target,) = panel["targets"]
        assert target["query"].endswith("GROUP BY time($__interval) fill(null)") and panel["interval"] == "5s"
    bp = _panel(room, "Blood pressure")

    def scale_key(name: str) -> str:  # Grafana's buildScaleKey: unit, range, soft range, placement, label
        c = _config(bp, name)
        custom = c.get("custom", {}) | {k[7:]: v for k, v in c.items() if k.startswith("custom.")}
        return f"{c['unit']}/{c['min']}-{c['max']}/{custom.get('axisPlacement', 'auto')}/{custom.get('axisLabel')}"

    keys = {name: scale_key(name) for name in ("SYS", "DIA", "MAP")}
    assert len(set(keys.values())) == 3, keys  # one scale each: Grafana draws one set of limit lines per scale
    sys_steps = _config(bp, "SYS")["thresholds"]["steps"]
    dia_steps = _config(bp, "DIA")["thresholds"]["steps"]
    assert 179 < sys_steps[1]["value"] < 179.001 and 109 < dia_steps[1]["value"] < 109.001


# --- thresholds follow the profile ---------------------------------------------------------------------------


def _steps(config: dict[str, Any]) -> list[tuple[float | None, str]]:
    return [(s["value"], s["color"]) for s in config["thresholds"]["steps"]]


def test_thresholds_come_from_the_profile() -> None:
    custom = AlarmProfile(
        name="clinic-b",
        rules=(
            ThresholdRule(id="spo2-low", metric="spo2", below=93, priority="medium"),
            ThresholdRule(id="spo2-crit", metric="spo2", below=85, priority="high"),
            ThresholdRule(id="hr-high", metric="pulse_rate", above=120, priority="low"),
            ThresholdRule(id="only-3", metric="pulse_rate", below=40, priority="high", rooms=("3",)),
        ),
    )
    tile = _tile(build_all(custom)["wall"])
    assert _steps(_config(tile, "SpO2")) == [(None, "red"), (85, "yellow"), (93, "green")]
    # above = 120 is violated for v > 120: the step sits at the next float above 120, so 120 itself stays green
    (base, (step, colour)) = _steps(_config(tile, "Pulse"))
    assert base == (None, "green") and colour == "blue" and step is not None and 120 < step < 120.000001
    # a room-specific rule cannot colour a panel repeated for every room: it is left out, not misapplied
    assert all(v is None or v > 100 for v, _ in _steps(_config(tile, "Pulse")))

    example = build_all(EXAMPLE_KETAMINE_PROFILE)
    assert _steps(_config(_tile(example["wall"]), "SpO2")) == [(None, "red"), (88, "yellow"), (92, "green")]
    assert _steps(_panel(example["room"], "SpO2")["fieldConfig"]["defaults"]) == [
        (None, "red"),
        (88, "yellow"),
        (92, "green"),
    ]
    for board, title in ((example["wall"], None), (example["room"], "Blood pressure")):
        panel = _tile(board) if title is None else _panel(board, title)
        for name, limit in (("SYS", 179), ("DIA", 109)):
            ((_, base_colour), (value, colour)) = _steps(_config(panel, name))
            assert base_colour == "green" and colour == "red" and value is not None and limit < value < limit + 0.001


# --- every query against the real InfluxDB -------------------------------------------------------------------


class Records:
    """Builds the gateway's own records (its record builders), rendered by its InfluxDB sink's line protocol."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.records: list[Record] = []
        self.seq = 0

    def nxt(self) -> int:
        self.seq += 1
        return self.seq

    def alarm(
        self, origin: Origin, rule: str, priority: Priority, transition: Transition, ago: float, **extra: Any
    ) -> None:
        kind: Literal["physiological", "technical"] = (
            "technical" if rule in ("no_data", "broker_lost", "outbox_filling", "clock_skew") else "physiological"
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
            time=self.now - ago,
            **extra,
        )
        self.records.append(alarm_record(origin, self.nxt(), event, PROFILE, True))

    def heartbeat(self, gateway: str, ago: float, backlog: int = 0) -> None:
        counters = GatewayCounters(
            received=400,
            committed=400,
            published=390,
            written=60,
            protocol_errors=2,
            backlog_mqtt=0,
            backlog_influx=backlog,
            rejected=1,
            dropped=0,
        )
        status = GatewayStatusMessage(
            site=SITE,
            gateway=gateway,
            state="degraded" if backlog else "online",
            time="",  # not stored: the record's time is its own
            counters=counters,
            links={"mqtt": "up"},
        )
        self.records.append(gateway_status_record(gateway_origin(SITE, gateway), self.nxt(), self.now - ago, status))

    def readings(self, origin: Origin, agos: range, reading: Callable[[int], Reading]) -> None:
        for ago in agos:
            self.records.append(reading_record(origin, self.nxt(), self.now - ago, reading(ago)))

    def lines(self) -> str:
        return "\n".join(to_lines(self.records))


OXIMETER = get_model("masimo-ascii1").spec


def _clinic(now: float) -> Records:
    """Three rooms of one gateway: room 1 talking, room 2's oximeter silent for the last 60 s, room 3 in standby."""
    r = Records(now)
    ox1, ox2, ox3 = (origin_for(SITE, room, "oximeter", OXIMETER) for room in ("1", "2", "3"))
    cuff1: Origin = {"site": SITE, "room": "1", "device": "cuff", "model": "nibp-test", "kind": "nibp"}
    r.records.append(status_record(ox1, r.nxt(), now - 120, DeviceStatus(DeviceState.CONNECTED)))
    r.records.append(status_record(ox1, r.nxt(), now - 100, DeviceStatus(DeviceState.OK)))

    def talking(ago: int) -> Reading:  # one a second, the last 1 s ago; the one 30 s ago flagged
        flags = ("probe_off",) if ago == 30 else ()
        return Reading({"spo2": 97.0 if ago > 40 else 90.0, "pulse_rate": 72.0, "perfusion_index": 2.5}, flags)

    r.readings(ox1, range(60, 0, -1), talking)
    bp = Reading({"nibp_systolic": 128.0, "nibp_diastolic": 82.0, "nibp_mean": 97.0, "nibp_pulse_rate": 70.0})
    r.records.append(reading_record(cuff1, r.nxt(), now - 600, bp))
    r.records.append(status_record(ox2, r.nxt(), now - 300, DeviceStatus(DeviceState.OK)))
    r.readings(ox2, range(300, 60, -2), lambda _: Reading({"spo2": 95.0, "pulse_rate": 80.0}))  # nothing in 60 s
    r.records.append(status_record(ox2, r.nxt(), now - 55, DeviceStatus(DeviceState.NO_DATA)))
    # room 3: readings and its device's last status change before the dashboards' 1 h range; in standby since
    r.records.append(status_record(ox3, r.nxt(), now - 5030, DeviceStatus(DeviceState.OK)))
    r.readings(ox3, range(5020, 5000, -2), lambda _: Reading({"spo2": 96.0, "pulse_rate": 70.0}))

    spo2 = {"metric": "spo2", "message": "SpO2 low", "limit": 92.0}
    # room 1: spo2-low went indeterminate during the flagged reading and resumed with fresh data
    r.alarm(ox1, "spo2-low", "medium", "raised", 35, value=90.0, **spo2)
    r.alarm(ox1, "spo2-low", "medium", "indeterminate", 30, value=90.0, indeterminate=True, **spo2)
    r.alarm(ox1, "spo2-low", "medium", "resumed", 28, value=90.0, **spo2)
    r.alarm(ox2, "no_data", "high", "raised", 55, message="no data")
    # room 2: spo2-low raised on a low-perfusion value, then the oximeter fell silent: indeterminate
    low_pi = {"value": 91.0, "quality": ("low_perfusion",), **spo2}
    r.alarm(ox2, "spo2-low", "medium", "raised", 100, **low_pi)
    r.alarm(ox2, "spo2-low", "medium", "indeterminate", 58, indeterminate=True, **low_pi)
    # room 3: its no_data alarm was suspended when the room went to standby
    r.alarm(ox3, "no_data", "high", "raised", 4990, message="no data")
    r.alarm(ox3, "no_data", "high", "suspended", 4000, message="no data", role="nurse")
    very_low = {"metric": "spo2", "message": "SpO2 very low", "limit": 88.0}
    r.alarm(ox2, "spo2-very-low", "high", "raised", 200, value=86.0, **very_low)
    r.alarm(ox2, "spo2-very-low", "high", "cleared", 150, value=93.0, **very_low)
    gw = gateway_origin(SITE, "gw-1")
    r.alarm(gw, "broker_lost", "high", "raised", 1800, message="no MQTT connection")
    r.alarm(gw, "broker_lost", "high", "cleared", 1200, message="no MQTT connection")
    r.alarm(gw, "outbox_filling", "medium", "raised", 1500, value=0.85, message="outbox filling")

    room1, room2, room3 = (room_origin(SITE, room) for room in ("1", "2", "3"))
    # room 1 was in standby until its session started; room 2's standby point is older than any standby lasts
    # (its end point lost): neither is in standby now. Room 3 is.
    r.records.append(room_mode_record(room1, r.nxt(), RoomModeEvent("1", "standby", now - 3000, now + 11400, "nurse")))
    r.records.append(
        room_mode_record(room1, r.nxt(), RoomModeEvent("1", "monitoring", now - 1500, reason="session started"))
    )
    r.records.append(room_mode_record(room2, r.nxt(), RoomModeEvent("2", "standby", now - 25 * 3600, now - 21 * 3600)))
    r.records.append(room_mode_record(room3, r.nxt(), RoomModeEvent("3", "standby", now - 4000, now + 10400, "nurse")))
    r.records.append(session_record(room1, r.nxt(), SessionEvent("1", "started", now - 1500, "s-1", now - 1500)))
    base = {"nibp_systolic": 128.0, "nibp_diastolic": 82.0, "nibp_mean": 97.0}
    r.records.append(session_record(room1, r.nxt(), SessionEvent("1", "baseline", now - 600, "s-1", now - 1500, base)))
    for ago, backlog in ((120, 0), (60, 340), (5, 12)):  # the gateway's heartbeat, every status interval
        r.heartbeat("gw-1", ago, backlog)
    return r


def substitute(query: str, room: str = "1", now: float | None = None) -> str:
    """Grafana's macros as Grafana expands them for InfluxQL (a relative 1 h range; one selected room,
    regex-escaped inside the /^...$/ the queries put around it)."""
    start_ms = int(((now or time.time()) - 3600) * 1000)
    return (
        query.replace("$timeFilter", "time > now() - 1h")
        .replace("${__from}", str(start_ms))
        .replace("$__interval_ms", "10000")
        .replace("$__interval", "10s")
        .replace("$room", re.escape(room))
    )


TILE_COLUMNS = ["time", *TILE_FIELDS]
ACTIVE_COLUMNS = ["time", *ALARM_TABLE_COLUMNS]
STRIP = {"A": ["time", "asof"], "B": ["time", "asof"], "C": ["time", "alarm"]}

# (dashboard, panel key) -> the columns its query returns for room 1
EXPECTED_COLUMNS: dict[tuple[str, str], list[str]] = {
    ("wall", "Room $room"): TILE_COLUMNS,
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
    ("gateway", "Broker link, outbox and clock"): ["time", "active"],
    ("gateway", "Technical alarms"): ["time", "priority", "room", "device", "rule", "transition", "value", "message"],
    ("gateway", "Gateway alarms"): ["time", "priority", "device", "rule", "transition", "value", "message"],
}
# queries that may rightly return nothing for this data (gateway gw-1 is current: nobody is OFFLINE)
MAY_BE_EMPTY = {"B"}


def _strip_queries(board: dict[str, Any]) -> dict[str, str]:
    return {t["refId"]: t["query"] for t in _strip(board)["targets"]}


def _tile_now(influxd: Any, db: str, board: dict[str, Any], room: str, now: float) -> dict[str, Any]:
    (query,) = [q for t, q in panel_queries(board) if t == "Room $room"]
    return _reduce_max(_rows(influxd.query(db, substitute(query, room, now))), TILE_FIELDS)


def test_the_wall_and_every_panel_query_on_the_real_influxdb(influxd: Any, influx_db: str) -> None:
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    wall, room_board = boards["wall"], boards["room"]
    tile = _tile(wall)
    now = time.time()
    influxd.write(influx_db, _clinic(now).lines())

    # the live checks first, right after the write (the live window is 10 s, the heartbeat's 15 s)
    values = {room: _tile_now(influxd, influx_db, wall, room, now) for room in ("1", "2", "3")}
    alarms_query = dict(panel_queries(room_board))["Active alarms"]
    table = _panel(room_board, "Active alarms")
    active = {
        room: _sorted_table(table, _rows(influxd.query(influx_db, substitute(alarms_query, room, now))))
        for room in "123"
    }
    strip = {ref: influxd.query(influx_db, q) for ref, q in _strip_queries(wall).items()}

    # room 1 talks: LIVE, its medium spo2-low (resumed), its last trustworthy SpO2 90 (the flagged reading 30 s ago
    # never counts), pulse 72, the BP of 10 minutes ago with its own time, the session started 25 minutes ago
    v1 = values["1"]
    assert _shown_tile(tile, v1)["State"] == ("LIVE", "green") and _shown_tile(tile, v1)["Alarm"] == (
        "MEDIUM",
        "yellow",
    )
    assert (v1["SpO2"], v1["Pulse"], v1["SYS"], v1["DIA"]) == (90, 72, 128, 82)
    assert abs(v1["BP taken"] / 1000 - (now - 600)) < 0.01 and abs(v1["Session"] / 1000 - (now - 1500)) < 0.01
    # room 2 silent for 60 s (its gateway current): NO DATA, grey; its high no_data alarm is the highest
    shown2 = _shown_tile(tile, values["2"])
    assert shown2["State"] == ("NO DATA", NEUTRAL_COLOUR) and shown2["SpO2"] == ("NO DATA", NEUTRAL_COLOUR)
    assert shown2["Alarm"] == ("HIGH", "red") and shown2["SYS"] == ("none in 30m", NEUTRAL_COLOUR)
    # room 3: STANDBY (its alarm suspended), and "no alarm" because every gateway's heartbeat is current
    shown3 = _shown_tile(tile, values["3"])
    assert shown3["State"] == ("STANDBY", "dark-blue") and shown3["Alarm"] == ("no alarm", "transparent")
    assert shown3["Session"] == ("no session", "transparent")

    # active alarms: highest priority first; room 2's spo2-low cannot be determined (quality of the value that
    # raised it) and keeps its start; the cleared spo2-very-low is gone; one row says the feed is current
    shown = _config(table, "indeterminate")
    rows2 = [(a["priority"], a["rule"], _display(shown, a["indeterminate"])[0], a["quality"]) for a in active["2"]]
    assert rows2 == [
        (3, "no_data", "", ""),
        (2, "spo2-low", "cannot be determined", "low_perfusion"),
        (0, None, "", None),  # gw-1: alarm feed current
    ]
    (spo2_low,) = [a for a in active["2"] if a["rule"] == "spo2-low"]
    assert abs(spo2_low["since"] / 1000 - (now - 100)) < 0.01  # when it was raised, not its last transition
    assert [(a["rule"], a["transition"]) for a in active["1"]] == [("spo2-low", "resumed"), (None, None)]
    assert [(a["priority"], a["device"]) for a in active["3"]] == [(0, "gw-1")]  # suspended by standby: not active
    assert _display(_config(table, "priority"), active["3"][0]["priority"])[0] == "alarm feed current"

    # the gateways strip: gw-1 current, as of its last heartbeat 5 s ago; nobody OFFLINE; its outbox alarm
    ((asof,),) = [[row[1] for row in s["values"]] for s in strip["A"]]
    assert abs(asof / 1000 - (now - 5)) < 0.01 and strip["B"] == []
    assert [(s["tags"], s["values"][0][1]) for s in strip["C"]] == [({"device": "gw-1", "rule": "outbox_filling"}, 2)]

    # every query runs and returns the columns its panel expects
    seen: set[tuple[str, str]] = set()
    for name, board in boards.items():
        for title, query in panel_queries(board):
            ref = title.rsplit("/", 1)[-1] if title.startswith("#") else None
            key = (name, "strip" if ref else title)
            series = influxd.query(influx_db, substitute(query, "1", now))  # an InfluxQL error raises here
            if ref:
                assert series or ref in MAY_BE_EMPTY, f"{name} strip {ref}: no rows"
                assert all(s["columns"] == STRIP[ref] for s in series), (name, ref, series)
                continue
            assert key not in seen, f"two queries in {key}: give each its own expectation"
            seen.add(key)
            assert series, f"{key}: no rows for room 1: {substitute(query)}"
            for s in series:
                assert s["columns"] == EXPECTED_COLUMNS[key], f"{key}: {s['columns']}"
    assert seen == set(EXPECTED_COLUMNS)

    # the room list: rooms with vitals in the last 24 h, through the variable's regex
    (listed,) = influxd.query(influx_db, ROOM_LIST_QUERY)
    regex = wall["templating"]["list"][0]["regex"].strip("/")
    assert [row[1] for row in listed["values"] if re.fullmatch(regex, str(row[1]))] == ["1", "2", "3"]

    # a status timeline starts with the state in force at the start of the range (room 3's "ok" 84 minutes ago)
    status = dict(panel_queries(room_board))["Device status"]
    (series,) = influxd.query(influx_db, substitute(status, "3", now))
    assert [row[1] for row in series["values"]] == ["ok"] and series["values"][0][0] / 1e9 < now - 3600
    (series,) = [s for s in influxd.query(influx_db, substitute(status, "2", now)) if s["tags"]["device"] == "oximeter"]
    assert [row[1] for row in series["values"]] == ["ok", "no_data"]

    # trends: a gap is a gap (fill(null)): room 2's last minute has intervals with no value
    trend = dict(panel_queries(room_board))["SpO2"]
    (series,) = influxd.query(influx_db, substitute(trend, "2", now))
    recent = [row[1] for row in series["values"] if row[0] / 1e9 > now - 50]
    assert recent and all(v is None for v in recent)
    health = dict(panel_queries(boards["gateway"]))
    technical = _rows(influxd.query(influx_db, substitute(health["Technical alarms"])))
    assert [(a["room"], a["rule"]) for a in technical] == [("2", "no_data")]
    rates = {s["tags"]["room"]: s for s in influxd.query(influx_db, substitute(health["Readings per second"]))}
    recent = [row[1] for row in rates["2"]["values"] if row[0] / 1e9 > now - 50]
    assert recent and all(r == 0 for r in recent)  # the silent device shows as 0 readings/s


def _two_gateways(now: float, gw2_last: float) -> Records:
    """gw-1 (room 1) current and live; gw-2 (rooms 4, 5) whose last heartbeat was `gw2_last` s ago, room 4 silent
    since then with an active alarm, room 5 in standby."""
    r = Records(now)
    ox1, ox4 = origin_for(SITE, "1", "oximeter", OXIMETER), origin_for(SITE, "4", "oximeter", OXIMETER)
    ox5 = origin_for(SITE, "5", "oximeter", OXIMETER)
    r.readings(ox1, range(20, 0, -1), lambda _: Reading({"spo2": 97.0, "pulse_rate": 70.0}))
    r.readings(ox4, range(int(gw2_last) + 60, int(gw2_last), -1), lambda _: Reading({"spo2": 95.0, "pulse_rate": 75.0}))
    r.readings(ox5, range(int(gw2_last) + 20, int(gw2_last), -1), lambda _: Reading({"spo2": 99.0, "pulse_rate": 60.0}))
    r.alarm(
        ox4, "spo2-low", "medium", "raised", gw2_last + 30, value=91.0, metric="spo2", message="SpO2 low", limit=92.0
    )
    r.records.append(room_mode_record(room_origin(SITE, "5"), r.nxt(), RoomModeEvent("5", "standby", now - 600)))
    for ago in (15.0, 10.0, 5.0):
        r.heartbeat("gw-1", ago)
    for ago in (gw2_last + 10, gw2_last + 5, gw2_last):
        r.heartbeat("gw-2", ago)
    return r


def test_a_silent_gateway_turns_its_rooms_gateway_offline(influxd: Any, influx_db: str) -> None:
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    wall, tile = boards["wall"], _tile(boards["wall"])
    now = time.time()
    influxd.write(influx_db, _two_gateways(now, gw2_last=60).lines())
    shown = {room: _shown_tile(tile, _tile_now(influxd, influx_db, wall, room, now)) for room in ("1", "4", "5")}
    strip = {ref: influxd.query(influx_db, q) for ref, q in _strip_queries(wall).items()}
    alarms_query = dict(panel_queries(boards["room"]))["Active alarms"]
    table = _panel(boards["room"], "Active alarms")
    active4 = _sorted_table(table, _rows(influxd.query(influx_db, substitute(alarms_query, "4", now))))

    # room 1 (gw-1, live) stays LIVE with no alarm; room 4 (gw-2, silent) is GATEWAY OFFLINE and its alarm box
    # does not claim "no alarm"; room 5 keeps STANDBY (the last mode its gateway wrote)
    assert shown["1"]["State"] == ("LIVE", "green") and shown["1"]["Alarm"] == ("no alarm", "transparent")
    assert shown["4"]["State"] == ("GATEWAY OFFLINE", "purple") and shown["4"]["SpO2"] == ("NO DATA", NEUTRAL_COLOUR)
    assert shown["4"]["Alarm"] == ("MEDIUM", "yellow")  # its last known alarm, beside GATEWAY OFFLINE
    assert shown["5"]["State"] == ("STANDBY", "dark-blue")
    assert shown["5"]["Alarm"] == ("alarm feed not current", "purple")
    # the strip: gw-1 current as of 5 s ago, gw-2 OFFLINE since its last heartbeat 60 s ago
    current = {s["tags"]["device"]: s["values"][0][1] for s in strip["A"]}
    silent = {s["tags"]["device"]: s["values"][0][1] for s in strip["B"]}
    assert set(current) == {"gw-1"} and set(silent) == {"gw-2"}
    assert abs(silent["gw-2"] / 1000 - (now - 60)) < 0.01
    assert _config(_strip(wall), "x", "B")["color"] == {"mode": "fixed", "fixedColor": "purple"}
    # the alarm table: "ALARM FEED NOT CURRENT" on top, then the alarm, then the current feed
    priority = _config(table, "priority")
    assert [(_display(priority, a["priority"])[0], a["device"]) for a in active4] == [
        ("ALARM FEED NOT CURRENT", "gw-2"),
        ("MEDIUM", "oximeter"),
        ("alarm feed current", "gw-1"),
    ]


def test_a_point_stamped_in_the_future_is_not_live(influxd: Any, influx_db: str) -> None:
    """A gateway clock 60 s ahead: its readings and heartbeats are in the future, so nothing of it looks live;
    its gateway shows OFFLINE with a last heartbeat time in the future (the clock_skew alarm names the cause)."""
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    wall = boards["wall"]
    now = time.time()
    r = Records(now)
    r.readings(origin_for(SITE, "7", "oximeter", OXIMETER), range(-50, -70, -1), lambda _: Reading({"spo2": 98.0}))
    r.heartbeat("gw-skewed", -60)
    influxd.write(influx_db, r.lines())
    values = _tile_now(influxd, influx_db, wall, "7", now)
    silent = influxd.query(influx_db, _strip_queries(wall)["B"])
    assert values["SpO2"] is None and values["State"] == 1  # not LIVE: GATEWAY OFFLINE
    assert [s["tags"]["device"] for s in silent] == ["gw-skewed"] and silent[0]["values"][0][1] / 1000 > now


def test_with_influxdb_stopped_the_queries_fail_and_the_panels_say_so(influxd: Any, influx_db: str) -> None:
    """No answer at all: every query errors (Grafana shows its error sign), and what the panels show instead is
    their empty text and null mapping, which are not reassuring (test_empty_texts_are_never_reassuring)."""
    boards = build_all(EXAMPLE_KETAMINE_PROFILE)
    now = time.time()
    influxd.write(influx_db, _clinic(now).lines())
    influxd.stop()
    for board in boards.values():
        for _, query in panel_queries(board):
            with pytest.raises((InfluxError, OSError)):
                influxd.query(influx_db, substitute(query, "1", now))
    tile, strip = _tile(boards["wall"]), _strip(boards["wall"])
    assert _display(tile["fieldConfig"]["defaults"], None) == ("NO DATA", NEUTRAL_COLOUR)
    assert _display(strip["fieldConfig"]["defaults"], None) == ("NO DATA: no gateway heartbeat", "purple")
    assert _panel(boards["room"], "Active alarms")["fieldConfig"]["defaults"]["noValue"].startswith("NO DATA")


# --- kiosk access --------------------------------------------------------------------------------------------


def test_the_kiosk_needs_no_login_that_expires() -> None:
    """Anonymous viewers in the organisation the dashboards are provisioned into: no session, nothing expires."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    provider = yaml.safe_load((REPO / "dashboards/provisioning/dashboards/infusion.yaml").read_text())
    (dashboards,) = provider["providers"]
    datasources = yaml.safe_load((REPO / "dashboards/provisioning/datasources/influxdb.yaml").read_text())
    assert dashboards["orgId"] == datasources["datasources"][0]["orgId"] == 1
    assert env["GF_AUTH_ANONYMOUS_ORG_NAME"] == "Main Org."  # Grafana's name of organisation 1
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false" and "GF_SECURITY_ADMIN_PASSWORD__FILE" in env
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].endswith("/infusion-wall.json")


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


def test_main_build_uses_the_config_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[influx]\napi = "v1"\nurl = "http://127.0.0.1:8086"\ndatabase = "infusion"\n\n'
        '[alarms]\nprofile = "clinic-c"\n\n[[alarms.rules]]\nid = "spo2-low"\nmetric = "spo2"\nbelow = 93\n'
        'priority = "high"\n'
    )
    assert main_build(config, tmp_path / "out") == 0
    assert "status_interval_s" not in capsys.readouterr().err  # the default 5 s suits the wall's 15 s
    wall = json.loads((tmp_path / "out" / "infusion-wall.json").read_text())
    assert _steps(_config(_tile(wall), "SpO2")) == [(None, "red"), (93, "green")]
    assert "example" not in wall["title"]
    assert main_build(tmp_path / "missing.toml", tmp_path / "out") == 2
    config.write_text(config.read_text().replace("[influx]", "[gateway]\nstatus_interval_s = 10\n\n[influx]"))
    assert main_build(config, tmp_path / "out") == 0
    assert "status_interval_s = 10: the wall calls a gateway OFFLINE after 15 s" in capsys.readouterr().err


def test_the_schema_check_types_every_dashboard_and_panel(tmp_path: Path) -> None:
    """What `make check-dashboards` hands to tsc (tsc itself runs there): every dashboard, and every panel by its
    own plugin's type; a panel type the check does not know is a type error, never a silent pass."""
    text = source(sorted(GENERATED_DIR.glob("*.json")))
    assert text.count("satisfies DashboardJson;") == 3
    for board in build_all(EXAMPLE_KETAMINE_PROFILE).values():
        for panel in board["panels"]:
            assert f"satisfies {PANEL_TYPES[panel['type']]};" in text
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"title": "x", "panels": [{"type": "piechart", "id": 1}]}))
    assert "satisfies never /* unknown panel type 'piechart' */;" in source([odd])
