"""`watch`: a live terminal wall of every room, fed by MQTT only (it sees what any other consumer would see).

A value older than the live window is never shown as a number: the tile says NO DATA, and a device status that
is not ok is printed in place of a healthy-looking value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gateway.config import ConfigError, MqttSection, load_config
from gateway.records import parse_iso_ns

STALE_AFTER_S = 5.0
HEALTHY = {"ok", "connected"}


@dataclass
class DeviceView:
    kind: str = ""
    model: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    at: float | None = None  # receive time of the latest live reading
    state: str = "unknown"
    detail: str = ""


PRIORITY_STYLE = {"high": "bold white on red", "medium": "bold black on yellow", "low": "bold cyan"}
PRIORITY_ORDER = {"high": 0, "medium": 1, "low": 2}


@dataclass
class Wall:
    rooms: dict[str, dict[str, DeviceView]] = field(default_factory=dict)
    gateways: dict[str, dict[str, Any]] = field(default_factory=dict)
    alarms: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # room -> topic -> alarm
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # room -> latest session message

    def apply(self, topic: str, payload: bytes) -> None:
        if "/alarms/active/" in topic:
            room = topic.split("/alarms/active/")[0].rsplit("/", 1)[-1]
            if not payload:  # the retained alarm was removed: it has ended
                self.alarms.get(room, {}).pop(topic, None)
                return
        try:
            msg = json.loads(payload)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "alarm" and "/alarms/active/" in topic:
            self.alarms.setdefault(str(msg["room"]), {})[topic] = msg
            return
        if kind == "session":
            self.sessions[str(msg["room"])] = msg
            return
        if kind == "gateway":
            self.gateways[str(msg.get("gateway"))] = msg
            return
        if kind not in ("reading", "status") or msg.get("historical"):
            return  # replayed backlog is history, not the live state
        view = self.rooms.setdefault(str(msg["room"]), {}).setdefault(str(msg["device"]), DeviceView())
        view.kind, view.model = str(msg.get("kind", "")), str(msg.get("model", ""))
        if kind == "reading":
            at = parse_iso_ns(msg["time"]) / 1e9
            if view.at is None or at >= view.at:
                view.metrics, view.flags, view.at = msg.get("metrics", {}), msg.get("flags", []), at
        else:
            view.state, view.detail = str(msg.get("state")), str(msg.get("detail", ""))

    def render(self, now: float) -> Group:
        tiles = [
            self._tile(room, devices, now, self.alarms.get(room, {}), self.sessions.get(room))
            for room, devices in sorted(self.rooms.items())
        ]
        header = Text("Infusion rooms  ", style="bold")
        for gw, body in sorted(self.gateways.items()):
            style = "green" if body.get("state") == "online" else "bold red"
            counters = body.get("counters", {})
            header.append(f"gateway {gw}: {body.get('state')} ", style=style)
            header.append(
                f"(backlog mqtt {counters.get('backlog_mqtt', 0)}, influx {counters.get('backlog_influx', 0)})  ",
                style="dim",
            )
        if not tiles:
            tiles = [Panel("waiting for data...", title="no rooms yet")]
        return Group(header, Columns(tiles, equal=True, expand=False))

    @staticmethod
    def _tile(
        room: str,
        devices: dict[str, DeviceView],
        now: float,
        alarms: dict[str, dict[str, Any]],
        session: dict[str, Any] | None,
    ) -> Panel:
        table = Table.grid(padding=(0, 1))
        worst = "green"
        for alarm in sorted(alarms.values(), key=lambda a: PRIORITY_ORDER.get(a.get("priority", "low"), 3)):
            style = PRIORITY_STYLE.get(alarm.get("priority", "low"), "bold")
            label = f"{alarm.get('priority', '?').upper()} {alarm.get('message') or alarm.get('rule')}"
            if alarm.get("value") is not None:
                label += f" ({alarm['value']:g})"
            if alarm.get("transition") == "acknowledged":
                label += " ack"
            table.add_row(Text("ALARM", style=style), Text(label, style=style))
            worst = "red" if alarm.get("priority") != "low" else worst
        if session and session.get("transition") != "stopped":
            minutes = (now - parse_iso_ns(str(session["started"])) / 1e9) / 60
            table.add_row(Text("session", style="dim"), Text(f"{minutes:.0f} min", style="dim"))
        for name, view in sorted(devices.items()):
            age = None if view.at is None else now - view.at
            live = age is not None and age <= STALE_AFTER_S
            if view.state not in HEALTHY and not (view.kind == "nibp" and view.state == "measuring"):
                table.add_row(Text(name, style="bold"), Text(view.state.upper(), style="bold red"))
                worst = "red"
            elif view.kind == "nibp":  # a cuff is quiet between measurements: its state says whether it is alive
                table.add_row(Text(name, style="bold"), Text(view.state, style="dim"))
            elif not live:
                table.add_row(Text(name, style="bold"), Text("NO DATA", style="bold red"))
                worst = "red"
            else:
                table.add_row(Text(name, style="bold"), Text(f"{age:.0f}s ago", style="dim"))
            if view.kind == "nibp" and view.at is not None and "nibp_systolic" in view.metrics:
                m = view.metrics
                bp = f"{m['nibp_systolic']:g}/{m.get('nibp_diastolic', 0):g}"
                table.add_row("  BP", Text(f"{bp} mmHg, {(now - view.at) / 60:.0f} min ago", style="bold"))
                continue
            if live:
                for metric, label, unit in (
                    ("spo2", "SpO2", "%"),
                    ("pulse_rate", "PR", "/min"),
                    ("perfusion_index", "PI", "%"),
                    ("nibp_systolic", "SYS", "mmHg"),
                    ("nibp_diastolic", "DIA", "mmHg"),
                ):
                    if metric in view.metrics:
                        value = view.metrics[metric]
                        style = "bold"
                        if metric == "spo2" and value < 90:
                            style, worst = "bold yellow", "yellow" if worst == "green" else worst
                        table.add_row(f"  {label}", Text(f"{value:g} {unit}", style=style))
                shown = [f for f in view.flags if not f.startswith("device_alarm_")]
                if shown:
                    table.add_row("", Text(", ".join(shown), style="yellow"))
        return Panel(table, title=f"room {room}", border_style=worst, width=34)


def mqtt_from_args(args: argparse.Namespace) -> tuple[MqttSection, str]:
    if args.config is not None:
        cfg = load_config(args.config)
        mqtt, site = cfg.mqtt, cfg.gateway.site
    else:
        mqtt, site = MqttSection(), "+"
    updates: dict[str, Any] = {}
    if args.host:
        updates["host"] = args.host
    if args.port:
        updates["port"] = args.port
    if args.prefix:
        updates["topic_prefix"] = args.prefix
    return mqtt.model_copy(update=updates), args.site or site


async def run_watch(mqtt: MqttSection, site: str, once: float | None, console: Console) -> Wall:
    from gateway.sinks.mqtt import subscribe

    wall = Wall()
    topics = [f"{mqtt.topic_prefix}/{site}/#"]

    async def consume() -> None:
        async with subscribe(mqtt, topics, f"infusion-watch-{int(time.time() * 1000) % 10**9}") as messages:
            async for topic, payload in messages:
                wall.apply(topic, payload)

    task = asyncio.create_task(consume())
    try:
        if once is not None:
            await asyncio.sleep(once)
            if task.done():
                task.result()
            console.print(wall.render(time.time()))
        else:
            with Live(wall.render(time.time()), console=console, refresh_per_second=4, screen=False) as live:
                while not task.done():
                    live.update(wall.render(time.time()))
                    await asyncio.sleep(0.5)
                task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return wall


def watch_main(args: argparse.Namespace) -> int:
    from gateway.sinks.mqtt import MqttError

    try:
        mqtt, site = mqtt_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        asyncio.run(run_watch(mqtt, site, args.once, Console()))
    except KeyboardInterrupt:
        pass
    except MqttError as exc:
        print(f"watch: cannot reach the MQTT broker at {mqtt.host}:{mqtt.port}: {exc}", file=sys.stderr)
        return 1
    return 0
