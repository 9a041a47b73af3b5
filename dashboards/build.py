"""The three Grafana dashboards, built with grafana-foundation-sdk and rendered to JSON.

Every query is raw InfluxQL (InfluxDB 1.x, 2.x through its DBRP mapping, 3.x) over the measurements of
docs/influx.md, with Grafana's macros `$timeFilter`, `$__interval`, `$__interval_ms`, `${__from}` and the `$room`
variable (always as a regex, `"room" =~ /^$room$/`, which is how Grafana formats a multi-value variable for InfluxQL).

Rules kept here (docs/dashboards.md says why, for a nurse):
- The wall shows every room at once: one compact stat tile per room, repeated by `$room`, laid out by
  `wall_layout()` so that the rooms fit one 1920x1080 kiosk screen without scrolling.
- A live value is bounded on both sides (`time > now() - 10s AND time < now() + 2s`): a silent device, or a clock
  ahead, never shows an old or future number as current. Larger skews are the `clock_skew` alarm's job.
- Nothing empty reads as all clear. "No data" is its own neutral grey value mapping, never a threshold colour; "no
  alarm" is shown only with positive evidence (the room's live data, or every gateway's heartbeat in the last 15 s);
  a gateway silent for longer turns the silent rooms GATEWAY OFFLINE and the alarm lists say "alarm feed not current".
- Colours and limit lines of SpO2, pulse rate and blood pressure come from the alarm profile's rules, so the wall and
  the alarms never disagree. The shipped example profile is labelled as such wherever it is shown.
- A room in standby says STANDBY (never green), and an alarm whose condition cannot be determined says so on its row.

InfluxQL cannot join measurements or select a time as a value; the few tricks used instead (one query over several
subqueries whose rows Grafana's table format puts in one frame, elapsed() from an anchor at the epoch) are explained
where they are built, and every query runs against a real influxd in tests/dashboards.

The grafana-foundation-sdk build pinned here (Grafana 11.6) has no InfluxDB query builder: `InfluxQLQuery` below is
the small dataquery variant it lacks, in the SDK's own shape (a `cogvariants.Dataquery` with `to_json`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import stat, statetimeline, table, text, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models.text import TextMode

from devices.base import DeviceState
from gateway.alarms import PRIORITIES, AlarmProfile, Priority, ThresholdRule
from gateway.envelope import STANDBY_MAX_S

GENERATED_DIR = Path(__file__).parent / "generated"

WALL_UID = "infusion-wall"
ROOM_UID = "infusion-room"
GATEWAY_UID = "infusion-gateway"

LIVE_WINDOW = "10s"  # a live value is no older than this
FUTURE_SLACK = "2s"  # ... and no newer than now + this: a gateway clock ahead cannot keep a silent device live
BP_WINDOW = "30m"  # the last blood pressure is shown this long, with its age
SESSION_WINDOW = "24h"  # the last session start/stop looked at
ACTIVE_ALARM_WINDOW = "7d"  # an alarm raised longer ago than this and never cleared is not shown as active
HEARTBEAT_STALE_S = 15  # a gateway whose last heartbeat is older than this is silent (3 x the default 5 s)
SEEN_WINDOW = "24h"  # rooms and gateways seen this recently are listed; a silent one stays listed this long
STATE_LOOKBACK = "400d"  # how far back a timeline looks for the state in force at the start of its range
# Standby lasts at most STANDBY_MAX_S (24 h) and its end is written as a `monitoring` point; looking back a little
# longer than that bounds a standby whose end point was lost (1445m: InfluxQL wants a single unit).
STANDBY_WINDOW = f"{round(STANDBY_MAX_S / 60) + 5}m"
NO_DATA = "NO DATA"
EXAMPLE_LABEL = "example alarm limits, not advice"

ROOM_MATCH = '"room" =~ /^$room$/'  # Grafana formats $room as a regex alternation for InfluxQL
GATEWAY_ROOM = "\"room\" = '_gateway'"
ROOM_NAME_REGEX = "/^[a-z0-9][a-z0-9_-]{0,31}$/"  # gateway.config NAME_RE: what a room may be called

PRIORITY_COLOURS: dict[Priority, str] = {"high": "red", "medium": "yellow", "low": "blue"}
PRIORITY_CODES: dict[Priority, int] = {p: i + 1 for i, p in enumerate(PRIORITIES)}  # low 1, medium 2, high 3
OK_COLOUR = "green"
NEUTRAL_COLOUR = "#808080"  # grey: no data. Not a threshold colour, not a priority, not green
STANDBY_COLOUR = "dark-blue"  # not green (nobody is monitored), not an alarm colour
INDETERMINATE_COLOUR = "purple"  # unknown: neither an alarm priority nor all clear
UNKNOWN_COLOUR = INDETERMINATE_COLOUR  # a silent gateway, an alarm feed that is not current: unknown too
PROBE_OFF_COLOUR = "orange"
INDETERMINATE_TEXT = "cannot be determined"
FEED_NOT_CURRENT = "alarm feed not current"
NONE = "transparent"  # no highlight: the theme's background, text in the theme's text colour

STATE_COLOURS: dict[DeviceState, str] = {
    DeviceState.OK: "green",
    DeviceState.MEASURING: "green",
    DeviceState.CONNECTED: "blue",
    DeviceState.SEARCHING: "yellow",
    DeviceState.PROBE_OFF: "yellow",
    DeviceState.NO_SENSOR: "yellow",
    DeviceState.CUFF_ERROR: "yellow",
    DeviceState.SENSOR_FAULT: "red",
    DeviceState.NO_DATA: "red",
    DeviceState.DISCONNECTED: "red",
}

BP_FIELDS = {"SYS": "nibp_systolic", "DIA": "nibp_diastolic", "MAP": "nibp_mean"}

# The room state of a wall tile: one number per branch of the tile's query, the highest wins (Grafana's "max").
# A room with live data has a working gateway, so LIVE and PROBE OFF outrank GATEWAY OFFLINE; standby outranks all.
ROOM_STATES: dict[int, tuple[str, str]] = {
    1: ("GATEWAY OFFLINE", UNKNOWN_COLOUR),
    2: ("LIVE", OK_COLOUR),
    3: ("PROBE OFF", PROBE_OFF_COLOUR),
    4: ("STANDBY", STANDBY_COLOUR),
}
# The highest active alarm of a tile: -1 (or nothing at all) unless there is evidence that the feed is current.
ALARM_STATES: dict[int, tuple[str, str]] = {
    -1: (FEED_NOT_CURRENT, UNKNOWN_COLOUR),
    0: ("no alarm", NONE),
    **{PRIORITY_CODES[p]: (p.upper(), PRIORITY_COLOURS[p]) for p in PRIORITIES},
}
FEED_CODE_CURRENT, FEED_CODE_SILENT = 0, len(PRIORITIES) + 1  # alarm-table rows of the gateways' feed
PROBE_OFF_FLAGS = ("probe_off", "no_sensor")


# --- the InfluxQL dataquery the SDK build lacks --------------------------------------------------------------


class InfluxQLQuery(cogvariants.Dataquery):
    """A raw-InfluxQL target of Grafana's InfluxDB datasource (query language InfluxQL)."""

    def __init__(
        self,
        query: str,
        datasource: dash_m.DataSourceRef,
        ref_id: str = "A",
        result_format: Literal["time_series", "table"] = "time_series",
        alias: str | None = None,
    ) -> None:
        self.query = query
        self.datasource = datasource
        self.ref_id = ref_id
        self.result_format = result_format
        self.alias = alias

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "refId": self.ref_id,
            "datasource": self.datasource,
            "query": self.query,
            "rawQuery": True,
            "resultFormat": self.result_format,
        }
        if self.alias is not None:
            payload["alias"] = self.alias
        return payload


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    def __init__(self, query: str, datasource: dash_m.DataSourceRef) -> None:
        self._internal = InfluxQLQuery(query, datasource)

    def build(self) -> InfluxQLQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> Self:
        self._internal.ref_id = ref_id
        return self

    def table(self) -> Self:
        self._internal.result_format = "table"
        return self

    def alias(self, alias: str) -> Self:
        self._internal.alias = alias
        return self


