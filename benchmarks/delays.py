"""Disclosed delays, end to end: from the device's frame to what a nurse sees, with the gateway's default config and
the shipped example alarm profile, against real ptys, mosquitto, influxd and the real gateway process.

Run: `.venv/bin/python -m benchmarks.delays --rooms 5` (under a minute). Each room is one repetition: a simulated
Masimo Rad-8 on its own pty, one line a second, the rooms staggered so their moments do not coincide. A room sends
SpO2 98 for 3 s, then SpO2 90, below `spo2-low` (92) and above every stricter limit, so exactly one rule's delay
applies; once its alarm is on MQTT and on the wall the room falls silent. Measured, per room:

(a) the first SpO2-90 frame written -> the `raised` event at an MQTT subscriber. The total is the rule's `delay_s`
    plus the processing delay, split into the engine's wait for its next check (readings and every `tick_s`) and
    delivery (the alarm's own timestamp -> the subscriber: outbox commit and MQTT);
(b) the same frame -> the first time the wall's own active-alarm InfluxQL query (`dashboards.build`), polled against
    influxd, returns the alarm (InfluxDB flush interval, write, query). Grafana runs the query once per refresh
    interval of the wall (its generated JSON's "refresh"), so the worst case on screen adds one refresh;
(c) the last frame before silence -> the `no_data` status and the `no_data` alarm at the subscriber (the model's
    `stale_after_s` plus processing), -> the wall's active-alarm query listing `no_data`, and -> the wall's live
    SpO2 tile query (taken from the generated wall JSON) returning no row, i.e. the tile showing NO DATA (its
    LIVE_WINDOW plus processing); on screen, plus one refresh at worst.

Writer, subscriber and poller run in this process on the same clock. Polls of InfluxDB run every POLL_S and add
up to that (plus a query's own time) to (b) and (c). Grafana's own query and render time is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.harness import Rig, collector, rig, wait_until
from dashboards.build import (
    GENERATED_DIR,
    LIVE_WINDOW,
    PRIORITY_CODES,
    ROOM_MATCH,
    WALL_UID,
    panel_queries,
    room_tile_query,
)
from devices.base import Sample
from devices.registry import get_model
from gateway.alarms import EXAMPLE_KETAMINE_PROFILE
from gateway.config import AlarmsSection, InfluxSection
from simulators.serve import PtyEndpoint

MODEL = "masimo-ascii1"
RULE = "spo2-low"
NORMAL_SPO2 = 98.0
LOW_SPO2 = 90.0  # below spo2-low (92), above spo2-very-low (88): one rule, one delay
NORMAL_LINES = 3
STAGGER_LINES = 3  # each room's SpO2 falls 3 lines (and PHASE_S) after the one before: onsets, raises and
PHASE_S = 0.3  # silences of different rooms do not fall together
POLL_S = 0.05
BOUND_S = 40.0  # every wait is bounded; past it the run fails with what it was waiting for


def _seconds(text: str) -> float:
    """Grafana's "5s" / "1m" / "1h"."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a Grafana duration: {text!r}")
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match[2]]


LIVE_S = _seconds(LIVE_WINDOW)


def _iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True)
class Wall:
    """What the generated wall runs: its refresh interval and the room tile's one query (alarm, SpO2, state...)."""

    refresh_s: float
    alarms_query: str  # the room tile's query, with $room: its "Alarm" column is the highest active priority
    live_query: str  # the same query: its "SpO2" column is empty when the tile says NO DATA

    @staticmethod
    def load() -> Wall:
        board = json.loads((GENERATED_DIR / f"{WALL_UID}.json").read_text())
        tile = room_tile_query(ROOM_MATCH)
        if tile not in dict(panel_queries(board)).values():
            raise RuntimeError("the generated wall does not run room_tile_query: run `dashboards build` first")
        return Wall(_seconds(board["refresh"]), tile, tile)

    @staticmethod
    def for_room(query: str, room: str) -> str:
        return query.replace("$room", re.escape(room))


