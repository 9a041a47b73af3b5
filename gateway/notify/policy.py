"""Alarm notifications, decided: which alarm records reach which targets, when an unacknowledged alarm escalates,
how a storm becomes one summary, and what a message says. Pure: it knows time only through `now` and sends nothing
(gateway/notify/worker.py feeds it the outbox's records and sends what it says through gateway/sinks/notify.py), so
tests drive it through hours of escalations in microseconds.

What it does (docs/notifications.md):
- **Alarm records only**: raised, escalated, acknowledged, cleared and suspended (ended by standby), technical
  alarms included; readings, statuses and the rest never. A transition goes to the targets of every route that
  matches its priority, kind and room; acknowledged and the endings go to everyone told of the alarm so far.
- **Escalation chain**: an alarm not acknowledged `escalate_after_s` after it was raised (or escalated) goes to the
  chain's next target, then every `repeat_every_s` the next, and once the chain is through, a reminder to everyone
  told, until it is acknowledged or ends. A silence pauses the chain for the longest a silence may last. An
  acknowledgement or an ending cancels the steps still waiting to be sent.
- **Standby rooms are quiet**: nothing new about a room in standby is sent and its chains stop; the `suspended`
  endings still reach whoever was told, so nobody is left with an open alarm.
- **Rate limit per target**: at most `max_messages` per `per_s`; what is over it waits and goes out as one summary.
- **Stale marking**: a message sent more than `stale_after_s` after what it tells says how late it is.

Durable: the whole state (what waits for each target, who was told of each alarm, when its next escalation step is
due, rate windows, rooms in standby, the last record seen per key) is a snapshot committed in the outbox's state
table before the notify cursor moves past the records that changed it. Escalation timers are part of that state, as
absolute times: a restart neither restarts nor skips a chain, and a step that fell due while the gateway was down
goes out once, at start.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Literal

from devices.base import METRICS
from gateway.alarms import Priority, Transition
from gateway.config import NotifyRoute, NotifySection
from gateway.envelope import AlarmMessage, Record, RoomModeMessage

NOTIFIED = frozenset({"raised", "escalated", "acknowledged", "cleared", "suspended"})
ENDINGS = frozenset({"cleared", "suspended"})
RANK = {"low": 0, "medium": 1, "high": 2}
SUMMARY_LINES = 25  # a summary names this many messages, then counts the rest
RETRY_BASE_S = 1.0
Severity = Literal["info", "success", "warning", "failure"]


def epoch(text: str) -> float:
    """Seconds since the epoch of a record's `iso_utc` time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class AlarmFacts:
    """The fields of an alarm record a message is made of (rooms, devices, rules and values; records carry no
    patient data): what the notifier keeps of an alarm in its durable state (its snapshot holds them as a dict)."""

    id: str
    site: str
    room: str
    device: str
    alarm_id: str
    rule: str
    alarm_kind: Literal["physiological", "technical"]
    priority: Priority
    transition: Transition
    metric: str | None
    value: float | None
    limit: float | None
    message: str
    role: str | None
    since: str | None
    time: str
    quality: list[str]
    indeterminate: bool
    example_profile: bool

    @classmethod
    def of(cls, r: AlarmMessage) -> AlarmFacts:
        """The facts of an alarm record: its fields of these names (every one is a field of AlarmMessage)."""
        return cls(**{name: getattr(r, name) for name in _FACTS})


_FACTS = tuple(f.name for f in fields(AlarmFacts))


@dataclass
class Pending:
    """One message waiting for its target."""

    ref: str  # unique and stable: sent again after a crash, it carries the same ref, so duplicates can be told
    target: str
    alarm: AlarmFacts
    event_time: float  # when what it tells happened (an escalation step: when it fell due)
    source: int  # the outbox id of the alarm record it comes from (named on the rejected pile)
    step: int = 0  # 0: the alarm's own transition; n: escalation step n (past the chain: a reminder)
    held: bool = False  # over the target's rate limit: goes out in the next summary


@dataclass
class Tracked:
    """An alarm that is active as far as notifications go."""

    alarm: AlarmFacts  # of its latest record
    source: int
    told: list[str] = field(default_factory=list)  # targets a message about it was queued for
    step: int = 0  # escalation steps taken since the chain (re)started
    next_due: float | None = None  # when the next step is due (None: no chain, or stopped)
    paused_until: float | None = None  # silenced: no step before then