# --- a small InfluxQL builder --------------------------------------------------------------------------------


def select(fields: str, source: str, where: str = "", group_by: str = "") -> str:
    """One SELECT. `source` is a quoted measurement or `sources(...)`; `group_by` may end with a fill()."""
    query = f"SELECT {fields} FROM {source}"
    if where:
        query += f" WHERE {where}"
    if group_by:
        query += f" GROUP BY {group_by}"
    return query


def sources(*queries: str) -> str:
    """Subqueries as the FROM of one SELECT: their rows of one measurement (and tags) form one series.

    InfluxDB 1.6 types the fields of such a SELECT from its FIRST source: a field that source lacks is read as a
    float, and an integer, string or boolean one of a later source is then lost. So an outer query either selects
    raw fields (rows pass through whatever their type), or aggregates fields that its first source names, each
    with its type (a placeholder such as `last("seq") * 0 AS "since"` where that source has no value of its own).
    """
    return ", ".join(f"({q})" for q in queries)


def window(since: str, ahead: str = FUTURE_SLACK) -> str:
    """Both bounds of a now-relative window: a point stamped in the future (a clock ahead) is not in it."""
    return f"time > now() - {since} AND time < now() + {ahead}"


def tags(*names: str) -> str:
    return ", ".join(f'"{n}"' for n in names)


LIVE = window(LIVE_WINDOW)
HEARTBEAT_CURRENT = window(f"{HEARTBEAT_STALE_S}s")
# Seen: a gateway stamping up to a day into the future is seen (and not current). An explicit upper bound, because
# InfluxDB bounds a GROUP BY time() query without one at now(), which would hide those points from epoch_ms' anchor.
SEEN = window(SEEN_WINDOW, SEEN_WINDOW)
EPOCH_BUCKET = "time(100000d)"  # one bucket from 1970 to 2243: InfluxDB stamps its row with the epoch


def epoch_ms(alias: str, point: str, anchor: str, group_by: str = "") -> str:
    """The time of the row `point` returns, as a number (epoch milliseconds) in the column `alias`.

    InfluxQL cannot select a time as a value, but elapsed() gives the time between consecutive points of a series.
    `anchor` is the same selection in one `GROUP BY time(100000d)` bucket, whose row InfluxDB stamps at the epoch,
    so elapsed(anchor -> point) is the point's own time. Both select one column named "x"; `fill(none)` keeps the
    anchor away when there is no point. Grafana formats the number with a date unit (`dateTimeFromNow`).
    """
    return select(f'elapsed("x", 1ms) AS "{alias}"', sources(anchor, point), group_by=group_by)


def last_time(alias: str, field: str, measurement: str, where: str, group: tuple[str, ...] = ()) -> str:
    """`epoch_ms` of the last point with `field` matching `where` (per `group` tags)."""
    point = select(f'last("{field}") AS "x"', f'"{measurement}"', where, tags(*group))
    anchor = select(f'last("{field}") AS "x"', f'"{measurement}"', where, ", ".join([EPOCH_BUCKET, *map(tags, group)]))
    return epoch_ms(alias, point, anchor + " fill(none)", tags(*group))


def gateway_silence() -> str:
    """Per gateway (tag `device`): "silent" 1 when it wrote a heartbeat in the last 24 h but none in the last 15 s
    (or only stamped in the future), else 0. InfluxQL cannot test for absence, so it sums +1 (seen) and -1 (current),
    two subqueries of the same measurement that InfluxDB merges into one series per gateway."""
    seen = select('last("seq") * 0 + 1 AS "g"', '"gateway"', SEEN, tags("device"))
    current = select('last("seq") * 0 - 1 AS "g"', '"gateway"', HEARTBEAT_CURRENT, tags("device"))
    return select('sum("g") AS "silent"', sources(seen, current), group_by=tags("device"))


def gateway_feed() -> str:
    """Per gateway: "asof" (epoch ms of its last heartbeat) and "silent" (1 or 0), in one row."""
    seen = select('last("seq") * 0 + 1 AS "g", last("seq") * 0 AS "asof"', '"gateway"', SEEN, tags("device"))
    current = select('last("seq") * 0 - 1 AS "g"', '"gateway"', HEARTBEAT_CURRENT, tags("device"))
    asof = last_time("asof", "seq", "gateway", SEEN, ("device",))
    return select('max("asof") AS "asof", sum("g") AS "silent"', sources(seen, current, asof), group_by=tags("device"))


def _active(room_condition: str, fields: tuple[str, ...], placeholder: str = "") -> str:
    """The last transition of every alarm (device/rule) in the window; `active` says whether it left it active.
    `placeholder`: an integer column (0) to declare for a later source (see `sources`)."""
    chosen = ", ".join(f'last("{f}") AS "{f}"' for f in ("active", "priority", *fields, "seq"))
    if placeholder:
        chosen += f', last("seq") * 0 AS "{placeholder}"'
    return select(chosen, '"alarms"', f"{room_condition} AND {window(ACTIVE_ALARM_WINDOW)}", tags("device", "rule"))


def _by_priority(active: str, columns: str, alias: str, group: tuple[str, ...]) -> list[str]:
    """One branch per priority: its active alarms with the priority as a number (the string cannot be sorted or
    compared, and InfluxQL has no CASE)."""
    return [
        select(
            f'{columns}"seq" * 0 + {PRIORITY_CODES[p]} AS "{alias}"',
            sources(active),
            f'"active" = true AND "priority" = \'{p}\'',
            tags(*group),
        )
        for p in reversed(PRIORITIES)
    ]


# --- the wall's room tile ------------------------------------------------------------------------------------

TILE_FIELDS = ("State", "Alarm", "SpO2", "Pulse", "SYS", "DIA", "BP taken", "Session")


