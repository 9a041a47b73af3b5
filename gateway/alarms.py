"""The alarm engine: readings and statuses in, alarm transitions out. Pure: it knows time only through `now`.

Follows IEC 60601-1-8 ideas; the bedside device stays the primary alarm. Rules are a site's policy (see
EXAMPLE_KETAMINE_PROFILE: an example, not advice).

- Physiological alarms (limit violations) are raised only from trustworthy readings: a reading flagged by the
  device (probe off, artifact, searching, low signal...) never raises or clears one; it leads to the technical
  condition instead. A condition must hold for `delay_s` before it is raised and stay clear (past the hysteresis
  band) for `clear_delay_s` before it is cleared, so one odd value neither raises nor ends an alarm.
- Technical alarms: no data from a device, a lost port, sensor problems, cuff errors, an overdue NIBP
  measurement, the outbox filling up, the gateway cut off from its broker.
- Lifecycle: raised -> (acknowledged) -> cleared; latching alarms stay until acknowledged even when the
  condition is gone; unacknowledged alarms may escalate one priority after `escalate_after_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from devices.base import METRICS, DeviceState

Priority = Literal["low", "medium", "high"]
PRIORITIES: tuple[Priority, ...] = ("low", "medium", "high")
NAME = r"^[a-z0-9][a-z0-9_-]{0,47}$"
BP_METRICS = ("nibp_systolic", "nibp_diastolic", "nibp_mean")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThresholdRule(_Strict):
    """One limit on one metric. Exactly one of below, above, above_baseline_pct."""

    id: Annotated[str, Field(pattern=NAME)]
    metric: Literal[
        "spo2", "pulse_rate", "perfusion_index", "nibp_systolic", "nibp_diastolic", "nibp_mean", "nibp_pulse_rate"
    ]
    below: float | None = None
    above: float | None = None
    above_baseline_pct: Annotated[float, Field(gt=0, le=200)] | None = None  # vs the infusion session's baseline
    priority: Priority
    delay_s: Annotated[float, Field(ge=0, le=3600)] = 0.0  # the condition must hold this long
    clear_delay_s: Annotated[float, Field(ge=0, le=3600)] = 0.0  # and be gone this long to clear
    hysteresis: Annotated[float, Field(ge=0)] = 0.0  # in the metric's unit: clears only past limit +- this
    latching: bool = False  # stays until acknowledged, even when the condition is gone
    escalate_after_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    rooms: tuple[str, ...] = ()  # empty: every room
    devices: tuple[str, ...] = ()  # empty: every device
    message: str = ""

    @model_validator(mode="after")
    def _one_limit(self) -> ThresholdRule:
        given = [n for n in ("below", "above", "above_baseline_pct") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of below, above or above_baseline_pct")
        if self.above_baseline_pct is not None and self.metric not in BP_METRICS:
            raise ValueError(f"above_baseline_pct applies to {', '.join(BP_METRICS)} (the session baseline)")
        spec = METRICS[self.metric]
        limit = self.below if self.below is not None else self.above
        if limit is not None and not spec.low <= limit <= spec.high:
            raise ValueError(f"limit {limit:g} is outside what a device reports ({spec.low:g}..{spec.high:g})")
        return self

    def applies(self, room: str, device: str) -> bool:
        return (not self.rooms or room in self.rooms) and (not self.devices or device in self.devices)


class TechnicalRule(_Strict):
    priority: Priority
    delay_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    enabled: bool = True


class TechnicalRules(_Strict):
    """Technical alarms. Delays add to the detection time (no_data already waits the model's stale_after_s)."""

    no_data: TechnicalRule = TechnicalRule(priority="high")
    device_disconnected: TechnicalRule = TechnicalRule(priority="high", delay_s=2)
    sensor: TechnicalRule = TechnicalRule(priority="medium", delay_s=15)  # probe off, no sensor, fault, search
    cuff_error: TechnicalRule = TechnicalRule(priority="low")
    nibp_overdue: TechnicalRule = TechnicalRule(priority="medium")
    outbox_filling: TechnicalRule = TechnicalRule(priority="medium")
    broker_lost: TechnicalRule = TechnicalRule(priority="high", delay_s=10)
    outbox_fill_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.8


class AlarmProfile(_Strict):
    name: str = "site"
    example: bool = False  # an example profile must say so wherever it is shown
    rules: tuple[ThresholdRule, ...] = ()
    technical: TechnicalRules = TechnicalRules()

    @model_validator(mode="after")
    def _unique(self) -> AlarmProfile:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rule ids must be unique: {', '.join(dupes)}")
        return self


EXAMPLE_KETAMINE_PROFILE = AlarmProfile(
    name="example-ketamine-infusion",
    example=True,
    rules=(
        ThresholdRule(
            id="spo2-low",
            metric="spo2",
            below=92,
            priority="medium",
            delay_s=15,
            hysteresis=1,
            clear_delay_s=10,
            escalate_after_s=60,
            message="SpO2 low",
        ),
        ThresholdRule(
            id="spo2-very-low",
            metric="spo2",
            below=88,
            priority="high",
            delay_s=10,
            hysteresis=1,
            clear_delay_s=10,
            message="SpO2 very low",
        ),
        ThresholdRule(
            id="pulse-low",
            metric="pulse_rate",
            below=45,
            priority="medium",
            delay_s=15,
            hysteresis=2,
            clear_delay_s=10,
            message="pulse rate low",
        ),
        ThresholdRule(
            id="pulse-high",
            metric="pulse_rate",
            above=130,
            priority="medium",
            delay_s=15,
            hysteresis=3,
            clear_delay_s=10,
            message="pulse rate high",
        ),
        ThresholdRule(
            id="sys-severe-high",
            metric="nibp_systolic",
            above=179,
            priority="high",
            latching=True,
            hysteresis=5,
            message="severe hypertension: systolic 180 or above",
        ),
        ThresholdRule(
            id="dia-severe-high",
            metric="nibp_diastolic",
            above=109,
            priority="high",
            latching=True,
            hysteresis=5,
            message="severe hypertension: diastolic 110 or above",
        ),
        ThresholdRule(
            id="sys-rise-baseline",
            metric="nibp_systolic",
            above_baseline_pct=25,
            priority="medium",
            message="systolic more than 25% above the session baseline",
        ),
    ),
)
"""An EXAMPLE of a site policy for ketamine infusion rooms, to show the rule language. Not clinical advice:
every site sets its own limits with its clinicians."""


# --- events --------------------------------------------------------------------------------------------------

Transition = Literal["raised", "escalated", "acknowledged", "silenced", "cleared"]


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    alarm_id: str  # room/device/rule: stable, so an acknowledgement can name it
    room: str
    device: str
    rule: str
    kind: Literal["physiological", "technical"]
    priority: Priority
    transition: Transition
    active: bool  # still shown as an active alarm after this transition
    time: float
    metric: str | None = None
    value: float | None = None  # the value that caused it (or cleared it)
    limit: float | None = None
    message: str = ""
    role: str | None = None  # who acknowledged or silenced: a role, never a name


@dataclass(frozen=True, slots=True)
class SessionEvent:
    room: str
    transition: Literal["started", "stopped", "baseline"]
    time: float
    session_id: str
    started: float
    baseline: dict[str, float] = field(default_factory=dict)


# --- the engine ----------------------------------------------------------------------------------------------


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

    @property
    def active(self) -> bool:
        return self.raised_at is not None


@dataclass
class _Session:
    session_id: str
    started: float
    baseline: dict[str, float] = field(default_factory=dict)


class AlarmEngine:
    def __init__(self, profile: AlarmProfile, nibp_schedules: dict[str, float] | None = None) -> None:
        """`nibp_schedules`: room/device -> measure_every_s of each scheduled cuff (for the overdue alarm)."""
        self.profile = profile
        self.tech = profile.technical
        self._alarms: dict[str, _Alarm] = {}
        self._sessions: dict[str, _Session] = {}
        self._nibp_every = dict(nibp_schedules or {})
        self._nibp_last: dict[str, float] = {}

    # -- inputs --------------------------------------------------------------------------------------------------

    def on_reading(
        self, room: str, device: str, metrics: dict[str, float], trustworthy: bool, now: float
    ) -> list[AlarmEvent | SessionEvent]:
        out: list[AlarmEvent | SessionEvent] = []
        key = f"{room}/{device}"
        out += self._technical(room, device, "no_data", False, now)
        out += self._technical(room, device, "device_disconnected", False, now)
        if any(m in metrics for m in BP_METRICS):
            self._nibp_last[key] = now
            out += self._technical(room, device, "nibp_overdue", False, now)
            out += self._technical(room, device, "cuff_error", False, now)
            out += self._maybe_baseline(room, metrics, now)
        if not trustworthy:
            return out  # flagged values neither raise nor clear a physiological alarm
        out += self._technical(room, device, "sensor", False, now)
        for rule in self.profile.rules:
            if rule.metric not in metrics or not rule.applies(room, device):
                continue
            value = metrics[rule.metric]
            limit, violated, clear = self._judge(rule, room, value)
            if limit is None:
                continue  # a baseline rule before the session has a baseline
            alarm = self._alarm(room, device, rule.id, "physiological", rule, limit)
            alarm.value = value
            out += self._update(alarm, violated, clear, now)
        return out

    def on_status(self, room: str, device: str, state: DeviceState, code: int | None, now: float) -> list[AlarmEvent]:
        out: list[AlarmEvent] = []
        out += self._technical(room, device, "no_data", state == DeviceState.NO_DATA, now)
        out += self._technical(room, device, "device_disconnected", state == DeviceState.DISCONNECTED, now)
        sensor = state in (
            DeviceState.PROBE_OFF,
            DeviceState.NO_SENSOR,
            DeviceState.SENSOR_FAULT,
            DeviceState.SEARCHING,
        )
        if state not in (DeviceState.NO_DATA, DeviceState.DISCONNECTED, DeviceState.CONNECTED):
            out += self._technical(room, device, "sensor", sensor, now, message=f"sensor: {state}")
        if state == DeviceState.CUFF_ERROR:
            out += self._technical(room, device, "cuff_error", True, now, value=code, message=f"cuff error {code}")
        return out

    def on_gateway(self, gateway: str, broker_connected: bool, outbox_fill: float, now: float) -> list[AlarmEvent]:
        out = self._technical("_gateway", gateway, "broker_lost", not broker_connected, now)
        full = outbox_fill >= self.tech.outbox_fill_fraction
        out += self._technical("_gateway", gateway, "outbox_filling", full, now, value=round(outbox_fill, 3))
        return out

    def tick(self, now: float) -> list[AlarmEvent]:
        """Delays, clear delays and escalation that are due by `now`; overdue NIBP measurements."""
        out: list[AlarmEvent] = []
        for key, every in self._nibp_every.items():
            room, device = key.split("/", 1)
            last = self._nibp_last.setdefault(key, now)
            out += self._technical(room, device, "nibp_overdue", now - last > every * 1.5 + 60, now)
        for alarm in list(self._alarms.values()):
            out += self._advance(alarm, now)
        return out

    # -- operator actions -----------------------------------------------------------------------------------------

    def acknowledge(self, room: str, alarm_id: str, role: str | None, now: float) -> list[AlarmEvent]:
        alarm = self._find(room, alarm_id)
        if alarm.acknowledged:
            raise ValueError(f"alarm {alarm_id} is already acknowledged")
        alarm.acknowledged = True
        out = [self._event(alarm, "acknowledged", now, role=role)]
        if alarm.latching and not alarm.condition:
            out.append(self._clear(alarm, now))
        return out

    def silence(self, room: str, alarm_id: str, seconds: float, role: str | None, now: float) -> list[AlarmEvent]:
        """Pause announcing (and escalating) an alarm for a while; it stays active and visible."""
        alarm = self._find(room, alarm_id)
        alarm.silenced_until = now + seconds
        return [self._event(alarm, "silenced", now, role=role)]

    def start_session(self, room: str, session_id: str, now: float) -> list[SessionEvent]:
        if room in self._sessions:
            raise ValueError(f"room {room} already has a session running ({self._sessions[room].session_id})")
        self._sessions[room] = _Session(session_id, now)
        return [SessionEvent(room, "started", now, session_id, now)]

    def stop_session(self, room: str, now: float) -> list[SessionEvent]:
        session = self._sessions.pop(room, None)
        if session is None:
            raise ValueError(f"room {room} has no session running")
        return [SessionEvent(room, "stopped", now, session.session_id, session.started, dict(session.baseline))]

    def session(self, room: str) -> _Session | None:
        return self._sessions.get(room)

    def active(self) -> list[AlarmEvent]:
        """Every active alarm as it stands (for retained topics and the wall)."""
        return [self._event(a, "raised", a.raised_at or 0.0) for a in self._alarms.values() if a.active]

    # -- internals -----------------------------------------------------------------------------------------------

    def _find(self, room: str, alarm_id: str) -> _Alarm:
        alarm = self._alarms.get(alarm_id)
        if alarm is None or alarm.room != room or not alarm.active:
            raise ValueError(f"no active alarm {alarm_id!r} in room {room!r}")
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

    def _maybe_baseline(self, room: str, metrics: dict[str, float], now: float) -> list[SessionEvent]:
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
            is_threshold = isinstance(rule, ThresholdRule)
            alarm = _Alarm(
                alarm_id=alarm_id,
                room=room,
                device=device,
                rule=rule_id,
                kind=kind,
                priority=rule.priority,
                delay_s=rule.delay_s,
                clear_delay_s=rule.clear_delay_s if isinstance(rule, ThresholdRule) else 0.0,
                latching=rule.latching if isinstance(rule, ThresholdRule) else False,
                escalate_after_s=rule.escalate_after_s if isinstance(rule, ThresholdRule) else None,
                message=(rule.message if isinstance(rule, ThresholdRule) else "") or message or rule_id,
                metric=rule.metric if is_threshold and isinstance(rule, ThresholdRule) else None,
            )
            self._alarms[alarm_id] = alarm
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
        out: list[AlarmEvent] = []
        if not alarm.active:
            if alarm.condition and alarm.pending_since is not None and now - alarm.pending_since >= alarm.delay_s:
                alarm.raised_at = now
                alarm.acknowledged = alarm.escalated = False
                out.append(self._event(alarm, "raised", now))
            return out
        clear_due = alarm.clear_since is not None and now - alarm.clear_since >= alarm.clear_delay_s
        if clear_due and (not alarm.latching or alarm.acknowledged):
            out.append(self._clear(alarm, now))
            return out
        silenced = alarm.silenced_until is not None and now < alarm.silenced_until
        if (
            alarm.escalate_after_s is not None
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

    def _clear(self, alarm: _Alarm, now: float) -> AlarmEvent:
        event = self._event(alarm, "cleared", now)
        del self._alarms[alarm.alarm_id]  # a new violation starts a new alarm, with its own delay
        return event

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
            active=transition != "cleared",
            time=now,
            metric=alarm.metric,
            value=alarm.value,
            limit=alarm.limit,
            message=alarm.message,
            role=role,
        )
