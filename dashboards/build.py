"""The three Grafana dashboards, built with grafana-foundation-sdk and rendered to JSON.

Every query is raw InfluxQL (InfluxDB 1.x, 2.x through its DBRP mapping, 3.x) over the measurements of
docs/influx.md, with Grafana's macros `$timeFilter`, `$__interval`, `$__interval_ms` and the `$room` variable
(always as a regex, `"room" =~ /^$room$/`, which is how Grafana formats a multi-value variable for InfluxQL).

Rules kept here:
- LIVE tiles look only at the last LIVE_WINDOW (`time > now() - 10s`, `last()`) and show "NO DATA" otherwise:
  a silent device never shows an old number as if it were current (Grafana's "last" is the last one, however old).
- Colours and limit lines of SpO2, pulse rate and blood pressure come from the alarm profile's rules, so the wall
  and the alarms never disagree. The shipped example profile is labelled as such wherever it is shown.
- A room in standby says STANDBY (never green), and an alarm whose condition cannot be determined (stale or unusable
  data) says so on its row: neither may look like an ordinary state.

The grafana-foundation-sdk build pinned here (Grafana 11.6) has no InfluxDB query builder: `InfluxQLQuery` below is
the small dataquery variant it lacks, in the SDK's own shape (a `cogvariants.Dataquery` with `to_json`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
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
from gateway.records import STANDBY_MAX_S

GENERATED_DIR = Path(__file__).parent / "generated"

WALL_UID = "infusion-wall"
ROOM_UID = "infusion-room"
GATEWAY_UID = "infusion-gateway"

LIVE_WINDOW = "10s"  # a live tile shows nothing older than this
BP_WINDOW = "30m"  # the last blood pressure is shown this long, with its age
SESSION_WINDOW = "24h"  # the last session start/stop looked at
ACTIVE_ALARM_WINDOW = "7d"  # an alarm raised longer ago than this and never cleared is not shown as active
# Standby lasts at most STANDBY_MAX_S (24 h) and its end is written as a `monitoring` point; looking back a little
# longer than that bounds a standby whose end point was lost (1445m: InfluxQL wants a single unit).
STANDBY_WINDOW = f"{round(STANDBY_MAX_S / 60) + 5}m"
NO_DATA = "NO DATA"
EXAMPLE_LABEL = "example alarm limits, not advice"

ROOM_MATCH = '"room" =~ /^$room$/'  # Grafana formats $room as a regex alternation for InfluxQL

PRIORITY_COLOURS: dict[Priority, str] = {"high": "red", "medium": "yellow", "low": "blue"}
OK_COLOUR = "green"
STANDBY_COLOUR = "dark-blue"  # not green (nobody is monitored), not an alarm colour
INDETERMINATE_COLOUR = "purple"  # unknown: neither an alarm priority nor all clear
INDETERMINATE_TEXT = "cannot be determined"
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


def _threshold_override(steps: list[dash_m.Threshold]) -> dash_m.DynamicConfigValue:
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


def _priority_map() -> dash_m.ValueMap:
    return _text_map({p: (p.upper(), PRIORITY_COLOURS[p]) for p in reversed(PRIORITIES)})


def _state_map() -> dash_m.ValueMap:
    return _text_map({str(s): (str(s).replace("_", " "), c) for s, c in STATE_COLOURS.items()})


def _coloured_column(name: str) -> tuple[str, list[dash_m.DynamicConfigValue]]:
    return name, [
        dash_m.DynamicConfigValue(id_val="mappings", value=[_priority_map()]),
        dash_m.DynamicConfigValue(
            id_val="custom.cellOptions",
            value=common.TableColoredBackgroundCellOptions(mode=common.TableCellBackgroundDisplayMode.BASIC),
        ),
    ]


def _age_unit() -> tuple[str, list[dash_m.DynamicConfigValue]]:
    return "time", [dash_m.DynamicConfigValue(id_val="unit", value="dateTimeFromNow")]


def _series(name: str) -> str:
    """Matches a series named `name` (alias $col) or `<measurement>.name` (Grafana's default display name)."""
    return f"/(^|\\.){re.escape(name)}$/"


def _reduce(fields: str = "") -> common_b.ReduceDataOptions:
    return common_b.ReduceDataOptions().values(False).calcs(["lastNotNull"]).fields(fields)


ACTIVE_ALARM_COLUMNS = ("priority", "indeterminate", "device", "rule", "message", "value", "transition", "quality")


def _active_alarms_query(room_condition: str) -> str:
    """The last transition of every alarm (room/device/rule) in the window, kept when it left the alarm active
    (a suspended or cleared alarm is not). `indeterminate` is that of the last transition: every alarm point
    carries it, so last() of it is the alarm's current state."""
    inner = (
        'SELECT last("active") AS "active", last("priority") AS "priority", last("message") AS "message", '
        'last("transition") AS "transition", last("value") AS "value", '
        'last("indeterminate") AS "indeterminate", last("quality") AS "quality" '
        f'FROM "alarms" WHERE {room_condition} AND time > now() - {ACTIVE_ALARM_WINDOW} GROUP BY "device", "rule"'
    )
    columns = ", ".join(f'"{c}"' for c in ACTIVE_ALARM_COLUMNS)
    return f'SELECT {columns} FROM ({inner}) WHERE "active" = true'


def _blank_when_empty(names: str) -> tuple[str, list[dash_m.DynamicConfigValue]]:
    """An override for columns that may hold null or "" (no value, no quality flags, no role): Grafana shows a
    field's "no value" text in such a cell, and a table's is its empty-panel message ("no active alarms")."""
    return f"/^({names})$/", [dash_m.DynamicConfigValue(id_val="noValue", value="")]


def _indeterminate_column() -> tuple[str, list[dash_m.DynamicConfigValue]]:
    """true -> "cannot be determined" on the whole row (purple), so it never reads as an ordinary active alarm."""
    return "indeterminate", [
        dash_m.DynamicConfigValue(
            id_val="mappings",
            value=[_text_map({"true": (INDETERMINATE_TEXT, INDETERMINATE_COLOUR), "false": ("", NONE)})],
        ),
        dash_m.DynamicConfigValue(
            id_val="custom.cellOptions",
            value=common.TableColoredBackgroundCellOptions(
                mode=common.TableCellBackgroundDisplayMode.BASIC, apply_to_row=True
            ),
        ),
        dash_m.DynamicConfigValue(id_val="noValue", value=""),
    ]


class _Ids:
    """Stable panel ids, so regenerating gives the same JSON."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> int:
        self._next += 1
        return self._next


def _dashboard(uid: str, title: str, description: str, profile: AlarmProfile, tags: list[str]) -> dash_b.Dashboard:
    if profile.example:
        title = f"{title} ({EXAMPLE_LABEL})"
        description = f"{description} Alarm profile {profile.name!r}: {EXAMPLE_LABEL.upper()}."
    else:
        description = f"{description} Alarm profile {profile.name!r}."
    return (
        dash_b.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["infusion-telemetry", *tags, *(["example-profile"] if profile.example else [])])
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


def _room_variable(ds: dash_m.DataSourceRef, multi: bool) -> dash_b.QueryVariable:
    var = (
        dash_b.QueryVariable("room")
        .label("Room")
        .datasource(ds)
        .query('SHOW TAG VALUES FROM "vitals" WITH KEY = "room"')
        .refresh(dash_m.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(dash_m.VariableSort.NATURAL_ASC)
        .multi(multi)
        .include_all(multi)
    )
    if multi:
        var = var.current(dash_m.VariableOption(selected=True, text=["All"], value=["$__all"]))
    return var


def _example_banner(profile: AlarmProfile, ids: _Ids) -> text.Panel | None:
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
        .height(2)
        .span(24)
    )


# --- the wall ------------------------------------------------------------------------------------------------


def _live_stat(
    ids: _Ids, ds: dash_m.DataSourceRef, title: str, field: str, unit: str, steps: list[dash_m.Threshold]
) -> stat.Panel:
    query = (
        f'SELECT last("{field}") AS "{title}" FROM "vitals" '
        f'WHERE {ROOM_MATCH} AND "valid" = true AND time > now() - {LIVE_WINDOW}'
    )
    return (
        stat.Panel()
        .id(ids())
        .title(title)
        .description(
            f"Last trustworthy {field} of the room from the last {LIVE_WINDOW} only; {NO_DATA} when the device "
            "is silent or every reading is flagged (probe off, searching...). Colours follow the alarm profile."
        )
        .datasource(ds)
        .with_target(InfluxQL(query, ds).alias("$col"))
        .unit(unit)
        .decimals(0)
        .no_value(NO_DATA)
        .thresholds(_thresholds(steps))
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.THRESHOLDS))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE)
        .justify_mode(common.BigValueJustifyMode.CENTER)
        .reduce_options(_reduce())
        .height(7)
        .span(4)
    )


def _bp_stat(ids: _Ids, ds: dash_m.DataSourceRef, profile: AlarmProfile) -> stat.Panel:
    fields = ", ".join(f'last("{f}") AS "{name}"' for name, f in BP_FIELDS.items())
    query = f'SELECT {fields} FROM "vitals" WHERE {ROOM_MATCH} AND "valid" = true AND time > now() - {BP_WINDOW}'
    panel = (
        stat.Panel()
        .id(ids())
        .title("BP")
        .description(f"The last blood pressure of the last {BP_WINDOW} (SYS, DIA, MAP); its age is beside it.")
        .datasource(ds)
        .with_target(InfluxQL(query, ds).alias("$col"))
        .unit("suffix: mmHg")
        .decimals(0)
        .no_value(f"none in {BP_WINDOW}")
        .thresholds(_fixed(OK_COLOUR))
        .color_scheme(dash_b.FieldColor().mode(dash_m.FieldColorModeId.THRESHOLDS))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(_reduce())
        .height(7)
        .span(5)
    )
    for name, field in BP_FIELDS.items():
        panel = panel.override_by_regexp(_series(name), [_threshold_override(limit_steps(profile, field))])
    return panel


def _bp_age_stat(ids: _Ids, ds: dash_m.DataSourceRef) -> stat.Panel:
    query = (
        'SELECT last("nibp_systolic") AS "SYS" FROM "vitals" '
        f'WHERE {ROOM_MATCH} AND "valid" = true AND time > now() - {BP_WINDOW}'
    )
    return (
        stat.Panel()
        .id(ids())
        .title("BP taken")
        .description("When the blood pressure beside it was measured (received by the gateway).")
        .datasource(ds)
        .with_target(InfluxQL(query, ds).table())
        .unit("dateTimeFromNow")
        .no_value(f"none in {BP_WINDOW}")
        .thresholds(_fixed("text"))
        .color_mode(common.BigValueColorMode.NONE)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE)
        .reduce_options(_reduce("/^[Tt]ime$/"))
        .height(7)
        .span(3)
    )


def _session_stat(ids: _Ids, ds: dash_m.DataSourceRef, height: int) -> stat.Panel:
    query = (
        'SELECT last("transition") AS "session" FROM "sessions" '
        f"WHERE {ROOM_MATCH} AND \"transition\" != 'baseline' AND time > now() - {SESSION_WINDOW}"
    )
    return (
        stat.Panel()
        .id(ids())
        .title("Session")
        .description(
            f"The room's infusion session: running since, or stopped since (last start/stop of the last "
            f"{SESSION_WINDOW})."
        )
        .datasource(ds)
        .with_target(InfluxQL(query, ds).table())
        .mappings([_text_map({"started": ("running", "blue"), "stopped": ("no session", "text")})])
        .override_by_field_type(*_age_unit())
        .no_value("no session")
        .thresholds(_fixed("text"))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE)
        .reduce_options(_reduce("/.*/"))
        .height(height)
        .span(3)
    )


def _room_mode_stat(ids: _Ids, ds: dash_m.DataSourceRef, height: int, span: int) -> stat.Panel:
    """STANDBY while the room's last room_mode point says so. No point in the window means monitoring, shown
    uncoloured: neither state is green, so an empty answer never reads as all clear."""
    query = f'SELECT last("mode") AS "mode" FROM "room_mode" WHERE {ROOM_MATCH} AND time > now() - {STANDBY_WINDOW}'
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


def _active_alarms_table(
    ids: _Ids, ds: dash_m.DataSourceRef, title: str, room_condition: str, height: int, span: int
) -> table.Panel:
    return (
        table.Panel()
        .id(ids())
        .title(title)
        .description(
            "Alarms whose last transition left them active (raised, escalated, acknowledged, silenced, "
            "indeterminate, resumed), coloured by priority: high red, medium yellow, low blue. A purple row "
            f"says {INDETERMINATE_TEXT!r}: the device's data is stale or unusable, so whether the condition holds "
            "now is not known (its value is the one that raised it). quality: the device's flags on that value. "
            "Alarms suspended by standby are not active."
        )
        .datasource(ds)
        .with_target(InfluxQL(_active_alarms_query(room_condition), ds).table())
        .no_value("no active alarms")
        .cell_height(common.TableCellHeight.LG)
        .override_by_name(*_coloured_column("priority"))
        .override_by_name(*_indeterminate_column())
        .override_by_regexp(*_blank_when_empty("value|quality"))
        .override_by_field_type("time", [dash_m.DynamicConfigValue(id_val="custom.hidden", value=True)])
        .height(height)
        .span(span)
    )


def wall(profile: AlarmProfile, ds: dash_m.DataSourceRef) -> dash_b.Dashboard:
    ids = _Ids()
    board = (
        _dashboard(
            WALL_UID,
            "Infusion rooms wall",
            "One row per room: live SpO2 and pulse rate (NO DATA when the device is silent), the last blood "
            "pressure and its age, the session, and the active alarms.",
            profile,
            ["wall"],
        )
        .time("now-15m", "now")
        .refresh("5s")
        .timepicker(dash_b.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m"]))
        .with_variable(_room_variable(ds, multi=True))
    )
    if (banner := _example_banner(profile, ids)) is not None:
        board = board.with_panel(banner)
    board = board.with_panel(
        _active_alarms_table(ids, ds, "Gateway alarms", "\"room\" = '_gateway'", height=4, span=24)
    )
    row = dash_b.Row("Room $room").id(ids()).repeat("room")  # expanded: the panels below it belong to it
    board = board.with_row(row)
    placed = row.build().grid_pos  # with_row placed the row under the panels above it
    if placed is None:
        raise RuntimeError("the SDK did not place the room row")
    top = placed.y + 1
    board = board.with_panel(_live_stat(ids, ds, "SpO2", "spo2", "percent", limit_steps(profile, "spo2")))
    board = board.with_panel(
        _live_stat(ids, ds, "Pulse", "pulse_rate", "suffix: /min", limit_steps(profile, "pulse_rate"))
    )
    board = board.with_panel(_bp_stat(ids, ds, profile))
    board = board.with_panel(_bp_age_stat(ids, ds))
    # Room mode (3 high) above Session (4 high) in the column the session tile had alone: the row keeps its layout.
    board = board.with_panel(_room_mode_stat(ids, ds, height=3, span=3))
    board = board.with_panel(_active_alarms_table(ids, ds, "Active alarms", ROOM_MATCH, height=7, span=5))
    session = _session_stat(ids, ds, height=4).grid_pos(dash_m.GridPos(h=4, w=3, x=16, y=top + 3))
    return board.with_panel(session)


# --- room detail ---------------------------------------------------------------------------------------------


def _trend(
    ids: _Ids, ds: dash_m.DataSourceRef, title: str, select: str, unit: str, steps: list[dash_m.Threshold] | None
) -> timeseries.Panel:
    query = (
        f'SELECT {select} FROM "vitals" WHERE {ROOM_MATCH} AND "valid" = true AND $timeFilter '
        "GROUP BY time($__interval) fill(none)"
    )
    panel = (
        timeseries.Panel()
        .id(ids())
        .title(title)
        .description("Trustworthy readings only (flagged ones are left out); dashed lines: the alarm limits.")
        .datasource(ds)
        .with_target(InfluxQL(query, ds).alias("$col"))
        .unit(unit)
        .thresholds_style(common_b.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED_AND_AREA))
        .span_nulls(False)
        .show_points(common.VisibilityMode.AUTO)
        .height(8)
        .span(12)
    )
    return panel.thresholds(_thresholds(steps)) if steps is not None else panel


def room_detail(profile: AlarmProfile, ds: dash_m.DataSourceRef) -> dash_b.Dashboard:
    ids = _Ids()
    board = (
        _dashboard(
            ROOM_UID,
            "Infusion room detail",
            "One room's session: SpO2, pulse and blood pressure trends with the alarm limits, the alarm history, "
            "device status over time and sessions.",
            profile,
            ["room"],
        )
        .time("now-3h", "now")
        .refresh("10s")
        .with_variable(_room_variable(ds, multi=False))
    )
    if (banner := _example_banner(profile, ids)) is not None:
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
    bp_select = ", ".join(f'mean("{f}") AS "{name}"' for name, f in BP_FIELDS.items())
    bp = _trend(ids, ds, "Blood pressure", bp_select, "suffix: mmHg", None).draw_style(common.GraphDrawStyle.LINE)
    bp = bp.show_points(common.VisibilityMode.ALWAYS).point_size(6).thresholds(_fixed(OK_COLOUR))
    for name, field in BP_FIELDS.items():
        bp = bp.override_by_regexp(_series(name), [_threshold_override(limit_steps(profile, field))])
    board = board.with_panel(bp)
    board = board.with_panel(_active_alarms_table(ids, ds, "Active alarms", ROOM_MATCH, height=8, span=12))
    status = (
        statetimeline.Panel()
        .id(ids())
        .title("Device status")
        .description("Each device's state from its status changes (device_status).")
        .datasource(ds)
        .with_target(
            InfluxQL(
                f'SELECT "state" FROM "device_status" WHERE {ROOM_MATCH} AND $timeFilter GROUP BY "device"', ds
            ).alias("$tag_device")
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
        .no_value("no alarms in this time range")
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
        .no_value("no session events in this time range")
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
            "Throughput per device, device links, technical alarms and the gateway's broker and outbox alarms.",
            profile,
            ["gateway"],
        )
        .time("now-6h", "now")
        .refresh("30s")
    )
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
    board = board.with_panel(
        statetimeline.Panel()
        .id(ids())
        .title("Device links")
        .description("Each device's state from its status changes: connected, ok, no data, disconnected...")
        .datasource(ds)
        .with_target(
            InfluxQL('SELECT "state" FROM "device_status" WHERE $timeFilter GROUP BY "room", "device"', ds).alias(
                "$tag_room/$tag_device"
            )
        )
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
        .height(8)
        .span(8)
    )
    links = 'SELECT "active" FROM "alarms" WHERE "room" = \'_gateway\' AND $timeFilter GROUP BY "device", "rule"'
    board = board.with_panel(
        statetimeline.Panel()
        .id(ids())
        .title("Broker link and outbox")
        .description("The gateway's own alarms: broker_lost (no MQTT connection), outbox_filling.")
        .datasource(ds)
        .with_target(InfluxQL(links, ds).alias("$tag_device $tag_rule"))
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
        .no_value("no technical alarms in this time range")
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
        .description("broker_lost and outbox_filling transitions (value: the outbox fill fraction), newest first.")
        .datasource(ds)
        .with_target(InfluxQL(gateway_alarms, ds).table())
        .override_by_name(*_coloured_column("priority"))
        .override_by_regexp(*_blank_when_empty("value|message"))
        .no_value("no gateway alarms in this time range")
        .height(10)
        .span(10)
    )


# --- public API ----------------------------------------------------------------------------------------------


def render(board: cogbuilder.Builder[dash_m.Dashboard]) -> dict[str, Any]:
    """The dashboard's JSON model, as Grafana stores it."""
    rendered: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return rendered


def build_all(profile: AlarmProfile, datasource_uid: str = "influxdb") -> dict[str, dict[str, Any]]:
    """name -> dashboard JSON, for the three dashboards."""
    ds = dash_m.DataSourceRef(type_val="influxdb", uid=datasource_uid)
    return {
        "wall": render(wall(profile, ds)),
        "room": render(room_detail(profile, ds)),
        "gateway": render(gateway_health(profile, ds)),
    }


def to_text(dashboard_json: dict[str, Any]) -> str:
    return json.dumps(dashboard_json, indent=2, ensure_ascii=False) + "\n"


def write_all(out_dir: Path, profile: AlarmProfile) -> list[Path]:
    """Write `<uid>.json` for each dashboard into out_dir (created if missing); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for board in build_all(profile).values():
        path = out_dir / f"{board['uid']}.json"
        path.write_text(to_text(board), encoding="utf-8")
        paths.append(path)
    return paths


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # a collapsed row holds its panels


def panel_queries(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, raw InfluxQL with Grafana's macros) of every query of every panel, in order."""
    return [
        (str(panel.get("title", "")), str(target["query"]))
        for panel in _panels(dashboard_json.get("panels") or [])
        for target in panel.get("targets") or []
        if "query" in target
    ]