def room_tile_query(room_condition: str = ROOM_MATCH) -> str:
    """Everything a room's wall tile shows, in one query (table format).

    Each branch is a subquery giving a row with some of TILE_FIELDS; the outer SELECT passes every row through,
    Grafana's table format puts the rows of all measurements in one frame, and the stat panel reduces each field
    with "max" (nulls ignored). A field no branch answered is null: the panel maps null to its neutral "no data"
    text. States and alarms are numbers (ROOM_STATES, ALARM_STATES) so that max() ranks them.
    """
    room = room_condition
    valid_live = f'{room} AND "valid" = true AND {LIVE}'
    bp = f'{room} AND "valid" = true AND {window(BP_WINDOW)}'
    probe_re = "/(^|,)(" + "|".join(PROBE_OFF_FLAGS) + ")(,|$)/"
    last_flags = select('last("flags") AS "flags"', '"vitals"', f"{room} AND {LIVE}", tags("device"))
    mode = select('last("mode") AS "mode"', '"room_mode"', f"{room} AND {window(STANDBY_WINDOW)}")
    session_last = select(
        'last("transition") AS "x"',
        '"sessions"',
        f"{room} AND \"transition\" != 'baseline' AND {window(SESSION_WINDOW)}",
    )
    session_anchor = select(
        'last("transition") AS "x"',
        '"sessions"',
        f"{room} AND \"transition\" != 'baseline' AND {window(SESSION_WINDOW)}",
        f"{EPOCH_BUCKET} fill(none)",
    )
    active = _active(room, ())
    branches = [
        select('last("spo2") AS "SpO2", last("pulse_rate") AS "Pulse"', '"vitals"', valid_live),
        select('last("spo2") * 0 + 2 AS "State"', '"vitals"', valid_live),  # LIVE
        select('count("flags") * 0 + 3 AS "State"', sources(last_flags), f'"flags" =~ {probe_re}'),  # PROBE OFF
        select('last("seq") * 0 AS "Alarm"', '"vitals"', f"{room} AND {LIVE}"),  # its gateway is writing: current
        select('last("nibp_systolic") AS "SYS", last("nibp_diastolic") AS "DIA"', '"vitals"', bp),
        last_time("BP taken", "nibp_systolic", "vitals", bp),
        select('count("mode") * 0 + 4 AS "State"', sources(mode), "\"mode\" = 'standby'"),  # STANDBY
        epoch_ms("Session", select('"x"', sources(session_last), "\"x\" = 'started'"), session_anchor),
        *(
            select(f'max("seq") * 0 + {PRIORITY_CODES[p]} AS "Alarm"', sources(active), cond)
            for p in PRIORITIES
            for cond in [f'"active" = true AND "priority" = \'{p}\'']
        ),
        select('max("silent") AS "State"', sources(gateway_silence()), '"silent" > 0'),  # GATEWAY OFFLINE
        select('0 - max("silent") AS "Alarm"', sources(gateway_silence())),  # 0: every gateway current, -1: not
    ]
    return select(", ".join(f'"{f}"' for f in TILE_FIELDS), sources(*branches))


# --- the wall's layout ---------------------------------------------------------------------------------------

SCREEN_PX = (1920, 1080)
KIOSK_PADDING_PX = 16  # Grafana's page padding around the grid in kiosk mode (no header, no variables)
GRID_COLUMNS = 24
GRID_ROW_PX = 30
GRID_MARGIN_PX = 8
PANEL_HEADER_PX = 32  # a panel's title bar
MAX_PER_ROW_CHOICES = (2, 3, 4, 6, 8, 12)  # Grafana's "max per row" choices: each divides the 24 columns
WALL_ROOMS = 24  # the committed wall is laid out for this many rooms (fewer fit too, in wider tiles)
STRIP_ROWS = 2  # the gateways strip above the rooms
BANNER_ROWS = 1  # the example-profile banner


def screen_rows(height_px: int = SCREEN_PX[1]) -> int:
    """Grid rows that fit the kiosk screen: n rows take n * 30 + (n - 1) * 8 px."""
    return (height_px - 2 * KIOSK_PADDING_PX + GRID_MARGIN_PX) // (GRID_ROW_PX + GRID_MARGIN_PX)


def panel_px(w: float, h: int, width_px: int = SCREEN_PX[0]) -> tuple[float, int]:
    """A panel's size in pixels on the kiosk screen, for w columns and h rows."""
    column = (width_px - 2 * KIOSK_PADDING_PX + GRID_MARGIN_PX) / GRID_COLUMNS
    return w * column - GRID_MARGIN_PX, h * (GRID_ROW_PX + GRID_MARGIN_PX) - GRID_MARGIN_PX


def value_box_px(w: float, h: int, values: int = len(TILE_FIELDS)) -> float:
    """The side of the largest square value box when `values` boxes share a panel's body in a grid."""
    body_w, body_h = panel_px(w, h)
    body_h -= PANEL_HEADER_PX
    return max(min(body_w / cols, body_h / math.ceil(values / cols)) for cols in range(1, values + 1))


@dataclass(frozen=True)
class WallLayout:
    """Where the room tiles go: Grafana repeats the tile per room, `per_row` to a row, each `tile_w` x `tile_h`."""

    rooms: int
    top: int  # grid rows above the tiles (banner, gateways strip)
    per_row: int  # the repeated panel's maxPerRow
    tile_h: int

    @property
    def tile_w(self) -> int:
        return GRID_COLUMNS // self.per_row

    def grid_for(self, rooms: int) -> tuple[float, int, int]:
        """(tile width, rows of tiles, grid rows used in all) when Grafana repeats the tile for `rooms` rooms: it
        gives each copy max(24 / rooms, 24 / maxPerRow) columns and wraps after maxPerRow copies."""
        width = max(GRID_COLUMNS / max(rooms, 1), GRID_COLUMNS / self.per_row)
        rows = math.ceil(rooms / self.per_row)
        return width, rows, self.top + rows * self.tile_h


def wall_layout(rooms: int = WALL_ROOMS, banner: bool = False) -> WallLayout:
    """The tile grid that shows `rooms` rooms on one kiosk screen with the biggest value boxes."""
    top = STRIP_ROWS + (BANNER_ROWS if banner else 0)
    free = screen_rows() - top
    best: tuple[float, int, WallLayout] | None = None
    for per_row in MAX_PER_ROW_CHOICES:
        rows = math.ceil(rooms / per_row)
        tile_h = free // rows
        if tile_h < 3:
            continue
        layout = WallLayout(rooms, top, per_row, tile_h)
        key = (value_box_px(layout.tile_w, tile_h), -rows, layout)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        raise ValueError(f"{rooms} rooms do not fit one screen of {screen_rows()} grid rows")
    return best[2]


# --- thresholds from the alarm profile -----------------------------------------------------------------------


def _drawable(profile: AlarmProfile, metric: str) -> list[ThresholdRule]:
    """Fixed-limit rules for every room. Baseline rules depend on the session and room-specific rules on the
    room, so neither can be one colour scale of a panel repeated for every room."""
    return [r for r in profile.rules if r.metric == metric and not r.rooms and r.above_baseline_pct is None]


def limit_steps(profile: AlarmProfile, metric: str) -> list[dash_m.Threshold]:
    """Grafana threshold steps that colour a value exactly as the profile's rules judge it.

    A step applies from its value upwards (v >= step). `below = B` is violated for v < B, so the step is at B;
    `above = A` is violated for v > A, so the step is at the next float above A (v >= that <=> v > A). Each band
    takes the colour of the highest priority violated there; green where none is.
    """
    rules = _drawable(profile, metric)

    def colour(value: float) -> str:
        worst = -1
        for rule in rules:
            if (rule.below is not None and value < rule.below) or (rule.above is not None and value > rule.above):
                worst = max(worst, PRIORITIES.index(rule.priority))
        return PRIORITY_COLOURS[PRIORITIES[worst]] if worst >= 0 else OK_COLOUR

    bounds = sorted(
        {r.below if r.below is not None else math.nextafter(float(r.above or 0.0), math.inf) for r in rules}
    )
    steps = [dash_m.Threshold(value=None, color=colour(-math.inf))]
    for bound in bounds:
        if (c := colour(bound)) != steps[-1].color:
            steps.append(dash_m.Threshold(value=bound, color=c))
    return steps