@dataclass
class TargetState:
    sent: list[float] = field(default_factory=list)  # send times within the rate window
    failures: int = 0  # consecutive failed attempts
    retry_at: float = 0.0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What to send now: one message, or a summary of several (`covers` the refs it delivers)."""

    ref: str
    target: str
    covers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Text:
    title: str
    body: str
    severity: Severity


@dataclass
class Plan:
    send: list[Outgoing] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)  # undelivered for give_up_after_s: the rejected pile
    reason: str = ""  # why they expired


class Notifier:
    def __init__(self, cfg: NotifySection, silence_s: float = 120.0, rng: random.Random | None = None) -> None:
        """`silence_s`: how long a silence pauses a chain. An alarm record does not say how long its silence is, so
        the longest a silence may last ([commands] silence_max_s)."""
        self.cfg = cfg
        self.silence_s = silence_s
        self._rng = rng or random.Random()
        self.queue: list[Pending] = []
        self.alarms: dict[str, Tracked] = {}
        self.targets: dict[str, TargetState] = {name: TargetState() for name in cfg.targets}
        self.standby: set[str] = set()
        self._seen: dict[str, int] = {}  # record key (room/device) -> the highest seq taken in

    # -- records in ------------------------------------------------------------------------------------------

    def on_record(self, source: int, record: Record, now: float) -> bool:
        """Take one outbox record (`source`: its outbox id). True when the state changed (save it)."""
        if isinstance(record, RoomModeMessage):
            return self._room_mode(record)
        if not isinstance(record, AlarmMessage):
            return False
        key = f"{record.room}/{record.device}"
        if record.seq <= self._seen.get(key, 0):
            return False  # taken in before a crash that came before the cursor was saved
        self._seen[key] = record.seq
        alarm = AlarmFacts.of(record)
        alarm_id, transition = alarm.alarm_id, alarm.transition
        at = epoch(alarm.time)
        tracked = self.alarms.get(alarm_id)
        quiet = alarm.room in self.standby
        if transition == "raised" or (transition == "escalated" and tracked is None):
            tracked = self.alarms[alarm_id] = Tracked(alarm, source)
            if not quiet:
                self._tell(tracked, self._route_targets(alarm), alarm, source, at)
                self._start_chain(tracked, at)
        elif tracked is None:
            return True  # an alarm raised before notifications began: nobody was told of it
        elif transition == "escalated":
            tracked.alarm, tracked.source = alarm, source
            if not quiet:
                self._tell(tracked, [*self._route_targets(alarm), *tracked.told], alarm, source, at)
                self._start_chain(tracked, at)  # routed by its new priority, from now
        elif transition == "acknowledged":
            tracked.alarm = alarm
            tracked.next_due = None
            self._cancel_steps(alarm_id)
            self._tell(tracked, tracked.told, alarm, source, at)
        elif transition == "silenced":
            tracked.paused_until = at + self.silence_s
            if tracked.next_due is not None:
                tracked.next_due = max(tracked.next_due, tracked.paused_until)
        elif transition in ENDINGS:
            del self.alarms[alarm_id]
            self._cancel_steps(alarm_id)
            self._tell(tracked, tracked.told, alarm, source, at)
        else:  # indeterminate, resumed: the alarm stays, unacknowledged; its chain goes on
            tracked.alarm = replace(tracked.alarm, indeterminate=alarm.indeterminate)
        return True

    def _room_mode(self, record: RoomModeMessage) -> bool:
        room = record.room
        if record.mode == "standby":
            self.standby.add(room)
            for alarm_id, tracked in self.alarms.items():
                if tracked.alarm.room == room:
                    tracked.next_due = None
                    self._cancel_steps(alarm_id)
        else:
            self.standby.discard(room)
        return True

    def _matches(self, route: NotifyRoute, alarm: AlarmFacts) -> bool:
        return (
            alarm.priority in route.priorities
            and alarm.alarm_kind in route.kinds
            and (not route.rooms or alarm.room in route.rooms)
        )

    def _route_targets(self, alarm: AlarmFacts) -> list[str]:
        return [t for route in self.cfg.routes if self._matches(route, alarm) for t in route.targets]

    def _chain(self, alarm: AlarmFacts) -> NotifyRoute | None:
        """The escalation chain of an alarm: the first matching route that has one."""
        return next((r for r in self.cfg.routes if r.escalate_to and self._matches(r, alarm)), None)

    def _start_chain(self, tracked: Tracked, at: float) -> None:
        route = self._chain(tracked.alarm)
        tracked.step = 0
        tracked.next_due = None if route is None or route.escalate_after_s is None else at + route.escalate_after_s
        if tracked.next_due is not None and tracked.paused_until is not None:
            tracked.next_due = max(tracked.next_due, tracked.paused_until)

    def _tell(self, tracked: Tracked, targets: Iterable[str], alarm: AlarmFacts, source: int, at: float) -> None:
        if alarm.transition not in NOTIFIED:
            return
        for target in dict.fromkeys(targets):  # each once, in route order
            self.queue.append(Pending(f"{alarm.id}>{target}", target, alarm, at, source))
            if target not in tracked.told:
                tracked.told.append(target)

    def _cancel_steps(self, alarm_id: str) -> None:
        """Escalation steps of this alarm not yet sent are dropped: it is acknowledged, ended or in standby."""
        self.queue = [p for p in self.queue if not (p.step and p.alarm.alarm_id == alarm_id)]

    # -- time ------------------------------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Queue the escalation steps due by `now`. True when one was."""
        changed = False
        for alarm_id, tracked in self.alarms.items():
            if tracked.next_due is None or now < tracked.next_due:
                continue
            route = self._chain(tracked.alarm)
            if route is None or tracked.alarm.room in self.standby:
                tracked.next_due = None
                continue
            chain = route.escalate_to
            tracked.step += 1
            step = tracked.step
            targets = [chain[step - 1]] if step <= len(chain) else list(tracked.told)
            since = tracked.alarm.since or tracked.alarm.time
            for target in dict.fromkeys(targets):
                ref = f"{alarm_id}@{since}/step{step}>{target}"
                self.queue.append(Pending(ref, target, tracked.alarm, now, tracked.source, step))
                if target not in tracked.told:
                    tracked.told.append(target)
            spacing = route.repeat_every_s if route.repeat_every_s is not None else route.escalate_after_s
            more = step < len(chain) or route.repeat_every_s is not None
            tracked.next_due = now + spacing if more and spacing is not None else None
            changed = True
        return changed

    def next_step_at(self) -> float | None:
        """When the next escalation step falls due (None: no chain running)."""
        return min((t.next_due for t in self.alarms.values() if t.next_due is not None), default=None)

    # -- sending ---------------------------------------------------------------------------------------------

    def due(self, target: str, now: float) -> Plan:
        """What to send to `target` now, oldest first, within its rate limit; and what waited too long."""
        plan = Plan()
        state = self.targets[target]
        limit = self.cfg.give_up_after_s
        expired = [p for p in self.queue if p.target == target and now - p.event_time > limit]
        if expired:
            gone = {id(p) for p in expired}
            self.queue = [p for p in self.queue if id(p) not in gone]
            plan.expired = expired
            why = state.last_error or "not sent"
            plan.reason = f"undelivered to {target} for over {_duration(limit)}: {why}"
        if now < state.retry_at:
            return plan
        spec = self.cfg.targets[target]
        state.sent = [t for t in state.sent if t > now - spec.per_s]
        room = spec.max_messages - len(state.sent)
        waiting = [p for p in self.queue if p.target == target]
        if not waiting:
            return plan
        if room <= 0:
            for p in waiting:
                p.held = True
            return plan
        if any(p.held for p in waiting):  # a storm: everything that waits goes out as one summary
            refs = tuple(p.ref for p in waiting)
            ref = refs[0] if len(refs) == 1 else f"summary>{target}>{refs[0]}"
            plan.send.append(Outgoing(ref, target, refs))
            return plan
        for p in waiting[room:]:
            p.held = True
        plan.send = [Outgoing(p.ref, target, (p.ref,)) for p in waiting[:room]]
        return plan

    def wake_at(self, target: str, now: float) -> float | None:
        """The earliest time `due(target)` may have something to send without new records: the end of a retry wait
        or of the rate window. None: nothing waits for it."""
        if not any(p.target == target for p in self.queue):
            return None
        state = self.targets[target]
        spec = self.cfg.targets[target]
        recent = [t for t in state.sent if t > now - spec.per_s]
        window = recent[len(recent) - spec.max_messages] + spec.per_s if len(recent) >= spec.max_messages else now
        return max(state.retry_at, window, now)

    def sent(self, out: Outgoing, now: float) -> None:
        covered = set(out.covers)
        self.queue = [p for p in self.queue if not (p.target == out.target and p.ref in covered)]
        state = self.targets[out.target]
        state.sent.append(now)
        state.failures, state.retry_at, state.last_error = 0, 0.0, ""

    def failed(self, target: str, reason: str, now: float) -> float:
        """The target did not take it: wait (jittered, doubling up to retry_max_s) and try again. Returns the wait."""
        state = self.targets[target]
        state.failures += 1
        high = min(self.cfg.retry_max_s, RETRY_BASE_S * 2 ** (state.failures - 1))
        wait = self._rng.uniform(high / 2, high)
        state.retry_at, state.last_error = now + wait, reason
        return wait

    def refused(self, out: Outgoing) -> list[Pending]:
        """The target refused it for good: the messages it covers leave the queue, for the rejected pile."""
        covered = set(out.covers)
        gone = [p for p in self.queue if p.target == out.target and p.ref in covered]
        self.queue = [p for p in self.queue if not (p.target == out.target and p.ref in covered)]
        return gone

    # -- text ------------------------------------------------------------------------------------------------

    def render(self, out: Outgoing, now: float) -> Text | None:
        """The text of `out`; None when everything it covers was cancelled meanwhile (acknowledged, ended)."""
        covered = set(out.covers)
        items = [p for p in self.queue if p.target == out.target and p.ref in covered]
        if not items:
            return None
        if len(items) == 1:
            return self._single(items[0], now)
        return self._summary(out, items, now)

    def _what(self, p: Pending) -> str:
        a = p.alarm
        if p.step:
            route = self._chain(a)
            chain = len(route.escalate_to) if route is not None else 0
            waited = _duration(p.event_time - epoch(a.since or a.time))
            word = f"ESCALATION {p.step}" if p.step <= chain else "REMINDER"
            return f"{word}: not acknowledged for {waited}"
        transition = a.transition
        if transition == "raised":
            return "ALARM"
        if transition == "escalated":
            return f"ALARM ESCALATED to {a.priority.upper()}"
        if transition == "acknowledged":
            return f"acknowledged by {a.role}" if a.role else "acknowledged"
        if transition == "suspended":
            return "ended: the room was put in standby (nobody monitored there)"
        return "cleared"

    def _single(self, p: Pending, now: float) -> Text:
        a = p.alarm
        what = self._what(p)
        active = p.step > 0 or a.transition in ("raised", "escalated")
        where = f"gateway {a.device}" if a.room == "_gateway" else f"room {a.room} {a.device}"
        title = f"[{a.site}] {a.priority.upper()} {where}: {a.message or a.rule} - {what}"
        lines: list[str] = []
        age = now - p.event_time
        if age > self.cfg.stale_after_s:
            title = f"LATE {_duration(age)}: {title}"
            lines.append(
                f"LATE: this is about {_clock(p.event_time, now)}, {_duration(age)} ago (delivered late: the target "
                "was unreachable or over its rate limit). The wall shows the present."
            )
        lines.append(f"{what}: {a.message or a.rule} (rule {a.rule}, {a.alarm_kind})")
        lines.append(f"Where: {where} (site {a.site})")
        value = _value_line(a)
        if value:
            lines.append(value)
        if a.quality:
            lines.append(f"Signal quality: {', '.join(a.quality)}")
        if a.indeterminate:
            lines.append("The device's data is not current: the condition cannot be judged now")
        lines.append(f"Priority: {a.priority.upper()}")
        since = a.since or a.time
        lines.append(f"Since: {_clock(epoch(since), now)} ({_duration(now - epoch(since))} ago)")
        if active:
            lines.append(_ack_hint(a))
        if a.example_profile:
            lines.append("Alarm profile: the shipped EXAMPLE, not clinical advice")
        lines.append(f"Ref: {p.ref}")
        return Text(title, "\n".join(lines), _severity(a, active))

    def _summary(self, out: Outgoing, items: list[Pending], now: float) -> Text:
        spec = self.cfg.targets[out.target]
        top = max(items, key=lambda p: RANK.get(p.alarm.priority, 0))
        site = top.alarm.site
        title = f"[{site}] {len(items)} alarm notifications in one (at most {spec.max_messages} per {spec.per_s:g} s)"
        lines: list[str] = []
        oldest = min(p.event_time for p in items)
        if now - oldest > self.cfg.stale_after_s:
            title = f"LATE {_duration(now - oldest)}: {title}"
            lines.append(f"LATE: the oldest is from {_clock(oldest, now)}, {_duration(now - oldest)} ago")
        ordered = sorted(items, key=lambda p: (-RANK.get(p.alarm.priority, 0), p.event_time))
        for p in ordered[:SUMMARY_LINES]:
            a = p.alarm
            where = f"gateway {a.device}" if a.room == "_gateway" else f"room {a.room} {a.device}"
            value = _value_line(a)
            detail = f" ({value})" if value else ""
            lines.append(
                f"- {a.priority.upper()} {where}: {a.message or a.rule} - {self._what(p)} at "
                f"{_clock(p.event_time, now)}{detail}"
            )
        if len(ordered) > SUMMARY_LINES:
            lines.append(f"... and {len(ordered) - SUMMARY_LINES} more: every alarm is on the wall and in InfluxDB")
        lines.append("Acknowledge at the nurse station, or: infusion-telemetry ack --room ROOM --alarm ALARM_ID")
        lines.append(f"Ref: {out.ref} ({len(items)} messages: {', '.join(p.ref for p in ordered[:SUMMARY_LINES])})")
        return Text(title, "\n".join(lines), _severity(top.alarm, True))

    # -- durability ------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "v": 1,
            "queue": [asdict(p) for p in self.queue],
            "alarms": {alarm_id: asdict(t) for alarm_id, t in self.alarms.items()},
            "targets": {name: asdict(s) for name, s in self.targets.items()},
            "standby": sorted(self.standby),
            "seen": dict(self._seen),
        }

    def restore(self, snapshot: dict[str, Any], now: float) -> list[str]:
        """Take back a snapshot at start-up; returns what could not be kept (targets no longer configured), for
        the log. Chains are routed by today's config: a chain that is no longer configured stops."""
        if snapshot.get("v") != 1:
            raise ValueError(f"unknown notify state version {snapshot.get('v')!r}")
        dropped: list[str] = []
        queue = [Pending(**{**p, "alarm": AlarmFacts(**p["alarm"])}) for p in snapshot.get("queue", [])]
        gone = sorted({p.target for p in queue} - set(self.cfg.targets))
        if gone:
            dropped.append(f"messages for targets no longer configured ({', '.join(gone)}) dropped")
        self.queue = [p for p in queue if p.target in self.cfg.targets]
        self.alarms = {
            alarm_id: Tracked(**{**t, "alarm": AlarmFacts(**t["alarm"])})
            for alarm_id, t in snapshot.get("alarms", {}).items()
        }
        for tracked in self.alarms.values():
            tracked.told = [t for t in tracked.told if t in self.cfg.targets]
            if tracked.next_due is not None and self._chain(tracked.alarm) is None:
                tracked.next_due = None
        for name, state in snapshot.get("targets", {}).items():
            if name in self.targets:
                self.targets[name] = TargetState(**state)
        self.standby = set(snapshot.get("standby", []))
        self._seen = {str(k): int(v) for k, v in snapshot.get("seen", {}).items()}
        return dropped


