"""Notification delay, end to end: a simulated desaturation on a real pty -> the alarm -> a message at a real HTTP
receiver, through the real gateway process (real mosquitto and influxd), its `notify` sink and Apprise.

Run: `.venv/bin/python -m benchmarks.notify_delay --rooms 5 --reps 6` (about a minute). Each room is a simulated
Masimo Rad-8 on its own pty, one line a second, the rooms staggered so their moments do not coincide. A repetition:
SpO2 98 for 3 s, then SpO2 85 (below the bench rule `spo2-low`, 90, delay_s 2 s) until its notification is at the
receiver, then SpO2 98 until the clearing's notification is there too. The one target is Apprise's `json://` at an
aiohttp server on loopback (a stand-in for a phone or chat service that answers at once), every priority routed to it,
its rate limit set out of the way (1000 a minute). Measured, per repetition:

- total: the first SpO2-85 frame written -> the `ALARM` message received (the rule's delay_s is in it; the example
  profile's 15 s would be too);
- processing: total minus the rule's delay_s, split into the engine (frame -> the alarm's own timestamp: the wait for
  its next check) and notify (the alarm's timestamp -> the message at the receiver: outbox commit, the notify
  cursor, the notify state saved, Apprise's HTTP POST);
- on MQTT -> at the receiver, for comparison with the alarm's other path;
- clearing: the first SpO2-98 frame written -> the `cleared` message (clear_delay_s 1 s in it).

Writer, MQTT subscriber and receiver run in this process on the same clock. Figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from benchmarks.harness import collector, percentiles, rig, wait_until
from devices.base import Sample
from devices.registry import get_model
from devtools.localservices import find_free_port
from gateway.config import AlarmsSection
from simulators.serve import PtyEndpoint

MODEL = "masimo-ascii1"
RULE = "spo2-low"
DELAY_S = 2.0
CLEAR_DELAY_S = 1.0
NORMAL_SPO2, LOW_SPO2 = 98.0, 85.0
NORMAL_LINES = 3
PHASE_S = 0.3  # room i's lines are written i * PHASE_S after room 0's
BOUND_S = 40.0  # every wait is bounded; past it the run fails naming what it waited for
URL_VAR = "BENCH_NOTIFY_URL"

PROFILE = f"""
[alarms]
profile = "notify-bench"
[[alarms.rules]]
id = "{RULE}"
metric = "spo2"
below = 90
priority = "high"
delay_s = {DELAY_S}
clear_delay_s = {CLEAR_DELAY_S}
hysteresis = 1
message = "SpO2 low"

[notify]
[notify.targets.phones]
url = {{ env = "{URL_VAR}" }}
max_messages = 1000
[[notify.routes]]
targets = ["phones"]
"""


@dataclass
class Rep:
    room: str
    rep: int
    onset: float = 0.0  # write of the first SpO2-85 frame
    raised_at: float = 0.0  # the alarm's own timestamp (the engine's `now` when it raised it)
    on_mqtt: float = 0.0
    at_receiver: float = 0.0
    recovery: float = 0.0  # write of the first SpO2-98 frame after it
    cleared_at_receiver: float = 0.0


class Receiver:
    """Apprise's json:// target: takes every POST at once, stamped with time.time() on arrival."""

    def __init__(self) -> None:
        self.port = find_free_port()
        self.got: list[tuple[float, str, str]] = []  # (arrival, title, ref)

    async def _post(self, request: web.Request) -> web.Response:
        body = json.loads(await request.text())
        arrived = time.time()
        ref = next((x for x in str(body["message"]).splitlines() if x.startswith("Ref: ")), "Ref: ?")
        self.got.append((arrived, str(body["title"]), ref.removeprefix("Ref: ")))
        return web.Response(status=200)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Receiver]:
        app = web.Application()
        app.router.add_post("/{path}", self._post)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()

    def first(self, room: str, suffix: str, after: float) -> float | None:
        """Arrival of the first message about `room` whose title ends with `suffix`, received after `after`."""
        pattern = re.compile(rf"\broom {re.escape(room)} oximeter: .* - {re.escape(suffix)}$")
        return next((t for t, title, _ in self.got if t > after and pattern.search(title)), None)


def _frame(spo2: float) -> bytes:
    metrics = {"spo2": spo2, "pulse_rate": 72.0, "perfusion_index": 3.5}
    return get_model(MODEL).encode(Sample(metrics, device_time=datetime(2026, 1, 1)))