def _thresholds(steps: list[dash_m.Threshold]) -> dash_b.ThresholdsConfig:
    return dash_b.ThresholdsConfig().mode(dash_m.ThresholdsMode.ABSOLUTE).steps(steps)


def _fixed(colour: str) -> dash_b.ThresholdsConfig:
    return _thresholds([dash_m.Threshold(value=None, color=colour)])


def _thresholds_value(steps: list[dash_m.Threshold]) -> dash_m.DynamicConfigValue:
    return dash_m.DynamicConfigValue(
        id_val="thresholds",
        value=dash_m.ThresholdsConfig(mode=dash_m.ThresholdsMode.ABSOLUTE, steps=steps),
    )


# --- shared pieces -------------------------------------------------------------------------------------------


def _text_map(values: dict[str, tuple[str, str]]) -> dash_m.ValueMap:
    """value -> (display text, colour)."""
    return dash_m.ValueMap(
        options={k: dash_m.ValueMappingResult(text=t, color=c, index=i) for i, (k, (t, c)) in enumerate(values.items())}
    )


def _code_map(codes: dict[int, tuple[str, str]]) -> dash_m.ValueMap:
    return _text_map({str(k): v for k, v in codes.items()})


def _no_data_map(shown: str = NO_DATA, colour: str = NEUTRAL_COLOUR) -> dash_m.SpecialValueMap:
    """Null (no value) shows `shown` in its own colour: without it Grafana colours "no value" with the lowest
    threshold step (a NO DATA SpO2 would be red, a NO DATA pulse yellow)."""
    return dash_m.SpecialValueMap(
        options=dash_m.DashboardSpecialValueMapOptions(
            match=dash_m.SpecialValueMatch.NULL_AND_NAN,
            result=dash_m.ValueMappingResult(text=shown, color=colour, index=0),
        )
    )


def _priority_map() -> dash_m.ValueMap:
    return _text_map({p: (p.upper(), PRIORITY_COLOURS[p]) for p in reversed(PRIORITIES)})


def _state_map() -> dash_m.ValueMap:
    return _text_map({str(s): (str(s).replace("_", " "), c) for s, c in STATE_COLOURS.items()})


def _coloured_cells() -> dash_m.DynamicConfigValue:
    return dash_m.DynamicConfigValue(
        id_val="custom.cellOptions",
        value=common.TableColoredBackgroundCellOptions(mode=common.TableCellBackgroundDisplayMode.BASIC),
    )


def _coloured_column(name: str) -> tuple[str, list[dash_m.DynamicConfigValue]]:
    return name, [dash_m.DynamicConfigValue(id_val="mappings", value=[_priority_map()]), _coloured_cells()]


def _age_unit() -> tuple[str, list[dash_m.DynamicConfigValue]]:
    return "time", [dash_m.DynamicConfigValue(id_val="unit", value="dateTimeFromNow")]


def _series(name: str) -> str:
    """Matches a series named `name` (alias $col) or `<measurement>.name` (Grafana's default display name)."""
    return f"/(^|\\.){re.escape(name)}$/"


def _reduce(fields: str = "", calc: str = "lastNotNull") -> common_b.ReduceDataOptions:
    return common_b.ReduceDataOptions().values(False).calcs([calc]).fields(fields)


def _blank_when_empty(names: str) -> tuple[str, list[dash_m.DynamicConfigValue]]:
    """An override for columns that may hold null or "" (no value, no quality flags, no role): Grafana shows a
    field's "no value" text in such a cell, and a table's is its empty-panel message."""
    return f"/^({names})$/", [dash_m.DynamicConfigValue(id_val="noValue", value="")]


def _indeterminate_column() -> tuple[str, list[dash_m.DynamicConfigValue]]:
    """true -> "cannot be determined" on the whole row (purple), so it never reads as an ordinary active alarm."""
    return "indeterminate", [
        dash_m.DynamicConfigValue(
            id_val="mappings",
            value=[
                _text_map({"true": (INDETERMINATE_TEXT, INDETERMINATE_COLOUR), "false": ("", NONE)}),
                _no_data_map("", NONE),  # a feed row: without it the row would take the default threshold green
            ],
        ),
        dash_m.DynamicConfigValue(
            id_val="custom.cellOptions",
            value=common.TableColoredBackgroundCellOptions(
                mode=common.TableCellBackgroundDisplayMode.BASIC, apply_to_row=True
            ),
        ),
        dash_m.DynamicConfigValue(id_val="noValue", value=""),
    ]


def _unit(unit: str) -> dash_m.DynamicConfigValue:
    return dash_m.DynamicConfigValue(id_val="unit", value=unit)


def _mappings(*maps: dash_m.ValueMap | dash_m.SpecialValueMap) -> dash_m.DynamicConfigValue:
    return dash_m.DynamicConfigValue(id_val="mappings", value=list(maps))


def _fixed_colour(colour: str) -> dash_m.DynamicConfigValue:
    return dash_m.DynamicConfigValue(
        id_val="color", value=dash_m.FieldColor(mode=dash_m.FieldColorModeId.FIXED, fixed_color=colour)
    )


