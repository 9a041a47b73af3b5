"""`watch`: a live terminal wall of every room, fed by MQTT only (it sees what any other consumer would see).

The wall must never look live when it is not, nor show a number that is not a current, valid measurement:
- a value older than the live window is never shown as a number: the tile says NO DATA;
- a device status that is not ok (probe off, no sensor, no data...) is printed instead of the device's values,
  since a device may keep sending held values; a reading marked `valid: false` is never printed as a number;
- a room in standby says STANDBY and shows no values;
- an alarm whose condition cannot be determined (stale or unusable data) says so, without a value;
- values are coloured by the rules of the active alarm profile (the site's policy), not by limits of our own;
- when the link to the broker is lost, a full-screen CONNECTION LOST banner replaces the wall until it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.align import Align
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gateway.alarms import EXAMPLE_KETAMINE_PROFILE, AlarmProfile, Priority
from gateway.backoff import Backoff
from gateway.config import ConfigError, MqttSection, SecretRef, load_config
from gateway.envelope import parse_iso_ns

STALE_AFTER_S = 5.0
HEALTHY = {"ok", "connected"}
REFRESH_S = 0.5

PRIORITY_STYLE = {"high": "bold white on red", "medium": "bold black on yellow", "low": "bold cyan"}
PRIORITY_ORDER = {"high": 0, "medium": 1, "low": 2}
BORDER = {"high": "red", "medium": "yellow", "low": "cyan"}
BORDER_RANK = {"green": 0, "cyan": 1, "yellow": 2, "red": 3}
METRICS = (
    ("spo2", "SpO2", "%"),
    ("pulse_rate", "PR", "/min"),
    ("perfusion_index", "PI", "%"),
    ("nibp_systolic", "SYS", "mmHg"),
    ("nibp_diastolic", "DIA", "mmHg"),
)


def _worse(a: str, b: str) -> str:
    return a if BORDER_RANK.get(a, 3) >= BORDER_RANK.get(b, 3) else b


def _highest(priorities: Iterable[Priority | None]) -> Priority | None:
    best: Priority | None = None
    for p in priorities:
        if p is not None and (best is None or PRIORITY_ORDER[p] < PRIORITY_ORDER[best]):
            best = p
    return best


def _local_hhmm(iso: object) -> str | None:
    """An ISO UTC time as local HH:MM (a wall clock reading), or None when it is not a time."""
    if not isinstance(iso, str):
        return None
    try:
        at = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone().strftime("%H:%M")


@dataclass
class DeviceView:
    kind: str = ""
    model: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    valid: bool = True  # false: the device flagged these values unfit (probe off, artifact...); never shown
    at: float | None = None  # receive time of the latest live reading
    state: str = "unknown"
    detail: str = ""


@dataclass
class Wall:
    """What the broker says about every room, and how to draw it. `profile` colours the values."""

    profile: AlarmProfile = EXAMPLE_KETAMINE_PROFILE
    rooms: dict[str, dict[str, DeviceView]] = field(default_factory=dict)
    gateways: dict[str, dict[str, Any]] = field(default_factory=dict)
    alarms: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # room -> topic -> alarm
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # room -> latest session message
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # room -> retained room_mode message
    room_gateway: dict[str, str] = field(default_factory=dict)  # room -> the gateway that serves it

    def forget(self) -> None:
        """Drop everything learnt from the broker: after a reconnect the retained topics are re-sent, and an
        alarm that ended while we were away would otherwise stay on the wall (an emptied topic is not re-sent)."""
        self.rooms.clear()
        self.gateways.clear()
        self.alarms.clear()
        self.sessions.clear()
        self.modes.clear()
        self.room_gateway.clear()

    def apply(self, topic: str, payload: bytes) -> None:
        """Take one MQTT message; malformed ones are ignored (one bad publisher must not stop the wall)."""
        with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
            self._apply(topic, payload)

    def _apply(self, topic: str, payload: bytes) -> None:
        if not payload:  # a retained message was removed
            if "/alarms/active/" in topic:  # the alarm has ended (cleared or suspended)
                room = topic.split("/alarms/active/")[0].rsplit("/", 1)[-1]
                self.alarms.get(room, {}).pop(topic, None)
            elif topic.endswith("/mode"):
                self.modes.pop(topic.rsplit("/", 2)[-2], None)
            return
        msg = json.loads(payload)
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "alarm":
            if "/alarms/active/" in topic:
                room_alarms = self.alarms.setdefault(str(msg["room"]), {})
                if msg.get("active", True):
                    room_alarms[topic] = msg
                else:  # suspended or cleared, sent with a body: it has ended all the same
                    room_alarms.pop(topic, None)
            return
        if kind == "room_mode":
            self.modes[str(msg["room"])] = msg
            return
        if kind == "session":
            parse_iso_ns(str(msg["started"]))  # drawn later: refuse a message that could not be
            self.sessions[str(msg["room"])] = msg
            return
        if kind == "gateway":
            gateway = str(msg.get("gateway"))
            self.gateways[gateway] = msg
            for key in dict(msg.get("devices") or {}):  # room/device
                self.room_gateway[str(key).split("/", 1)[0]] = gateway
            return
        if kind not in ("reading", "status") or msg.get("historical"):
            return  # replayed backlog is history, not the live state
        room, device = str(msg["room"]), str(msg["device"])
        if kind == "reading":
            at = parse_iso_ns(msg["time"]) / 1e9
            metrics = {str(k): float(v) for k, v in dict(msg.get("metrics") or {}).items()}
        view = self.rooms.setdefault(room, {}).setdefault(device, DeviceView())
        view.kind, view.model = str(msg.get("kind", "")), str(msg.get("model", ""))
        if kind == "reading":
            if view.at is None or at >= view.at:
                view.metrics, view.at = metrics, at
                view.flags = [str(f) for f in msg.get("flags") or []]
                view.valid = msg.get("valid", True) is not False
        else:
            view.state, view.detail = str(msg.get("state")), str(msg.get("detail", ""))

    def priority_of(self, room: str, device: str, metric: str, value: float) -> Priority | None:
        """The highest priority among the profile's limit rules for this room and device that `value` violates."""
        return _highest(
            rule.priority
            for rule in self.profile.rules
            if rule.metric == metric
            and rule.applies(room, device)  # above_baseline_pct rules have neither limit: never violated here
            and ((rule.below is not None and value < rule.below) or (rule.above is not None and value > rule.above))
        )

    def render(self, now: float) -> Group:
        names = {r for r in (*self.rooms, *self.modes, *self.alarms) if not r.startswith("_")}
        tiles = [self._tile(room, now) for room in sorted(names)]
        header = Text("Infusion rooms  ", style="bold")
        if self.profile.example:
            header.append("example profile colours (not advice)  ", style="yellow")
        else:
            header.append(f"colours: profile {self.profile.name}  ", style="dim")
        for gw, body in sorted(self.gateways.items()):
            style = "green" if body.get("state") == "online" else "bold red"
            counters = body.get("counters", {})
            header.append(f"gateway {gw}: {body.get('state')} ", style=style)
            header.append(
                f"(backlog mqtt {counters.get('backlog_mqtt', 0)}, influx {counters.get('backlog_influx', 0)})  ",
                style="dim",
            )
        gateway_alarms = Table.grid(padding=(0, 1))
        self._alarm_rows(gateway_alarms, self.alarms.get("_gateway", {}), show_values=True)
        if not tiles:
            tiles = [Panel("waiting for data...", title="no rooms yet")]
        return Group(header, gateway_alarms, Columns(tiles, equal=True, expand=False))

    def _gateway_offline(self, room: str) -> str | None:
        gateway = self.room_gateway.get(room)
        if gateway is None or self.gateways.get(gateway, {}).get("state") != "offline":
            return None
        return gateway

    def _alarm_rows(self, table: Table, alarms: dict[str, dict[str, Any]], show_values: bool) -> str:
        worst = "green"
        for alarm in sorted(alarms.values(), key=lambda a: PRIORITY_ORDER.get(a.get("priority", "low"), 3)):
            priority = str(alarm.get("priority", "low"))
            style = PRIORITY_STYLE.get(priority, "bold")
            label = f"{priority.upper()} {alarm.get('message') or alarm.get('rule')}"
            indeterminate = bool(alarm.get("indeterminate"))
            if show_values and not indeterminate and isinstance(alarm.get("value"), int | float):
                label += f" ({alarm['value']:g})"
            if alarm.get("transition") == "acknowledged":
                label += " ack"
            table.add_row(Text("ALARM", style=style), Text(label, style=style))
            if indeterminate:  # stale or unusable data: whether the condition holds now is not known
                table.add_row("", Text("— cannot be determined", style=style))
            worst = _worse(worst, BORDER.get(priority, "red"))
        return worst

    def _tile(self, room: str, now: float) -> Panel:
        devices = self.rooms.get(room, {})
        table = Table.grid(padding=(0, 1))
        mode = self.modes.get(room)
        if mode is not None and mode.get("mode") == "standby":
            until = _local_hhmm(mode.get("until"))
            table.add_row(Text("STANDBY", style="bold"), Text(f"until {until}" if until else "", style="bold"))
            self._alarm_rows(table, self.alarms.get(room, {}), show_values=False)
            for name, view in sorted(devices.items()):  # which devices are there, never their values
                table.add_row(Text(name, style="dim"), Text(view.state, style="dim"))
            return Panel(table, title=f"room {room} STANDBY", border_style="dim", width=34)
        offline = self._gateway_offline(room)
        if offline is not None:  # nobody is judging this room now: its alarms and values are not current
            table.add_row(Text("GATEWAY", style="bold white on red"), Text(f"{offline} OFFLINE", style="bold red"))
            table.add_row("", Text("alarms not current", style="bold red"))
            self._alarm_rows(table, self.alarms.get(room, {}), show_values=False)
            for name in sorted(devices):
                table.add_row(Text(name, style="dim"), Text("unknown", style="bold red"))
            return Panel(table, title=f"room {room}", border_style="red", width=34)
        worst = self._alarm_rows(table, self.alarms.get(room, {}), show_values=True)
        session = self.sessions.get(room)
        if session and session.get("transition") != "stopped":
            minutes = (now - parse_iso_ns(str(session["started"])) / 1e9) / 60
            table.add_row(Text("session", style="dim"), Text(f"{minutes:.0f} min", style="dim"))
        for name, view in sorted(devices.items()):
            worst = _worse(worst, self._device_rows(table, room, name, view, now))
        return Panel(table, title=f"room {room}", border_style=worst, width=34)

    def _device_rows(self, table: Table, room: str, name: str, view: DeviceView, now: float) -> str:
        """The device's rows; returns the border colour they call for."""
        age = None if view.at is None else now - view.at
        live = age is not None and age <= STALE_AFTER_S
        if view.state not in HEALTHY and not (view.kind == "nibp" and view.state == "measuring"):
            # the state, never the values: a device with the probe off may still send held ones
            table.add_row(Text(name, style="bold"), Text(view.state.upper(), style="bold red"))
            return "red"
        if view.kind == "nibp":  # a cuff is quiet between measurements: its state says whether it is alive
            table.add_row(Text(name, style="bold"), Text(view.state, style="dim"))
            m = view.metrics
            if view.at is None or "nibp_systolic" not in m:
                return "green"
            ago = f"{(now - view.at) / 60:.0f} min ago"
            if not view.valid:
                table.add_row("  BP", Text(f"not valid, {ago}", style="bold yellow"))
                return "yellow"
            priority = _highest(
                self.priority_of(room, name, metric, m[metric])
                for metric in ("nibp_systolic", "nibp_diastolic", "nibp_mean")
                if metric in m
            )
            bp = (
                f"{m['nibp_systolic']:g}/{m['nibp_diastolic']:g}"
                if "nibp_diastolic" in m
                else f"{m['nibp_systolic']:g}/-"
            )
            table.add_row("  BP", Text(f"{bp} mmHg, {ago}", style=PRIORITY_STYLE[priority] if priority else "bold"))
            return BORDER[priority] if priority else "green"
        if not live:
            table.add_row(Text(name, style="bold"), Text("NO DATA", style="bold red"))
            return "red"
        shown = [f for f in view.flags if not f.startswith("device_alarm_")]
        if not view.valid:  # the device says these values are unfit: show why, never the numbers
            table.add_row(Text(name, style="bold"), Text("NOT VALID", style="bold red"))
            table.add_row("", Text(", ".join(shown) or "values flagged by the device", style="yellow"))
            return "red"
        table.add_row(Text(name, style="bold"), Text(f"{age:.0f}s ago", style="dim"))
        worst = "green"
        for metric, label, unit in METRICS:
            if metric in view.metrics:
                value = view.metrics[metric]
                priority = self.priority_of(room, name, metric, value)
                style = PRIORITY_STYLE[priority] if priority else "bold"
                worst = _worse(worst, BORDER[priority]) if priority else worst
                table.add_row(f"  {label}", Text(f"{value:g} {unit}", style=style))
        if shown:
            table.add_row("", Text(", ".join(shown), style="yellow"))
        return worst


