"""The alarm engine: readings and statuses in, alarm transitions out. Pure: it knows time only through `now`.

Follows IEC 60601-1-8 ideas; the bedside device stays the primary alarm. Rules are a site's policy (see
EXAMPLE_KETAMINE_PROFILE: an example, not advice). docs/alarms.md says why each policy below is what it is.

- Unreliable signal is an alarm, never a silence: the profile's `quality` policy says which device flags make values
  unusable (probe off, no sensor, sensor fault, searching by default); values with any other flag (low perfusion,
  artifact...) are still evaluated, and the alarm carries the flags. Unusable values for longer than a delay raise
  the `signal_quality` technical alarm.
- Conditions only on fresh data: a continuous metric (SpO2, pulse, PI) counts only while the device's last usable
  reading is newer than its staleness limit. A silent device raises `no_data`; its physiological alarms become
  "indeterminate" (shown as such), and are never raised, cleared or escalated from an old value.
- A condition must hold for `delay_s` before it is raised and stay clear (past the hysteresis band) for
  `clear_delay_s` before it is cleared, so one odd value neither raises nor ends an alarm.
- One alarm per condition: a stricter rule declared `tier_of` another raises the priority of that alarm
  (`escalated`) instead of raising a second one; so does `escalate_after_s` without acknowledgement.
- Technical alarms: no data from a device, a lost port, sensor problems, signal quality, cuff errors, an overdue
  NIBP measurement, the outbox filling up, the gateway cut off from its broker, the gateway's clock off.
- Standby: a room explicitly marked empty has its physiological and device alarms suspended, until it expires, is
  ended, or a session starts.
- Lifecycle: raised -> (escalated) -> (acknowledged) -> cleared; latching alarms stay until acknowledged even when
  the condition is gone. The whole state (`snapshot`/`restore`) survives restarts through the outbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from devices.base import QUALITY_FLAGS, DeviceState
from gateway.alarms.events import ENDING, AlarmEvent, EngineEvent, RoomModeEvent, SessionEvent, Transition
from gateway.alarms.profile import (
    BP_METRICS,
    CONTINUOUS_METRICS,
    PRIORITIES,
    SENSOR_STATES,
    UNREACHABLE_STATES,
    AlarmProfile,
    Priority,
    TechnicalRule,
    ThresholdRule,
)


@dataclass
class _Alarm:
    alarm_id: str
    room: str
    device: str
    rule: str
    kind: Literal["physiological", "technical"]
    priority: Priority
    delay_s: float
    clear_delay_s: float
    latching: bool
    escalate_after_s: float | None
    message: str
    metric: str | None = None
    limit: float | None = None
    pending_since: float | None = None  # condition seen, delay running
    clear_since: float | None = None  # condition gone, clear delay running
    raised_at: float | None = None
    acknowledged: bool = False
    escalated: bool = False
    condition: bool = False
    value: float | None = None
    silenced_until: float | None = None
    silences: int = 0
    indeterminate: bool = False
    quality: tuple[str, ...] = ()
    tier_of: str | None = None  # a tier's own tracker: never shown, it raises the priority of this alarm id

    @property
    def active(self) -> bool:
        return self.raised_at is not None

    @property
    def shown(self) -> bool:
        return self.raised_at is not None and self.tier_of is None


@dataclass
class _Session:
    session_id: str
    started: float
    baseline: dict[str, float] = field(default_factory=dict)


DEFAULT_STALE_AFTER_S = 5.0


class AlarmEngine:
    def __init__(
        self,
        profile: AlarmProfile,
        nibp_schedules: dict[str, float] | None = None,
        stale_after: dict[str, float] | None = None,
    ) -> None:
        """`nibp_schedules`: room/device -> measure_every_s of each scheduled cuff (for the overdue alarm).
        `stale_after`: room/device -> the model's staleness limit (how long a continuous value stays current)."""
        self.profile = profile
        self.tech = profile.technical
        self._unusable = frozenset(profile.quality.unusable)
        self._rules = {r.id: r for r in profile.rules}
        self._alarms: dict[str, _Alarm] = {}
        # The same alarms by room/device: what a reading or status of one device touches, without a scan of all.
        self._by_device: dict[str, dict[str, _Alarm]] = {}
        self._applicable: dict[str, tuple[ThresholdRule, ...]] = {}  # room/device -> the rules that apply to it
        self._sessions: dict[str, _Session] = {}
        self._nibp_every = dict(nibp_schedules or {})
        self._nibp_last: dict[str, float] = {}
        self._stale_after = dict(stale_after or {})
        self._fresh_until: dict[str, float] = {}  # room/device -> its continuous values are current until then
        self._states: dict[str, tuple[DeviceState, int | None]] = {}  # room/device -> latest status
        self._standby: dict[str, float | None] = {}  # room -> standby until (None: until ended)

    # -- inputs --------------------------------------------------------------------------------------------------

    def on_reading(
        self, room: str, device: str, metrics: Mapping[str, float], flags: Sequence[str], now: float
    ) -> list[EngineEvent]:
        out: list[EngineEvent] = []
        key = f"{room}/{device}"
        is_bp = BP_METRICS[0] in metrics or BP_METRICS[1] in metrics or BP_METRICS[2] in metrics
        if is_bp:
            self._nibp_last[key] = now
        if room in self._standby:
            return out  # nobody is monitored here: the reading is stored, nothing is judged
        # A device without a single alarm (the usual case) has no technical alarm to clear: those calls are skipped.
        if self._by_device.get(key):
            out += self._technical(room, device, "no_data", False, now)
            out += self._technical(room, device, "device_disconnected", False, now)
            if is_bp:
                out += self._technical(room, device, "nibp_overdue", False, now)
                out += self._technical(room, device, "cuff_error", False, now)
        unusable = sorted(self._unusable.intersection(flags)) if flags else None
        if unusable:
            # The sensor alarm already names a sensor state the device reported; this one covers flagged values.
            state = self._states.get(key, (DeviceState.OK, None))[0]
            message = f"signal unusable: {', '.join(unusable)}"
            cond = state not in SENSOR_STATES
            out += self._technical(room, device, "signal_quality", cond, now, message=message)
            return out  # unusable values are never judged; the device goes indeterminate when they stay so
        if self._by_device.get(key):
            out += self._technical(room, device, "signal_quality", False, now)
            out += self._technical(room, device, "sensor", False, now)
        if is_bp:
            out += self._maybe_baseline(room, metrics, now)
        if not CONTINUOUS_METRICS.isdisjoint(metrics):
            self._fresh_until[key] = now + self._stale_after.get(key, DEFAULT_STALE_AFTER_S)
            out += self._resume(key, now)
        quality = tuple(f for f in flags if f in QUALITY_FLAGS) if flags else ()
        rules = self._applicable.get(key)
        if rules is None:
            rules = self._applicable[key] = tuple(r for r in self.profile.rules if r.applies(room, device))
        for rule in rules:
            if rule.metric not in metrics:
                continue
            value = metrics[rule.metric]
            limit, violated, clear = self._judge(rule, room, value)
            if limit is None:
                continue  # a baseline rule before the session has a baseline
            if not violated and f"{key}/{rule.id}" not in self._alarms:
                continue  # nothing raised or pending: nothing to hold or clear
            alarm = self._alarm(room, device, rule.id, "physiological", rule, limit)
            alarm.value = value
            alarm.quality = quality
            out += self._update(alarm, violated, clear, now)
        return out

    def on_status(self, room: str, device: str, state: DeviceState, code: int | None, now: float) -> list[AlarmEvent]:
        key = f"{room}/{device}"
        self._states[key] = (state, code)
        if state in UNREACHABLE_STATES or state in SENSOR_STATES:
            self._fresh_until[key] = min(self._fresh_until.get(key, now), now)  # values stop being current now
        if room in self._standby:
            return []
        out: list[AlarmEvent] = []
        out += self._technical(room, device, "no_data", state == DeviceState.NO_DATA, now)
        out += self._technical(room, device, "device_disconnected", state == DeviceState.DISCONNECTED, now)
        if state in UNREACHABLE_STATES:
            # Nothing is known of the sensor now; no_data / device_disconnected say what is wrong. The device's own
            # state comes back with its data (the session re-reports it), and its alarms with it.
            out += self._technical(room, device, "sensor", False, now)
            out += self._technical(room, device, "signal_quality", False, now)
        elif state != DeviceState.CONNECTED:
            out += self._technical(room, device, "sensor", state in SENSOR_STATES, now, message=f"sensor: {state}")
        if state in SENSOR_STATES:
            out += self._technical(room, device, "signal_quality", False, now)  # the sensor alarm says it
        if state == DeviceState.CUFF_ERROR:
            out += self._technical(room, device, "cuff_error", True, now, value=code, message=f"cuff error {code}")
        for alarm in list(self._by_device.get(key, {}).values()):  # judged at once, not at the next tick
            if alarm.kind == "physiological" and alarm.alarm_id in self._alarms:
                out += self._advance(alarm, now)
        return out

    def on_gateway(self, gateway: str, broker_connected: bool, outbox_fill: float, now: float) -> list[AlarmEvent]:
        out = self._technical("_gateway", gateway, "broker_lost", not broker_connected, now)
        full = outbox_fill >= self.tech.outbox_fill_fraction
        out += self._technical("_gateway", gateway, "outbox_filling", full, now, value=round(outbox_fill, 3))
        return out

    def on_storage(self, gateway: str, problem: str | None, unsaved: int, now: float) -> list[AlarmEvent]:
        """The outbox cannot be written (disk full, I/O error): records wait in memory, nothing new is durable."""
        message = f"storage: {problem}" if problem else ""
        return self._technical("_gateway", gateway, "storage", problem is not None, now, value=unsaved, message=message)

    def on_clock(self, gateway: str, skew_s: float, uncertainty_s: float, server: str, now: float) -> list[AlarmEvent]:
        """The gateway's clock against a server's (positive: the gateway is ahead). Only a skew beyond the limit
        by more than the measurement's uncertainty counts."""
        off = abs(skew_s) - uncertainty_s > self.tech.clock_skew_limit_s
        message = f"gateway clock {skew_s:+.1f} s against {server}"
        return self._technical("_gateway", gateway, "clock_skew", off, now, value=round(skew_s, 2), message=message)

    def tick(self, now: float) -> list[EngineEvent]:
        """Delays, clear delays, escalation, staleness and standby expiry that are due by `now`; overdue NIBP."""
        out: list[EngineEvent] = []
        for room, until in list(self._standby.items()):
            if until is not None and now >= until:
                out += self._end_standby(room, None, now, "standby expired")
        for key, every in self._nibp_every.items():
            room, device = key.split("/", 1)
            last = self._nibp_last.setdefault(key, now)
            if room not in self._standby:
                out += self._technical(room, device, "nibp_overdue", now - last > every * 1.5 + 60, now)
        for alarm in list(self._alarms.values()):
            if not alarm.active and not alarm.condition:
                continue  # neither raised nor pending: time changes nothing
            if alarm.alarm_id in self._alarms:  # a tier's raise may have cleared others in this pass
                out += self._advance(alarm, now)
        return out

    # -- operator actions -----------------------------------------------------------------------------------------

    def acknowledge(self, room: str, alarm_id: str, role: str | None, now: float) -> list[AlarmEvent]:
        alarm = self._find(room, alarm_id)
        if alarm.acknowledged:
            raise ValueError("the alarm is already acknowledged")
        alarm.acknowledged = True
        out = [self._event(alarm, "acknowledged", now, role=role)]
        if alarm.latching and not alarm.condition:
            out += self._clear(alarm, now)
        return out

    def silence(
        self, room: str, alarm_id: str, seconds: float, role: str | None, now: float, max_renewals: int | None = None
    ) -> list[AlarmEvent]:
        """Pause announcing (and escalating) an alarm for a while; it stays active and visible. At most
        `max_renewals` silences after the first: an alarm cannot be kept quiet forever."""
        alarm = self._find(room, alarm_id)
        if max_renewals is not None and alarm.silences > max_renewals:
            raise ValueError(f"the alarm was silenced {alarm.silences} times already: acknowledge it instead")
        alarm.silences += 1
        alarm.silenced_until = now + seconds
        return [self._event(alarm, "silenced", now, role=role)]

    def start_session(self, room: str, session_id: str, now: float) -> list[EngineEvent]:
        if room in self._sessions:
            raise ValueError(f"room {room} already has a session running ({self._sessions[room].session_id})")
        out: list[EngineEvent] = []
        if room in self._standby:
            out += self._end_standby(room, None, now, "session started")
        self._sessions[room] = _Session(session_id, now)
        out.append(SessionEvent(room, "started", now, session_id, now))
        return out

    def stop_session(self, room: str, now: float) -> list[SessionEvent]:
        session = self._sessions.pop(room, None)
        if session is None:
            raise ValueError(f"room {room} has no session running")
        return [SessionEvent(room, "stopped", now, session.session_id, session.started, dict(session.baseline))]

    def standby(self, room: str, seconds: float, role: str | None, now: float) -> list[EngineEvent]:
        """Nobody is monitored in this room for `seconds`: its physiological and device alarms are suspended."""
        if room in self._sessions:
            raise ValueError(f"room {room} has a session running: stop it before standby")
        until = now + seconds
        self._standby[room] = until
        out: list[EngineEvent] = [RoomModeEvent(room, "standby", now, until, role)]
        for alarm in list(self._alarms.values()):
            if alarm.room == room:
                if alarm.shown:
                    out.append(self._event(alarm, "suspended", now, role=role))
                self._remove(alarm.alarm_id)
        return out

    def end_standby(self, room: str, role: str | None, now: float) -> list[EngineEvent]:
        if room not in self._standby:
            raise ValueError(f"room {room} is not in standby")
        return self._end_standby(room, role, now, "standby ended")

    def in_standby(self, room: str) -> bool:
        return room in self._standby

    def session(self, room: str) -> _Session | None:
        return self._sessions.get(room)

    def active(self) -> list[AlarmEvent]:
        """Every active alarm as it stands (for retained topics and the wall)."""
        return [self._event(a, "raised", a.raised_at or 0.0) for a in self._alarms.values() if a.shown]

    # -- durability -----------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What must survive a restart: active alarms (acknowledged, silenced, latched), sessions, standby. Pending
        delays are not kept: after a restart a condition is judged afresh on fresh data."""
        return {
            "v": 1,
            # vars(), not asdict(): flat dataclasses, the same JSON, without asdict's deep copy (10x the cost)
            "alarms": [dict(vars(a)) for a in self._alarms.values() if a.active],
            "sessions": {room: {**vars(s), "baseline": dict(s.baseline)} for room, s in self._sessions.items()},
            "standby": dict(self._standby),
            "nibp_last": dict(self._nibp_last),
        }

    def restore(self, snapshot: dict[str, Any], devices: set[str], now: float) -> list[EngineEvent]:
        """Take back a snapshot at start-up. Physiological alarms are indeterminate until the device's first fresh
        data; alarms of devices no longer configured are cleared, saying so."""
        if snapshot.get("v") != 1:
            raise ValueError(f"unknown alarm state version {snapshot.get('v')!r}")
        out: list[EngineEvent] = []
        self._sessions = {room: _Session(**s) for room, s in snapshot.get("sessions", {}).items()}
        self._standby = {room: until for room, until in snapshot.get("standby", {}).items()}
        self._nibp_last = {k: float(v) for k, v in snapshot.get("nibp_last", {}).items()}
        for fields in snapshot.get("alarms", []):
            alarm = _Alarm(**{**fields, "quality": tuple(fields.get("quality", ()))})
            key = f"{alarm.room}/{alarm.device}"
            if alarm.room != "_gateway" and key not in devices:
                if alarm.shown:
                    alarm.message = f"{alarm.message} (device no longer configured)"
                    out.append(self._event(alarm, "cleared", now))
                continue
            self._add(alarm)
            if alarm.kind == "physiological" and alarm.metric in CONTINUOUS_METRICS:
                alarm.pending_since = alarm.clear_since = None
                alarm.condition = False
                if alarm.shown:
                    alarm.indeterminate = True
                    out.append(self._event(alarm, "indeterminate", now))
        return out

    # -- internals -----------------------------------------------------------------------------------------------

    def _end_standby(self, room: str, role: str | None, now: float, reason: str) -> list[EngineEvent]:
        self._standby.pop(room, None)
        out: list[EngineEvent] = [RoomModeEvent(room, "monitoring", now, None, role, reason)]
        for key, (state, code) in self._states.items():
            r, device = key.split("/", 1)
            if r == room:
                out += self.on_status(room, device, state, code, now)  # a silent device is an alarm again
        for key in self._nibp_every:
            if key.split("/", 1)[0] == room:
                self._nibp_last[key] = now  # the schedule starts again from here
        return out

    def _fresh(self, alarm: _Alarm, now: float) -> bool:
        if alarm.metric not in CONTINUOUS_METRICS:
            return True
        return now <= self._fresh_until.get(f"{alarm.room}/{alarm.device}", float("-inf"))

    def _resume(self, key: str, now: float) -> list[AlarmEvent]:
        out: list[AlarmEvent] = []
        for alarm in self._by_device.get(key, {}).values():
            if alarm.indeterminate:
                alarm.indeterminate = False
                out.append(self._event(alarm, "resumed", now))
        return out

    def _add(self, alarm: _Alarm) -> None:
        self._alarms[alarm.alarm_id] = alarm
        self._by_device.setdefault(f"{alarm.room}/{alarm.device}", {})[alarm.alarm_id] = alarm

    def _remove(self, alarm_id: str) -> None:
        alarm = self._alarms.pop(alarm_id, None)
        if alarm is not None:
            key = f"{alarm.room}/{alarm.device}"
            device = self._by_device.get(key)
            if device is not None:
                device.pop(alarm_id, None)
                if not device:
                    del self._by_device[key]

    def _find(self, room: str, alarm_id: str) -> _Alarm:
        alarm = self._alarms.get(alarm_id)
        if alarm is None or alarm.room != room or not alarm.shown:
            raise ValueError("no such active alarm in this room")  # the id may carry anything: never echoed
        return alarm

    def _judge(self, rule: ThresholdRule, room: str, value: float) -> tuple[float | None, bool, bool]:
        """(limit, violated, clearly back): between the limit and limit +- hysteresis the state holds."""
        if rule.below is not None:
            return rule.below, value < rule.below, value >= rule.below + rule.hysteresis
        if rule.above is not None:
            return rule.above, value > rule.above, value <= rule.above - rule.hysteresis
        session = self._sessions.get(room)
        base = session.baseline.get(rule.metric) if session else None
        if base is None or rule.above_baseline_pct is None:
            return None, False, False
        limit = round(base * (1 + rule.above_baseline_pct / 100), 1)
        return limit, value > limit, value <= limit - rule.hysteresis

    def _maybe_baseline(self, room: str, metrics: Mapping[str, float], now: float) -> list[SessionEvent]:
        session = self._sessions.get(room)
        if session is None or session.baseline or not all(m in metrics for m in BP_METRICS[:2]):
            return []
        session.baseline = {m: metrics[m] for m in (*BP_METRICS, "nibp_pulse_rate") if m in metrics}
        return [SessionEvent(room, "baseline", now, session.session_id, session.started, dict(session.baseline))]

    def _alarm(
        self,
        room: str,
        device: str,
        rule_id: str,
        kind: Literal["physiological", "technical"],
        rule: ThresholdRule | TechnicalRule,
        limit: float | None = None,
        message: str = "",
    ) -> _Alarm:
        alarm_id = f"{room}/{device}/{rule_id}"
        alarm = self._alarms.get(alarm_id)
        if alarm is None:
            if isinstance(rule, ThresholdRule):
                alarm = _Alarm(
                    alarm_id=alarm_id,
                    room=room,
                    device=device,
                    rule=rule_id,
                    kind=kind,
                    priority=rule.priority,
                    delay_s=rule.delay_s,
                    clear_delay_s=rule.clear_delay_s,
                    latching=rule.latching,
                    escalate_after_s=rule.escalate_after_s,
                    message=rule.message or rule_id,
                    metric=rule.metric,
                    tier_of=rule.tier_of,
                )
            else:
                alarm = _Alarm(
                    alarm_id,
                    room,
                    device,
                    rule_id,
                    kind,
                    rule.priority,
                    rule.delay_s,
                    0.0,
                    False,
                    None,
                    message or rule_id,
                )
            self._add(alarm)
        if limit is not None:
            alarm.limit = limit
        return alarm

    def _technical(
        self,
        room: str,
        device: str,
        name: str,
        condition: bool,
        now: float,
        value: float | None = None,
        message: str = "",
    ) -> list[AlarmEvent]:
        rule: TechnicalRule = getattr(self.tech, name)
        if not rule.enabled:
            return []
        alarm_id = f"{room}/{device}/{name}"
        if not condition and alarm_id not in self._alarms:
            return []
        alarm = self._alarm(room, device, name, "technical", rule, message=message or name.replace("_", " "))
        if value is not None:
            alarm.value = value
        if message:
            alarm.message = message
        return self._update(alarm, condition, not condition, now)

    def _update(self, alarm: _Alarm, violated: bool, clear: bool, now: float) -> list[AlarmEvent]:
        if violated:
            alarm.condition = True
            alarm.clear_since = None
            if alarm.pending_since is None:
                alarm.pending_since = now
        elif clear:
            alarm.condition = False
            alarm.pending_since = None
            if alarm.active and alarm.clear_since is None:
                alarm.clear_since = now
        else:  # inside the hysteresis band: hold, and restart the clear delay
            alarm.clear_since = None
        return self._advance(alarm, now)

    def _advance(self, alarm: _Alarm, now: float) -> list[AlarmEvent]:
        if alarm.kind == "physiological" and not self._fresh(alarm, now):
            # No current value: nothing is raised, cleared or escalated from an old one; the delays start again.
            alarm.pending_since = alarm.clear_since = None
            alarm.condition = False
            if alarm.shown and not alarm.indeterminate:
                alarm.indeterminate = True
                return [self._event(alarm, "indeterminate", now)]
            return []
        out: list[AlarmEvent] = []
        if not alarm.active:
            if alarm.condition and alarm.pending_since is not None and now - alarm.pending_since >= alarm.delay_s:
                alarm.raised_at = now
                alarm.acknowledged = alarm.escalated = False
                if alarm.tier_of is not None:
                    return self._tier_raised(alarm, now)
                out.append(self._event(alarm, "raised", now))
            return out
        clear_due = alarm.clear_since is not None and now - alarm.clear_since >= alarm.clear_delay_s
        if clear_due and (not alarm.latching or alarm.acknowledged):
            return self._clear(alarm, now)
        silenced = alarm.silenced_until is not None and now < alarm.silenced_until
        if (
            alarm.escalate_after_s is not None
            and alarm.condition
            and not alarm.acknowledged
            and not alarm.escalated
            and not silenced
            and alarm.raised_at is not None
            and now - alarm.raised_at >= alarm.escalate_after_s
            and alarm.priority != "high"
        ):
            alarm.priority = PRIORITIES[PRIORITIES.index(alarm.priority) + 1]
            alarm.escalated = True
            out.append(self._event(alarm, "escalated", now))
        return out

    def _tier_raised(self, tier: _Alarm, now: float) -> list[AlarmEvent]:
        """A stricter limit held for its delay: the base rule's alarm is raised at the tier's priority, or
        escalated to it (and announced again, even if it was acknowledged)."""
        assert tier.tier_of is not None
        base_rule = self._rules[tier.tier_of]
        base = self._alarm(tier.room, tier.device, base_rule.id, "physiological", base_rule, tier.limit)
        base.value, base.quality, base.limit, base.message = tier.value, tier.quality, tier.limit, tier.message
        if not base.active:
            base.raised_at = now
            base.priority = tier.priority
            base.condition = True
            base.acknowledged = base.escalated = False
            return [self._event(base, "raised", now)]
        if PRIORITIES.index(base.priority) >= PRIORITIES.index(tier.priority):
            return []
        base.priority = tier.priority
        base.acknowledged = False
        base.escalated = True
        return [self._event(base, "escalated", now)]

    def _clear(self, alarm: _Alarm, now: float) -> list[AlarmEvent]:
        self._remove(alarm.alarm_id)  # a new violation starts a new alarm, with its own delay
        if alarm.tier_of is not None:
            return []  # a tier ends silently: the base alarm keeps its priority until it clears
        for rule in self.profile.rules:
            if rule.tier_of == alarm.rule:  # its tiers start afresh with the next alarm
                self._remove(f"{alarm.room}/{alarm.device}/{rule.id}")
        return [self._event(alarm, "cleared", now)]

    @staticmethod
    def _event(alarm: _Alarm, transition: Transition, now: float, role: str | None = None) -> AlarmEvent:
        return AlarmEvent(
            alarm_id=alarm.alarm_id,
            room=alarm.room,
            device=alarm.device,
            rule=alarm.rule,
            kind=alarm.kind,
            priority=alarm.priority,
            transition=transition,
            active=transition not in ENDING,
            time=now,
            metric=alarm.metric,
            value=alarm.value,
            limit=alarm.limit,
            message=alarm.message,
            role=role,
            indeterminate=alarm.indeterminate,
            quality=alarm.quality,
            since=alarm.raised_at,
        )