@dataclass
class RoomRun:
    room: str
    onset: float = 0.0  # write of the first SpO2-90 frame
    raised_at: float = 0.0  # the alarm's own timestamp (the engine's `now` when it raised it)
    on_mqtt: float = 0.0
    on_wall_query: float = 0.0
    last_frame: float = 0.0
    no_data_at: float = 0.0  # the status's own timestamp
    no_data_on_mqtt: float = 0.0
    no_data_alarm_on_mqtt: float = 0.0
    no_data_on_wall_query: float = 0.0
    tile_empty: float = 0.0


def _frame(spo2: float) -> bytes:
    metrics = {"spo2": spo2, "pulse_rate": 72.0, "perfusion_index": 3.5}
    return get_model(MODEL).encode(Sample(metrics, device_time=datetime(2026, 1, 1)))


Message = dict[str, Any]
Rows = list[dict[str, Any]]


def _first(
    got: list[tuple[float, str, Message]], match: Callable[[Message], bool], after: float
) -> tuple[float, Message] | None:
    """The first message matching `match` that arrived after `after` (arrival time, message)."""
    return next(((arrived, msg) for arrived, _topic, msg in got if arrived > after and match(msg)), None)


async def _poll(r: Rig, query: str, done: Callable[[Rows], bool], what: str) -> float:
    """Run `query` every POLL_S until done(rows); the time the answer that satisfied it came back."""
    deadline = time.monotonic() + BOUND_S
    while True:
        rows = await asyncio.to_thread(r.influx.query, r.database, query)
        answered = time.time()
        if done(rows):
            return answered
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not seen within {BOUND_S:g} s (last answer {rows})")
        await asyncio.sleep(POLL_S)


def _column(rows: Rows, name: str) -> list[Any]:
    """The non-null values of one column of the room tile's answer (every row of every series)."""
    return [
        row[series["columns"].index(name)]
        for series in rows
        if name in series["columns"]
        for row in series["values"]
        if row[series["columns"].index(name)] is not None
    ]


def _alarm_at_least(priority: str) -> Callable[[Rows], bool]:
    """Whether the room tile shows an active alarm of `priority` or higher (its "Alarm" field, reduced by max)."""

    def shows(rows: Rows) -> bool:
        return any(float(v) >= PRIORITY_CODES[priority] for v in _column(rows, "Alarm"))  # type: ignore[index]

    return shows


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.time()))