@dataclass
class Link:
    """The watch's own link to the broker. The wall is drawn only while it is up."""

    broker: str  # host:port
    state: str = "connecting"  # connecting (first attempt), up, lost
    since: float = field(default_factory=time.time)  # when the current state began (wall clock)
    error: str = ""
    attempts: int = 0  # failed attempts since the link was last up
    retry_at: float | None = None

    def up(self) -> None:
        self.state, self.since, self.error, self.attempts, self.retry_at = "up", time.time(), "", 0, None

    def down(self, error: str, retry_in: float) -> None:
        if self.state != "lost":  # keep the time it was lost, not the time of the latest failed retry
            self.state, self.since = "lost", time.time()
        self.error, self.attempts, self.retry_at = error, self.attempts + 1, time.time() + retry_in


def connection_banner(link: Link, now: float, height: int) -> Panel:
    """Full screen, so the last frame of the wall cannot be mistaken for live data."""
    if link.state == "connecting":
        body = Text(f"connecting to the MQTT broker at {link.broker} ...", style="bold")
        return Panel(Align.center(body, vertical="middle"), height=max(height, 3), title="watch")
    since = datetime.fromtimestamp(link.since).strftime("%H:%M:%S")
    retry = max(0.0, (link.retry_at or now) - now)
    body = Text(justify="center")
    body.append("CONNECTION LOST — data not live\n\n", style="bold")
    body.append(f"MQTT broker {link.broker} unreachable since {since} ({now - link.since:.0f} s)\n")
    body.append(f"reconnecting in {retry:.0f} s (failed attempts so far: {link.attempts})\n")
    if link.error:
        body.append(f"last error: {link.error}")
    return Panel(
        Align.center(body, vertical="middle"),
        height=max(height, 8),
        style="bold white on red",
        border_style="bold white on red",
        title="CONNECTION LOST",
    )