class _Ids:
    """Stable panel ids, so regenerating gives the same JSON."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> int:
        self._next += 1
        return self._next


def _dashboard(uid: str, title: str, description: str, profile: AlarmProfile, tags_: list[str]) -> dash_b.Dashboard:
    if profile.example:
        title = f"{title} ({EXAMPLE_LABEL})"
        description = f"{description} Alarm profile {profile.name!r}: {EXAMPLE_LABEL.upper()}."
    else:
        description = f"{description} Alarm profile {profile.name!r}."
    return (
        dash_b.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["infusion-telemetry", *tags_, *(["example-profile"] if profile.example else [])])
        .timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .link(
            dash_b.DashboardLink("Infusion dashboards")
            .type(dash_m.DashboardLinkType.DASHBOARDS)
            .tags(["infusion-telemetry"])
            .as_dropdown(True)
            .include_vars(True)
        )
    )


ROOM_LIST_QUERY = select(
    '"room", "seen"',
    sources(select('last("seq") * 0 - 1 AS "seen"', '"vitals"', SEEN, tags("room"))),
)


def _room_variable(ds: dash_m.DataSourceRef, multi: bool) -> dash_b.QueryVariable:
    """Rooms that reported vitals in the last 24 h, re-read with every refresh of the time range (a kiosk's auto
    refresh included), so a new room appears and a retired one leaves within a day. `SHOW TAG VALUES` would list
    every room of the whole retention (InfluxDB 1.x ignores a time condition there), so this is a SELECT; its
    second column ("seen", always -1) is dropped by the regex, which keeps only valid room names."""
    var = (
        dash_b.QueryVariable("room")
        .label("Room")
        .datasource(ds)
        .query(ROOM_LIST_QUERY)
        .regex(ROOM_NAME_REGEX)
        .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dash_m.VariableSort.NATURAL_ASC)
        .multi(multi)
        .include_all(multi)
    )
    if multi:
        var = var.current(dash_m.VariableOption(selected=True, text=["All"], value=["$__all"]))
    return var


def _example_banner(profile: AlarmProfile, ids: _Ids, height: int) -> text.Panel | None:
    if not profile.example:
        return None
    return (
        text.Panel()
        .id(ids())
        .title("")
        .transparent(True)
        .mode(TextMode.MARKDOWN)
        .content(
            f"**{EXAMPLE_LABEL.upper()}**: colours and limit lines follow the shipped profile `{profile.name}`, "
            "an example of a site policy. Every site sets its own limits with its clinicians."
        )
        .height(height)
        .span(24)
    )


# --- the wall ------------------------------------------------------------------------------------------------


def gateways_panel(ids: _Ids, ds: dash_m.DataSourceRef, height: int) -> stat.Panel:
    """Per gateway "data current as of HH:MM:SS" from its heartbeat (green), or OFFLINE with the time of its last
    one (purple), and its active alarms (broker_lost, outbox_filling, clock_skew...) by priority."""
    feed = gateway_feed()
    current = select('"asof"', sources(feed), '"silent" = 0', tags("device"))
    silent = select('"asof"', sources(feed), '"silent" > 0', tags("device"))
    alarms = select(
        'max("p") AS "alarm"',
        sources(*_by_priority(_active(GATEWAY_ROOM, ()), "", "p", ("device", "rule"))),
        group_by=tags("device", "rule"),
    )
    clock = "time:HH:mm:ss"
    return (
        stat.Panel()
        .id(ids())
        .title("")
        .description(
            f"Each gateway's last heartbeat (the `gateway` measurement, every status_interval_s): green 'data current "
            f"as of' while it is newer than {HEARTBEAT_STALE_S} s, purple 'OFFLINE' with the time of the last one "
            "otherwise (or when it is stamped in the future: a clock ahead). Then each active gateway alarm. Nothing "
            "at all: no gateway wrote in 24 h, or the database did not answer."
        )
        .datasource(ds)
        .with_target(InfluxQL(current, ds).ref_id("A").alias("$tag_device: data current as of"))
        .with_target(InfluxQL(silent, ds).ref_id("B").alias("$tag_device OFFLINE since"))
        .with_target(InfluxQL(alarms, ds).ref_id("C").alias("$tag_device $tag_rule"))
        .no_value(f"{NO_DATA}: no gateway heartbeat")
        .mappings([_no_data_map(f"{NO_DATA}: no gateway heartbeat", UNKNOWN_COLOUR)])
        .override_by_query("A", [_unit(clock), _fixed_colour(OK_COLOUR)])
        .override_by_query("B", [_unit(clock), _fixed_colour(UNKNOWN_COLOUR)])
        .override_by_query(
            "C",
            [
                _mappings(_code_map({PRIORITY_CODES[p]: (p.upper(), PRIORITY_COLOURS[p]) for p in PRIORITIES})),
                dash_m.DynamicConfigValue(
                    id_val="color", value=dash_m.FieldColor(mode=dash_m.FieldColorModeId.THRESHOLDS)
                ),
            ],
        )
        .thresholds(_fixed(NEUTRAL_COLOUR))
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.THRESHOLDS))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .orientation(common.VizOrientation.VERTICAL)
        .reduce_options(_reduce())
        .height(height)
        .span(24)
    )


def _field(name: str, *props: dash_m.DynamicConfigValue) -> tuple[str, list[dash_m.DynamicConfigValue]]:
    return name, list(props)


def room_tile(ids: _Ids, ds: dash_m.DataSourceRef, profile: AlarmProfile, layout: WallLayout) -> stat.Panel:
    """One stat panel per room (repeated by $room): State, Alarm, SpO2, Pulse, SYS, DIA, BP taken, Session."""
    no_bp = f"none in {BP_WINDOW}"
    date = "dateTimeFromNow"
    panel = (
        stat.Panel()
        .id(ids())
        .title("Room $room")
        .description(
            "State: LIVE (a trustworthy SpO2 in the last 10 s), PROBE OFF (the last reading of a device says so), "
            "STANDBY (alarms suspended), GATEWAY OFFLINE (no live data while a gateway's heartbeat is older than "
            f"{HEARTBEAT_STALE_S} s), NO DATA (none of these). Alarm: the highest active alarm, 'no alarm' only while "
            f"its feed is current, else '{FEED_NOT_CURRENT}'. SpO2 and pulse: last 10 s only; BP: last {BP_WINDOW}, "
            "with its age; Session: since when it runs. Click for the room's dashboard."
        )
        .datasource(ds)
        .with_target(InfluxQL(room_tile_query(), ds).table())
        .repeat("room")
        .repeat_direction("h")
        .max_per_row(layout.per_row)
        .links([dash_b.DashboardLink("Room $room").url(f"/d/{ROOM_UID}?${{room:queryparam}}")])
        .data_links([dash_b.DashboardLink("Room $room").url(f"/d/{ROOM_UID}?${{room:queryparam}}")])
        .no_value(NO_DATA)
        .mappings([_no_data_map()])
        .decimals(0)
        .thresholds(_fixed(NEUTRAL_COLOUR))
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.THRESHOLDS))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .justify_mode(common.BigValueJustifyMode.CENTER)
        .reduce_options(_reduce("/^(" + "|".join(TILE_FIELDS) + ")$/", "max"))
        .grid_pos(dash_m.GridPos(h=layout.tile_h, w=layout.tile_w, x=0, y=layout.top))
    )
    overrides = [
        _field("State", _mappings(_code_map(ROOM_STATES), _no_data_map())),
        _field("Alarm", _mappings(_code_map(ALARM_STATES), _no_data_map(FEED_NOT_CURRENT, UNKNOWN_COLOUR))),
        _field("SpO2", _unit("percent"), _thresholds_value(limit_steps(profile, "spo2")), _mappings(_no_data_map())),
        _field(
            "Pulse",
            _unit("suffix: /min"),
            _thresholds_value(limit_steps(profile, "pulse_rate")),
            _mappings(_no_data_map()),
        ),
        *(
            _field(name, _thresholds_value(limit_steps(profile, BP_FIELDS[name])), _mappings(_no_data_map(shown)))
            for name, shown in (("SYS", no_bp), ("DIA", no_bp))
        ),
        _field(
            "BP taken",
            _unit(date),
            _thresholds_value([dash_m.Threshold(value=None, color=NONE)]),
            _mappings(_no_data_map(no_bp)),
        ),
        _field(
            "Session",
            _unit(date),
            _thresholds_value([dash_m.Threshold(value=None, color="blue")]),
            _mappings(_no_data_map("no session", NONE)),
        ),
    ]
    for name, props in overrides:
        panel = panel.override_by_name(name, props)
    return panel


def wall(profile: AlarmProfile, ds: dash_m.DataSourceRef, rooms: int = WALL_ROOMS) -> dash_b.Dashboard:
    ids = _Ids()
    layout = wall_layout(rooms, banner=profile.example)
    board = (
        _dashboard(
            WALL_UID,
            "Infusion rooms wall",
            f"Every room on one screen (up to {rooms}): state, highest alarm, live SpO2 and pulse (NO DATA when "
            "silent), the last blood pressure and its age, the session; above, each gateway's heartbeat.",
            profile,
            ["wall"],
        )
        .time("now-15m", "now")
        .refresh("5s")
        .timepicker(dash_b.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m"]))
        .with_variable(_room_variable(ds, multi=True))
    )
    if (banner := _example_banner(profile, ids, BANNER_ROWS)) is not None:
        board = board.with_panel(banner)
    board = board.with_panel(gateways_panel(ids, ds, STRIP_ROWS))
    return board.with_panel(room_tile(ids, ds, profile, layout))


# --- room detail ---------------------------------------------------------------------------------------------


def _trend(
    ids: _Ids, ds: dash_m.DataSourceRef, title: str, select_: str, unit: str, steps: list[dash_m.Threshold] | None
) -> timeseries.Panel:
    """Per-interval values with gaps left as gaps: fill(null) gives an interval without a trustworthy reading a
    null, and spanNulls off draws it as a break (a 20-minute probe-off is not a straight line). The 5 s minimum
    interval keeps one-second readings from breaking the line between them."""
    query = (
        f'SELECT {select_} FROM "vitals" WHERE {ROOM_MATCH} AND "valid" = true AND $timeFilter '
        "GROUP BY time($__interval) fill(null)"
    )
    panel = (
        timeseries.Panel()
        .id(ids())
        .title(title)
        .description(
            "Trustworthy readings only (flagged ones are left out); a gap is a time without any; dashed lines: the "
            "alarm limits."
        )
        .datasource(ds)
        .with_target(InfluxQL(query, ds).alias("$col"))
        .interval("5s")
        .unit(unit)
        .thresholds_style(common_b.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED_AND_AREA))
        .span_nulls(False)
        .show_points(common.VisibilityMode.AUTO)
        .height(8)
        .span(12)
    )
    return panel.thresholds(_thresholds(steps)) if steps is not None else panel


BP_AXIS = (40, 240)  # mmHg: one range for the three BP scales, so their lines share one picture


def _bp_trend(ids: _Ids, ds: dash_m.DataSourceRef, profile: AlarmProfile) -> timeseries.Panel:
    """SYS, DIA and MAP, each on a scale of its own (an axis label makes Grafana's scale key distinct) because
    Grafana draws one set of threshold lines per scale: sharing one, only the first series' limits showed. The
    three scales have the same fixed range; DIA's axis is on the right, MAP's hidden."""
    bp_select = ", ".join(f'mean("{f}") AS "{name}"' for name, f in BP_FIELDS.items())
    bp = (
        _trend(ids, ds, "Blood pressure", bp_select, "suffix: mmHg", None)
        .draw_style(common.GraphDrawStyle.LINE)
        .show_points(common.VisibilityMode.ALWAYS)
        .point_size(6)
        .thresholds(_fixed(OK_COLOUR))
        .min(BP_AXIS[0])
        .max(BP_AXIS[1])
    )
    placement = {
        "SYS": common.AxisPlacement.LEFT,
        "DIA": common.AxisPlacement.RIGHT,
        "MAP": common.AxisPlacement.HIDDEN,
    }
    for name, field in BP_FIELDS.items():
        bp = bp.override_by_regexp(
            _series(name),
            [
                _thresholds_value(limit_steps(profile, field)),
                dash_m.DynamicConfigValue(id_val="custom.axisLabel", value=f"{name} mmHg"),
                dash_m.DynamicConfigValue(id_val="custom.axisPlacement", value=placement[name]),
            ],
        )
    return bp


def with_state_at_start(measurement: str, field: str, condition: str, group: tuple[str, ...]) -> str:
    """The values of `field` in the time range, preceded by the one in force when the range starts (states are
    written on change only: without it a timeline is empty when nothing changed inside the range)."""
    before = f"{condition} AND time <= ${{__from}}ms AND time > ${{__from}}ms - {STATE_LOOKBACK}"
    in_force = select(f'last("{field}") AS "{field}"', f'"{measurement}"', before, tags(*group))
    changes = select(f'"{field}"', f'"{measurement}"', f"{condition} AND $timeFilter", tags(*group))
    return select(f'"{field}"', sources(in_force, changes), group_by=tags(*group))


ALARM_TABLE_COLUMNS = (
    "priority",
    "since",
    "indeterminate",
    "device",
    "rule",
    "message",
    "value",
    "transition",
    "quality",
)


def active_alarms_query(room_condition: str) -> str:
    """Active alarms with their start, one row each, and one row per gateway for the alarm feed (table format).

    An alarm is active when its last transition in the window left it so; "since" is its last `raised` (epoch ms);
    "priority" is a number (HIGH 3, MEDIUM 2, LOW 1) so that the table can sort by it. The feed rows come from
    the heartbeats: priority 4 "alarm feed not current" for a gateway silent for more than 15 s, 0 "alarm feed
    current" otherwise, with the heartbeat's time as "since". So a working feed is never an empty table.
    """
    fields = ("message", "transition", "value", "indeterminate", "quality")
    active = _active(room_condition, fields, placeholder="since")
    raised = f"{room_condition} AND \"transition\" = 'raised' AND {window(ACTIVE_ALARM_WINDOW)}"
    since = last_time("since", "seq", "alarms", raised, ("device", "rule"))
    per_alarm = select(
        ", ".join(
            [*(f'last("{f}") AS "{f}"' for f in ("active", "priority", *fields, "seq")), 'max("since") AS "since"']
        ),
        sources(active, since),
        group_by=tags("device", "rule"),
    )
    columns = '"since", ' + ", ".join(f'"{f}"' for f in fields) + ", "
    alarms = _by_priority(per_alarm, columns, "priority", ("device", "rule"))
    feed = select(
        f'"asof" AS "since", "silent" * {FEED_CODE_SILENT} AS "priority"',
        sources(gateway_feed()),
        group_by=tags("device"),
    )
    return select(", ".join(f'"{c}"' for c in ALARM_TABLE_COLUMNS), sources(*alarms, feed))


_active_alarms_query = active_alarms_query  # its former name, still imported by benchmarks and the demo test


def _active_alarms_table(
    ids: _Ids, ds: dash_m.DataSourceRef, title: str, room_condition: str, height: int, span: int
) -> table.Panel:
    feed_codes = {
        FEED_CODE_SILENT: (FEED_NOT_CURRENT.upper(), UNKNOWN_COLOUR),
        **{PRIORITY_CODES[p]: (p.upper(), PRIORITY_COLOURS[p]) for p in reversed(PRIORITIES)},
        FEED_CODE_CURRENT: ("alarm feed current", NONE),
    }
    return (
        table.Panel()
        .id(ids())
        .title(title)
        .description(
            "Alarms whose last transition left them active (raised, escalated, acknowledged, silenced, "
            "indeterminate, resumed), highest priority first, then the longest-standing: high red, medium yellow, "
            f"low blue; 'since' is when it was raised. A purple row says {INDETERMINATE_TEXT!r}: the device's data "
            "is stale or unusable, so whether the condition holds now is not known (its value is the one that "
            "raised it). quality: the device's flags on that value. Alarms suspended by standby are not active. "
            f"One row per gateway says whether the alarm feed is current (its heartbeat in the last "
            f"{HEARTBEAT_STALE_S} s); '{FEED_NOT_CURRENT}' means the alarms listed may have changed since."
        )
        .datasource(ds)
        .with_target(InfluxQL(active_alarms_query(room_condition), ds).table())
        .no_value(f"{NO_DATA}: no alarm feed (the database did not answer, or no gateway wrote in 24 h)")
        .cell_height(common.TableCellHeight.LG)
        .sort_by(
            [
                common_b.TableSortByFieldState().display_name("priority").desc(True),
                common_b.TableSortByFieldState().display_name("since").desc(False),
            ]
        )
        .override_by_name("priority", [_mappings(_code_map(feed_codes)), _coloured_cells()])
        .override_by_name(
            "since",
            [_unit("dateTimeFromNow"), _mappings(_text_map({"0": (f"before {ACTIVE_ALARM_WINDOW}", NONE)}))],
        )
        .override_by_name(*_indeterminate_column())
        .override_by_regexp(*_blank_when_empty("value|quality|rule|message|transition"))
        .override_by_field_type("time", [dash_m.DynamicConfigValue(id_val="custom.hidden", value=True)])
        .height(height)
        .span(span)
    )


def _room_mode_stat(ids: _Ids, ds: dash_m.DataSourceRef, height: int, span: int) -> stat.Panel:
    """STANDBY while the room's last room_mode point says so. No point in the window means monitoring, shown
    uncoloured: neither state is green, so an empty answer never reads as all clear."""
    query = select('last("mode") AS "mode"', '"room_mode"', f"{ROOM_MATCH} AND {window(STANDBY_WINDOW)}")
    return (
        stat.Panel()
        .id(ids())
        .title("Room mode")
        .description(
            "STANDBY: nobody is monitored in this room and its alarms are suspended (until it ends, expires, "
            "or a session starts). From the room's last room_mode point; none in the last "
            f"{STANDBY_MAX_S / 3600:g} h 5 min (standby lasts at most {STANDBY_MAX_S / 3600:g} h): monitoring."
        )
        .datasource(ds)
        .with_target(InfluxQL(query, ds).table())
        .mappings([_text_map({"standby": ("STANDBY", STANDBY_COLOUR), "monitoring": ("monitoring", NONE)})])
        .no_value("monitoring")
        .thresholds(_fixed(NONE))
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.THRESHOLDS))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE)
        .justify_mode(common.BigValueJustifyMode.CENTER)
        .reduce_options(_reduce("/^mode$/"))
        .height(height)
        .span(span)
    )


def _history_empty(what: str) -> str:
    """An empty history table's text: neither reassuring nor alarming, since an error also leaves it empty."""
    return f"no {what} returned for this time range (an error sign in the corner: the database did not answer)"


def room_detail(profile: AlarmProfile, ds: dash_m.DataSourceRef) -> dash_b.Dashboard:
    ids = _Ids()
    board = (
        _dashboard(
            ROOM_UID,
            "Infusion room detail",
            "One room's session: SpO2, pulse and blood pressure trends with the alarm limits, the active alarms and "
            "their feed, device status over time, the alarm history and sessions.",
            profile,
            ["room"],
        )
        .time("now-3h", "now")
        .refresh("10s")
        .with_variable(_room_variable(ds, multi=False))
    )
    if (banner := _example_banner(profile, ids, 2)) is not None:
        board = board.with_panel(banner)
    board = board.with_panel(
        _trend(
            ids,
            ds,
            "SpO2",
            'mean("spo2") AS "SpO2", min("spo2") AS "SpO2 min"',
            "percent",
            limit_steps(profile, "spo2"),
        )
    )
    board = board.with_panel(
        _trend(
            ids, ds, "Pulse rate", 'mean("pulse_rate") AS "pulse"', "suffix: /min", limit_steps(profile, "pulse_rate")
        )
    )
    board = board.with_panel(_bp_trend(ids, ds, profile))
    board = board.with_panel(_active_alarms_table(ids, ds, "Active alarms", ROOM_MATCH, height=8, span=12))
    status = (
        statetimeline.Panel()
        .id(ids())
        .title("Device status")
        .description(
            "Each device's state from its status changes (device_status), starting with the state in force at the "
            "start of the time range."
        )
        .datasource(ds)
        .with_target(
            InfluxQL(with_state_at_start("device_status", "state", ROOM_MATCH, ("device",)), ds).alias("$tag_device")
        )
        .mappings([_state_map()])
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.FIXED).fixed_color("text"))
        .show_value(common.VisibilityMode.AUTO)
        .height(6)
        .span(20)
    )
    board = board.with_panel(status)
    board = board.with_panel(_room_mode_stat(ids, ds, height=6, span=4))
    history_query = (
        'SELECT "priority", "alarm_kind", "device", "rule", "transition", "value", "limit", "quality", "message", '
        '"role" '
        f'FROM "alarms" WHERE {ROOM_MATCH} AND $timeFilter ORDER BY time DESC LIMIT 500'
    )
    history = (
        table.Panel()
        .id(ids())
        .title("Alarm history")
        .description(
            "Every alarm transition of the room in the time range, newest first (the value that caused it, the "
            "device's quality flags on it). indeterminate: its condition could not be determined from then on "
            "(stale or unusable data); resumed: fresh data again; suspended: ended by standby."
        )
        .datasource(ds)
        .with_target(InfluxQL(history_query, ds).table())
        .override_by_name(*_coloured_column("priority"))
        .override_by_regexp(*_blank_when_empty("value|limit|quality|message|role"))
        .no_value(_history_empty("alarm transitions"))
        .height(10)
        .span(16)
    )
    board = board.with_panel(history)
    sessions_query = (
        'SELECT "transition", "session_id", "baseline_nibp_systolic", "baseline_nibp_diastolic" '
        f'FROM "sessions" WHERE {ROOM_MATCH} AND $timeFilter ORDER BY time DESC'
    )
    sessions = (
        table.Panel()
        .id(ids())
        .title("Sessions")
        .description("Session starts, baselines and stops in the time range, newest first.")
        .datasource(ds)
        .with_target(InfluxQL(sessions_query, ds).table())
        .no_value(_history_empty("session events"))
        .override_by_regexp(*_blank_when_empty("baseline_.*"))
        .height(10)
        .span(8)
    )
    return board.with_panel(sessions)