async def _room(
    index: int,
    room: str,
    endpoint: PtyEndpoint,
    start: float,
    reps: int,
    receiver: Receiver,
    got: list[tuple[float, str, dict[str, Any]]],
) -> list[Rep]:
    done: list[Rep] = []
    k = 0  # line number: line k is written at start + k

    async def line(spo2: float) -> float:
        nonlocal k
        await asyncio.sleep(max(0.0, start + k - time.time()))
        endpoint.write(_frame(spo2))
        k += 1
        return time.time()

    for i in range(reps):
        rep = Rep(room, i)
        for _ in range(NORMAL_LINES + (index if i == 0 else 0)):  # the first onsets are staggered by a line too
            await line(NORMAL_SPO2)
        rep.onset = await line(LOW_SPO2)
        while (t := receiver.first(room, "ALARM", rep.onset)) is None:
            if time.time() - rep.onset > DELAY_S + BOUND_S:
                raise RuntimeError(f"room {room} rep {i}: no ALARM message at the receiver within {BOUND_S:g} s")
            await line(LOW_SPO2)
        rep.at_receiver = t
        raised = next(
            (
                (arrived, msg)
                for arrived, _topic, msg in got
                if arrived > rep.onset and msg.get("room") == room and msg.get("transition") == "raised"
            ),
            None,
        )
        if raised is None:
            raise RuntimeError(f"room {room} rep {i}: the message came but no `raised` event on MQTT")
        rep.on_mqtt, rep.raised_at = raised[0], datetime.fromisoformat(raised[1]["time"]).timestamp()
        rep.recovery = await line(NORMAL_SPO2)
        while (t := receiver.first(room, "cleared", rep.recovery)) is None:
            if time.time() - rep.recovery > CLEAR_DELAY_S + BOUND_S:
                raise RuntimeError(f"room {room} rep {i}: no cleared message at the receiver within {BOUND_S:g} s")
            await line(NORMAL_SPO2)
        rep.cleared_at_receiver = t
        done.append(rep)
    return done


def _s(values: list[float]) -> dict[str, float]:
    """p50, p99 and max in seconds (p99 of a few dozen is near the max: both are shown)."""
    ms = percentiles(values)
    return {"n": ms["n"], "p50_s": ms["p50_ms"] / 1000, "p99_s": ms["p99_ms"] / 1000, "max_s": ms["max_ms"] / 1000}


async def measure(workdir: Path, rooms: int = 5, reps: int = 6) -> dict[str, Any]:
    spec = [(str(i + 1), "oximeter", MODEL) for i in range(rooms)]
    receiver = Receiver()
    os.environ[URL_VAR] = f"json://127.0.0.1:{receiver.port}/phones"  # the gateway reads its target from here
    with rig(workdir) as r:
        endpoints = r.open_ptys(spec)
        topics = ["infusion/bench/+/oximeter/status", "infusion/bench/+/alarms/events"]
        async with receiver.running(), collector(r.broker.port, topics) as got:
            r.start_gateway(r.config(spec, PROFILE))
            connected = await wait_until(
                lambda: sum(1 for _, t, m in got if t.endswith("/status") and m.get("state") == "connected") >= rooms,
                30,
            )
            if not connected:
                raise RuntimeError(f"the gateway did not open all ptys; see {workdir / 'gateway.log'}")
            start = time.time() + 1.0
            per_room = await asyncio.gather(
                *(
                    _room(i, room, endpoint, start + i * PHASE_S, reps, receiver, got)
                    for i, ((room, _, _), endpoint) in enumerate(zip(spec, endpoints, strict=True))
                )
            )
            alarm_events = [m for _, t, m in got if t.endswith("/alarms/events")]
    runs = [rep for room in per_room for rep in room]
    total = [x.at_receiver - x.onset for x in runs]
    return {
        "rooms": rooms,
        "reps_per_room": reps,
        "model": MODEL,
        "rule": RULE,
        "rule_delay_s": DELAY_S,
        "clear_delay_s": CLEAR_DELAY_S,
        "alarm_tick_s": AlarmsSection().tick_s,
        "total": _s(total),
        "processing": _s([t - DELAY_S for t in total]),
        "engine": _s([x.raised_at - x.onset - DELAY_S for x in runs]),
        "notify": _s([x.at_receiver - x.raised_at for x in runs]),
        "mqtt_to_receiver": _s([x.at_receiver - x.on_mqtt for x in runs]),
        "clearing_total": _s([x.cleared_at_receiver - x.recovery for x in runs]),
        "messages_received": len(receiver.got),
        "alarm_events_on_mqtt": len(alarm_events),
        "runs": [asdict(x) for x in runs],
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a Markdown table (seconds: p50 / p99 / max over every repetition)."""

    def f(d: dict[str, float]) -> str:
        return f"{d['p50_s']:.3f} / {d['p99_s']:.3f} / {d['max_s']:.3f}"

    n = result["total"]["n"]
    return "\n".join(
        [
            f"| path ({n} desaturations) | p50 / p99 / max, s |",
            "|---|---|",
            f"| frame -> ALARM message at the receiver (rule delay_s {result['rule_delay_s']:g} s in it) "
            f"| {f(result['total'])} |",
            f"| processing (the same minus delay_s) | {f(result['processing'])} |",
            f"| of which the engine (frame -> the alarm's timestamp, minus delay_s) | {f(result['engine'])} |",
            f"| of which notify (the alarm's timestamp -> the message) | {f(result['notify'])} |",
            f"| the alarm on MQTT -> the message at the receiver | {f(result['mqtt_to_receiver'])} |",
            f"| recovery frame -> cleared message (clear_delay_s {result['clear_delay_s']:g} s in it) "
            f"| {f(result['clearing_total'])} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rooms", type=int, default=5, help="rooms (ptys) desaturating, staggered")
    parser.add_argument("--reps", type=int, default=6, help="desaturations per room, one after the other")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON too")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="bench-notify-") as tmp:
        result = asyncio.run(measure(Path(tmp), args.rooms, args.reps))
    print(f"notification delay, {started}, {args.rooms} rooms x {args.reps} desaturations, json:// receiver")
    print(table(result))
    print(f"messages received {result['messages_received']}, alarm events on MQTT {result['alarm_events_on_mqtt']}")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