async def _follow(
    mqtt: MqttSection, topics: list[str], identifier: str, wall: Wall, link: Link, backoff: Backoff
) -> None:
    """Subscribe, feed the wall, and on any loss of the broker retry with backoff, forever."""
    from gateway.sinks.mqtt import BrokerError, subscribe

    while True:
        try:
            async with subscribe(mqtt, topics, identifier) as messages:
                wall.forget()  # what is true now is re-sent as retained messages
                link.up()
                backoff.reset()
                async for topic, payload in messages:
                    wall.apply(topic, payload)
            error = "the broker closed the connection"
        except BrokerError as exc:
            error = str(exc) or type(exc).__name__
        delay = backoff.next()
        link.down(error, delay)
        await asyncio.sleep(delay)


async def run_watch(
    mqtt: MqttSection,
    site: str,
    once: float | None,
    console: Console,
    *,
    profile: AlarmProfile | None = None,
    on_frame: Callable[[RenderableType], None] | None = None,
    backoff: Backoff | None = None,
) -> Wall:
    """`once`: collect for that many seconds, print the wall, return (BrokerError when the broker is unreachable).
    Otherwise draw the wall live until cancelled, riding out broker outages; every frame also goes to `on_frame`."""
    from gateway.sinks.mqtt import subscribe

    wall = Wall(profile or EXAMPLE_KETAMINE_PROFILE)
    topics = [f"{mqtt.topic_prefix}/{site}/#"]
    identifier = f"infusion-watch-{int(time.time() * 1000) % 10**9}"
    if once is not None:

        async def consume() -> None:
            async with subscribe(mqtt, topics, identifier) as messages:
                async for topic, payload in messages:
                    wall.apply(topic, payload)

        task = asyncio.create_task(consume())
        try:
            done, _ = await asyncio.wait({task}, timeout=once)
            if done:
                task.result()  # the broker was unreachable or went away: say so rather than print a partial wall
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        console.print(wall.render(time.time()))
        return wall

    link = Link(f"{mqtt.host}:{mqtt.port}")
    follow = asyncio.create_task(_follow(mqtt, topics, identifier, wall, link, backoff or Backoff(0.5, 10.0)))

    def frame() -> RenderableType:
        now = time.time()
        if link.state != "up":
            return connection_banner(link, now, console.size.height - 1)
        return wall.render(now)

    try:
        with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
            while not follow.done():
                current = frame()
                live.update(current)
                if on_frame is not None:
                    on_frame(current)
                await asyncio.sleep(REFRESH_S)
            follow.result()  # _follow only ends on a bug: let it be seen
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
    return wall