# -- text helpers ------------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86_400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86_400} d {s % 86_400 // 3600} h"


def _clock(t: float, now: float) -> str:
    """Local time of the gateway (the clinic's), with the date when it is not today's."""
    local, today = time.localtime(t), time.localtime(now)
    if local[:3] == today[:3]:
        return time.strftime("%H:%M:%S %Z", local)
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", local)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _value_line(a: AlarmFacts) -> str:
    """The value that caused it and the limit, with the metric's unit."""
    if a.value is None:
        return ""
    metric = a.metric
    spec = METRICS.get(metric) if isinstance(metric, str) else None
    unit = f" {spec.unit}" if spec is not None and spec.unit else ""
    line = f"Value: {metric + ' ' if metric else ''}{_number(a.value)}{unit}"
    if a.limit is not None:
        line += f", limit {_number(a.limit)}{unit}"
    return line


def _ack_hint(a: AlarmFacts) -> str:
    return (
        f"Acknowledge at the nurse station, or: infusion-telemetry ack --room {a.room} --alarm {a.alarm_id} "
        "--role nurse"
    )


def _severity(a: AlarmFacts, active: bool) -> Severity:
    if not active:
        return "success" if a.transition in ENDINGS else "info"
    if a.priority == "high":
        return "failure"
    return "warning" if a.priority == "medium" else "info"