async def _room(
    r: Rig,
    run: RoomRun,
    index: int,
    endpoint: PtyEndpoint,
    start: float,
    wall: Wall,
    delay_s: float,
    stale_s: float,
    got: list[tuple[float, str, Message]],
) -> None:
    room = run.room

    def write(spo2: float) -> float:
        endpoint.write(_frame(spo2))
        return time.time()

    normal = NORMAL_LINES + index * STAGGER_LINES  # every room talks from the start, so none is silent early
    for k in range(normal):
        await _sleep_until(start + k)
        write(NORMAL_SPO2)
    k = normal
    await _sleep_until(start + k)
    run.onset = run.last_frame = write(LOW_SPO2)

    def raised(msg: Message) -> bool:
        return bool(
            msg.get("type") == "alarm" and msg["room"] == room and msg["rule"] == RULE and msg["transition"] == "raised"
        )

    on_wall = _alarm_at_least("medium")  # spo2-low is medium in the example profile

    async def wall_sees_alarm() -> None:
        await _sleep_until(run.onset + delay_s - 1.0)  # no point asking before the rule's delay is nearly over
        query = Wall.for_room(wall.alarms_query, room)
        run.on_wall_query = await _poll(r, query, on_wall, f"room {room}: {RULE} from the wall's alarm query")

    polling = asyncio.create_task(wall_sees_alarm())
    try:
        while not (polling.done() and _first(got, raised, run.onset)):  # SpO2 90 a second until both saw it
            if time.time() - run.onset > delay_s + BOUND_S:
                raise RuntimeError(f"room {room}: no {RULE} raised on MQTT within {delay_s + BOUND_S:g} s")
            k += 1
            await _sleep_until(start + k)
            run.last_frame = write(LOW_SPO2)
        await polling
    finally:
        polling.cancel()
    arrived, msg = _first(got, raised, run.onset) or (0.0, {})
    run.on_mqtt, run.raised_at = arrived, _iso(msg["time"])

    # Silence: the device says nothing more.
    def status_no_data(msg: Message) -> bool:
        return bool(msg.get("type") == "status" and msg["room"] == room and msg.get("state") == "no_data")

    def alarm_no_data(msg: Message) -> bool:
        return bool(
            msg.get("type") == "alarm"
            and msg["room"] == room
            and msg["rule"] == "no_data"
            and msg["transition"] == "raised"
        )

    async def tile_empty() -> None:
        await _sleep_until(run.last_frame + LIVE_S - 1.0)
        live = Wall.for_room(wall.live_query, room)
        run.tile_empty = await _poll(
            r, live, lambda rows: not _column(rows, "SpO2"), f"room {room}: NO DATA on the live SpO2 tile"
        )

    async def wall_sees_no_data() -> None:
        await _sleep_until(run.last_frame + stale_s - 1.0)
        query = Wall.for_room(wall.alarms_query, room)
        has_no_data = _alarm_at_least("high")  # no_data is high
        run.no_data_on_wall_query = await _poll(r, query, has_no_data, f"room {room}: no_data from the wall's alarms")

    await asyncio.gather(tile_empty(), wall_sees_no_data())
    if not await wait_until(
        lambda: _first(got, status_no_data, run.last_frame) and _first(got, alarm_no_data, run.last_frame), BOUND_S
    ):
        raise RuntimeError(f"room {room}: no no_data status and alarm on MQTT within {BOUND_S:g} s of silence")
    arrived, msg = _first(got, status_no_data, run.last_frame) or (0.0, {})
    run.no_data_on_mqtt, run.no_data_at = arrived, _iso(msg["time"])
    run.no_data_alarm_on_mqtt = (_first(got, alarm_no_data, run.last_frame) or (0.0, {}))[0]


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50_s": round(statistics.median(values), 3), "max_s": round(max(values), 3)}


