"""What the alarm engine says: alarm transitions, session and room-mode events (records.py turns them into payloads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.alarms.profile import Priority

# --- events --------------------------------------------------------------------------------------------------

# indeterminate: the device's data went stale or unusable, the condition cannot be judged (the alarm stays shown);
# resumed: fresh data again; suspended: ended because the room went to standby (not because the patient is well).
Transition = Literal[
    "raised", "escalated", "acknowledged", "silenced", "indeterminate", "resumed", "suspended", "cleared"
]
ENDING: frozenset[str] = frozenset({"cleared", "suspended"})


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
    indeterminate: bool = False  # the condition cannot be judged now (no fresh, usable data)
    quality: tuple[str, ...] = ()  # device quality flags on the value that caused it (e.g. low_perfusion)
    since: float | None = None  # when the alarm was raised


@dataclass(frozen=True, slots=True)
class SessionEvent:
    room: str
    transition: Literal["started", "stopped", "baseline"]
    time: float
    session_id: str
    started: float
    baseline: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoomModeEvent:
    """A room enters or leaves standby (nobody is being monitored there); every screen must show it."""

    room: str
    mode: Literal["standby", "monitoring"]
    time: float
    until: float | None = None  # standby ends on its own then
    role: str | None = None
    reason: str = ""  # for monitoring: ended, expired, session started


EngineEvent = AlarmEvent | SessionEvent | RoomModeEvent


# --- the engine ----------------------------------------------------------------------------------------------