def _settings(args: argparse.Namespace) -> tuple[MqttSection, str, AlarmProfile]:
    if args.config is not None:
        cfg = load_config(args.config)
        mqtt, site, profile = cfg.mqtt, cfg.gateway.site, cfg.alarms.build()
    else:
        mqtt, site, profile = MqttSection(), "+", EXAMPLE_KETAMINE_PROFILE
    updates: dict[str, Any] = {}
    if args.host:
        updates["host"] = args.host
    if args.port:
        updates["port"] = args.port
    if args.prefix:
        updates["topic_prefix"] = args.prefix
    # A person's tool logs in with its own broker account (a reader or the nurse station), never the gateway's:
    # with the shipped ACL the broker gives each account one client id, so the gateway's would kick the gateway off.
    if getattr(args, "username", None):
        updates["username"] = args.username
        updates["password"] = None
    if getattr(args, "password_env", None):
        updates["password"] = SecretRef(env=args.password_env)
    elif getattr(args, "password_file", None):
        updates["password"] = SecretRef(file=args.password_file)
    return mqtt.model_copy(update=updates), args.site or site, profile


def mqtt_from_args(args: argparse.Namespace) -> tuple[MqttSection, str]:
    mqtt, site, _ = _settings(args)
    return mqtt, site


def watch_main(args: argparse.Namespace) -> int:
    from gateway.sinks.mqtt import BrokerError

    try:
        mqtt, site, profile = _settings(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        asyncio.run(run_watch(mqtt, site, args.once, Console(), profile=profile))
    except KeyboardInterrupt:
        pass
    except BrokerError as exc:
        print(
            f"watch: cannot reach the MQTT broker at {mqtt.host}:{mqtt.port}: {exc} "
            "(is it running? give its address with --host/--port or --config)",
            file=sys.stderr,
        )
        return 1
    return 0