async def measure(workdir: Path, rooms: int = 5) -> dict[str, Any]:
    wall = Wall.load()
    rule = next(rule for rule in EXAMPLE_KETAMINE_PROFILE.rules if rule.id == RULE)
    delay_s = rule.delay_s
    stale_s = get_model(MODEL).spec.stale_after_s
    spec = [(str(i + 1), "oximeter", MODEL) for i in range(rooms)]
    runs = [RoomRun(room) for room, _, _ in spec]
    with rig(workdir) as r:
        endpoints = r.open_ptys(spec)
        topics = ["infusion/bench/+/oximeter/status", "infusion/bench/+/alarms/events"]
        async with collector(r.broker.port, topics) as got:
            r.start_gateway(r.config(spec))  # the defaults: no [alarms], so the example profile
            connected = await wait_until(
                lambda: sum(1 for _, t, m in got if t.endswith("/status") and m.get("state") == "connected") >= rooms,
                30,
            )
            if not connected:
                raise RuntimeError(f"the gateway did not open all ptys; see {workdir / 'gateway.log'}")
            start = time.time() + 1.0
            await asyncio.gather(
                *(
                    _room(r, run, i, endpoint, start + i * PHASE_S, wall, delay_s, stale_s, got)
                    for i, (run, endpoint) in enumerate(zip(runs, endpoints, strict=True))
                )
            )
    alarm_total = [x.on_mqtt - x.onset for x in runs]
    wall_total = [x.on_wall_query - x.onset for x in runs]
    no_data_total = [x.no_data_on_mqtt - x.last_frame for x in runs]
    tile_total = [x.tile_empty - x.last_frame for x in runs]
    no_data_wall = [x.no_data_on_wall_query - x.last_frame for x in runs]
    return {
        "rooms": rooms,
        "model": MODEL,
        "profile": EXAMPLE_KETAMINE_PROFILE.name,
        "rule": RULE,
        "rule_delay_s": delay_s,
        "stale_after_s": stale_s,
        "live_window_s": LIVE_S,
        "wall_refresh_s": wall.refresh_s,
        "alarm_tick_s": AlarmsSection().tick_s,
        "influx_flush_interval_s": InfluxSection(api="v1", database="x").flush_interval_s,
        "poll_s": POLL_S,
        "alarm_mqtt": {
            "total": _stats(alarm_total),
            "processing": _stats([t - delay_s for t in alarm_total]),
            "engine_wait": _stats([x.raised_at - x.onset - delay_s for x in runs]),
            "delivery": _stats([x.on_mqtt - x.raised_at for x in runs]),
        },
        "alarm_wall_query": {
            "total": _stats(wall_total),
            "processing": _stats([t - delay_s for t in wall_total]),
            "after_mqtt": _stats([x.on_wall_query - x.on_mqtt for x in runs]),
            "worst_on_screen_s": round(max(wall_total) + wall.refresh_s, 3),
        },
        "no_data_mqtt": {
            "total": _stats(no_data_total),
            "processing": _stats([t - stale_s for t in no_data_total]),
            "detection": _stats([x.no_data_at - x.last_frame for x in runs]),
            "alarm_total": _stats([x.no_data_alarm_on_mqtt - x.last_frame for x in runs]),
        },
        "no_data_wall_query": {
            "total": _stats(no_data_wall),
            "processing": _stats([t - stale_s for t in no_data_wall]),
            "worst_on_screen_s": round(max(no_data_wall) + wall.refresh_s, 3),
        },
        "no_data_tile": {
            "total": _stats(tile_total),
            "processing": _stats([t - LIVE_S for t in tile_total]),
            "worst_on_screen_s": round(max(tile_total) + wall.refresh_s, 3),
        },
        "runs": [asdict(x) for x in runs],
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a Markdown table (seconds; p50 / max over the rooms)."""

    def pm(d: dict[str, float]) -> str:
        return f"{d['p50_s']:.3f} / {d['max_s']:.3f}"

    a, b, c, e = (result[k] for k in ("alarm_mqtt", "alarm_wall_query", "no_data_mqtt", "no_data_wall_query"))
    d = result["no_data_tile"]
    refresh = result["wall_refresh_s"]
    rows = [
        "| path | built-in wait | processing p50 / max | total p50 / max | worst on screen |",
        "|---|---|---|---|---|",
        f"| (a) frame -> `{result['rule']}` raised on MQTT | rule delay_s {result['rule_delay_s']:g} s "
        f"| {pm(a['processing'])} (engine wait {pm(a['engine_wait'])}, delivery {pm(a['delivery'])}) "
        f"| {pm(a['total'])} | n/a |",
        f"| (b) frame -> wall's active-alarm query returns it | rule delay_s {result['rule_delay_s']:g} s "
        f"| {pm(b['processing'])} ({pm(b['after_mqtt'])} after MQTT) | {pm(b['total'])} "
        f"| {b['worst_on_screen_s']:.3f} (+ refresh {refresh:g} s) |",
        f"| (c) last frame -> `no_data` status on MQTT | stale_after_s {result['stale_after_s']:g} s "
        f"| {pm(c['processing'])} | {pm(c['total'])} (alarm {pm(c['alarm_total'])}) | n/a |",
        f"| (c) last frame -> wall's alarm query returns `no_data` | stale_after_s {result['stale_after_s']:g} s "
        f"| {pm(e['processing'])} | {pm(e['total'])} | {e['worst_on_screen_s']:.3f} (+ refresh {refresh:g} s) |",
        f"| (c) last frame -> live tile query returns no row (NO DATA) | LIVE_WINDOW {result['live_window_s']:g} s "
        f"| {pm(d['processing'])} | {pm(d['total'])} | {d['worst_on_screen_s']:.3f} (+ refresh {refresh:g} s) |",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rooms", type=int, default=5, help="repetitions, one room each, run staggered")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON too")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="bench-delays-") as tmp:
        result = asyncio.run(measure(Path(tmp), args.rooms))
    print(f"disclosed delays, {started}, {args.rooms} rooms, profile {result['profile']}, seconds")
    print(table(result))
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