# --- gateway health ------------------------------------------------------------------------------------------


def gateway_health(profile: AlarmProfile, ds: dash_m.DataSourceRef) -> dash_b.Dashboard:
    ids = _Ids()
    board = (
        _dashboard(
            GATEWAY_UID,
            "Infusion gateway health",
            "Heartbeats, throughput per device, device links, technical alarms and the gateway's broker, outbox and "
            "clock alarms.",
            profile,
            ["gateway"],
        )
        .time("now-6h", "now")
        .refresh("30s")
    )
    board = board.with_panel(gateways_panel(ids, ds, 3))
    backlog = (
        'SELECT last("backlog_mqtt") AS "to MQTT", last("backlog_influx") AS "to InfluxDB" FROM "gateway" '
        "WHERE $timeFilter GROUP BY time($__interval) fill(null)"
    )
    board = board.with_panel(
        timeseries.Panel()
        .id(ids())
        .title("Outbox backlog")
        .description("Records the outbox still owes each sink (from the gateway's counters, every 5 s).")
        .datasource(ds)
        .with_target(InfluxQL(backlog, ds))
        .interval("10s")
        .span_nulls(False)
        .min(0)
        .height(8)
        .span(12)
    )
    losses = (
        'SELECT last("rejected") AS "rejected", last("dropped") AS "dropped", '
        'last("protocol_errors") AS "protocol errors" FROM "gateway" WHERE $timeFilter '
        "GROUP BY time($__interval) fill(null)"
    )
    board = board.with_panel(
        timeseries.Panel()
        .id(ids())
        .title("Rejected and dropped")
        .description(
            "Counters since the gateway started: records a sink refused, readings dropped over the outbox "
            "bounds, protocol errors on the serial lines."
        )
        .datasource(ds)
        .with_target(InfluxQL(losses, ds))
        .interval("10s")
        .span_nulls(False)
        .min(0)
        .height(8)
        .span(12)
    )
    rate = (
        'SELECT count("seq") * 1000 / $__interval_ms AS "readings/s" FROM "vitals" WHERE $timeFilter '
        'GROUP BY time($__interval), "room", "device" fill(0)'
    )
    board = board.with_panel(
        timeseries.Panel()
        .id(ids())
        .title("Readings per second")
        .description("Records stored per second, per device (0: silent).")
        .datasource(ds)
        .with_target(InfluxQL(rate, ds).alias("$tag_room/$tag_device"))
        .interval("10s")
        .unit("reqps")
        .min(0)
        .height(8)
        .span(12)
    )
    flagged = (
        'SELECT count("seq") * 1000 / $__interval_ms AS "flagged/s" FROM "vitals" WHERE "valid" = false '
        'AND $timeFilter GROUP BY time($__interval), "room", "device" fill(0)'
    )
    board = board.with_panel(
        timeseries.Panel()
        .id(ids())
        .title("Flagged readings per second")
        .description("Readings the device flagged (probe off, artifact, searching...): unfit for alarms.")
        .datasource(ds)
        .with_target(InfluxQL(flagged, ds).alias("$tag_room/$tag_device"))
        .interval("10s")
        .unit("reqps")
        .min(0)
        .height(8)
        .span(12)
    )
    links = with_state_at_start("device_status", "state", "\"room\" != '_gateway'", ("room", "device"))
    board = board.with_panel(
        statetimeline.Panel()
        .id(ids())
        .title("Device links")
        .description(
            "Each device's state from its status changes (connected, ok, no data, disconnected...), starting with "
            "the state in force at the start of the time range."
        )
        .datasource(ds)
        .with_target(InfluxQL(links, ds).alias("$tag_room/$tag_device"))
        .mappings([_state_map()])
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.FIXED).fixed_color("text"))
        .height(8)
        .span(16)
    )
    last_heard = 'SELECT last("seq") AS "seq" FROM "vitals" WHERE time > now() - 24h GROUP BY "room", "device"'
    board = board.with_panel(
        table.Panel()
        .id(ids())
        .title("Last reading")
        .description("When each device's last record arrived (last 24 h).")
        .datasource(ds)
        .with_target(InfluxQL(last_heard, ds).table())
        .override_by_field_type(*_age_unit())
        .no_value(_history_empty("readings"))
        .height(8)
        .span(8)
    )
    gateway_links = with_state_at_start("alarms", "active", GATEWAY_ROOM, ("device", "rule"))
    board = board.with_panel(
        statetimeline.Panel()
        .id(ids())
        .title("Broker link, outbox and clock")
        .description(
            "The gateway's own alarms (broker_lost, outbox_filling, storage, clock_skew), starting with the state in "
            "force at the start of the time range."
        )
        .datasource(ds)
        .with_target(InfluxQL(gateway_links, ds).alias("$tag_device $tag_rule"))
        .mappings([_text_map({"true": ("ALARM", "red"), "false": ("ok", "green")})])
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.FIXED).fixed_color("text"))
        .height(5)
        .span(24)
    )
    technical = (
        'SELECT "priority", "room", "device", "rule", "transition", "value", "message" FROM "alarms" '
        "WHERE \"alarm_kind\" = 'technical' AND \"room\" != '_gateway' AND $timeFilter ORDER BY time DESC LIMIT 500"
    )
    board = board.with_panel(
        table.Panel()
        .id(ids())
        .title("Technical alarms")
        .description("No data, disconnected, sensor, cuff error, NIBP overdue: every transition, newest first.")
        .datasource(ds)
        .with_target(InfluxQL(technical, ds).table())
        .override_by_name(*_coloured_column("priority"))
        .override_by_regexp(*_blank_when_empty("value|message"))
        .no_value(_history_empty("technical alarm transitions"))
        .height(10)
        .span(14)
    )
    gateway_alarms = (
        'SELECT "priority", "device", "rule", "transition", "value", "message" FROM "alarms" '
        "WHERE \"room\" = '_gateway' AND $timeFilter ORDER BY time DESC LIMIT 200"
    )
    return board.with_panel(
        table.Panel()
        .id(ids())
        .title("Gateway alarms")
        .description(
            "broker_lost, outbox_filling, storage and clock_skew transitions (value: the outbox fill fraction, the "
            "clock skew), newest first."
        )
        .datasource(ds)
        .with_target(InfluxQL(gateway_alarms, ds).table())
        .override_by_name(*_coloured_column("priority"))
        .override_by_regexp(*_blank_when_empty("value|message"))
        .no_value(_history_empty("gateway alarm transitions"))
        .height(10)
        .span(10)
    )


