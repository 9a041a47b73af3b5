"""The alarm engine and the policy it applies: `profile` (a site's rules, validated), `engine` (pure: readings and
statuses in, transitions out), `events` (what it says). The names below are the package's public face."""

from gateway.alarms.engine import DEFAULT_STALE_AFTER_S, AlarmEngine
from gateway.alarms.events import ENDING, AlarmEvent, EngineEvent, RoomModeEvent, SessionEvent, Transition
from gateway.alarms.profile import (
    BP_METRICS,
    CONTINUOUS_METRICS,
    DEFAULT_UNUSABLE,
    EXAMPLE_KETAMINE_PROFILE,
    NAME,
    PRIORITIES,
    SENSOR_STATES,
    UNREACHABLE_STATES,
    AlarmProfile,
    Priority,
    QualityPolicy,
    TechnicalRule,
    TechnicalRules,
    ThresholdRule,
)

__all__ = [
    "BP_METRICS",
    "CONTINUOUS_METRICS",
    "DEFAULT_STALE_AFTER_S",
    "DEFAULT_UNUSABLE",
    "ENDING",
    "EXAMPLE_KETAMINE_PROFILE",
    "NAME",
    "PRIORITIES",
    "SENSOR_STATES",
    "UNREACHABLE_STATES",
    "AlarmEngine",
    "AlarmEvent",
    "AlarmProfile",
    "EngineEvent",
    "Priority",
    "QualityPolicy",
    "RoomModeEvent",
    "SessionEvent",
    "TechnicalRule",
    "TechnicalRules",
    "ThresholdRule",
    "Transition",
]