# --- public API ----------------------------------------------------------------------------------------------


INTERVAL_ONLY = ("auto", "auto_min", "auto_count")  # the SDK writes these on every variable; Grafana's schema
# has them for interval variables only (the schema check in dashboards/typecheck.py rejects them elsewhere)


def render(board: cogbuilder.Builder[dash_m.Dashboard]) -> dict[str, Any]:
    """The dashboard's JSON model, as Grafana stores it."""
    rendered: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for variable in (rendered.get("templating") or {}).get("list") or []:
        if variable.get("type") != "interval":
            for key in INTERVAL_ONLY:
                variable.pop(key, None)
    return rendered


def build_all(
    profile: AlarmProfile, datasource_uid: str = "influxdb", wall_rooms: int = WALL_ROOMS
) -> dict[str, dict[str, Any]]:
    """name -> dashboard JSON, for the three dashboards; the wall laid out for `wall_rooms` rooms."""
    ds = dash_m.DataSourceRef(type_val="influxdb", uid=datasource_uid)
    return {
        "wall": render(wall(profile, ds, wall_rooms)),
        "room": render(room_detail(profile, ds)),
        "gateway": render(gateway_health(profile, ds)),
    }


def to_text(dashboard_json: dict[str, Any]) -> str:
    return json.dumps(dashboard_json, indent=2, ensure_ascii=False) + "\n"


def write_all(out_dir: Path, profile: AlarmProfile, wall_rooms: int = WALL_ROOMS) -> list[Path]:
    """Write `<uid>.json` for each dashboard into out_dir (created if missing); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for board in build_all(profile, wall_rooms=wall_rooms).values():
        path = out_dir / f"{board['uid']}.json"
        path.write_text(to_text(board), encoding="utf-8")
        paths.append(path)
    return paths


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # a collapsed row holds its panels


def panel_queries(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, raw InfluxQL with Grafana's macros) of every query of every panel, in order. The key is the panel's
    title (`#id` for an untitled one), followed by `/refId` for a panel with several queries."""
    out = []
    for panel in _panels(dashboard_json.get("panels") or []):
        targets = [t for t in panel.get("targets") or [] if "query" in t]
        for target in targets:
            title = str(panel.get("title") or f"#{panel.get('id')}")
            key = title if len(targets) == 1 else f"{title}/{target['refId']}"
            out.append((key, str(target["query"])))
    return out
