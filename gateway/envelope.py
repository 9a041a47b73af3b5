"""The envelope: what the gateway adds to a device event, and the JSON records that flow to MQTT and InfluxDB.

A record is built once, when the event arrives, committed to the outbox as JSON, and every sink reads that same
JSON. The pydantic models below are the documented schema (docs/mqtt-schema.json is generated from them and the
tests validate real payloads against them); the hot path builds plain dicts for speed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import models_json_schema

from devices.base import METRICS, DeviceSpec, DeviceStatus, Reading, Waveform
from gateway.alarms import AlarmEvent, RoomModeEvent, SessionEvent

SCHEMA_VERSION = 1
STANDBY_DEFAULT_S = 4 * 3600.0  # a room left in standby by mistake is monitored again after a shift's part
STANDBY_MAX_S = 24 * 3600.0


def iso_utc(ts: float) -> str:
    """Microsecond ISO 8601 in UTC with a Z: exact enough to rebuild the nanosecond InfluxDB timestamp."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_after(text: str) -> str:
    """The `iso_utc` time one microsecond after `text`, exactly (no float rounding)."""
    return (datetime.fromisoformat(text) + timedelta(microseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso_ns(text: str) -> int:
    """Exact integer nanoseconds of an `iso_utc` time (no float rounding). On the hot path of every sink, so
    fromisoformat (C) rather than strptime (50 times slower)."""
    if not text.endswith("Z"):
        raise ValueError(f"not a UTC time: {text!r}")
    delta = datetime.fromisoformat(text) - _EPOCH
    return ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1000


class Origin(BaseModel):
    """Who and where: rooms and devices only, never a patient."""

    model_config = ConfigDict(extra="forbid")
    site: str
    room: str
    device: str
    model: str
    kind: str


class _Envelope(Origin):
    v: Literal[1] = Field(1, description="payload schema version")
    id: str = Field(description="room/device/seq: unique per device; a QoS 1 redelivery repeats it")
    seq: int = Field(ge=1, description="per-device sequence number, kept across gateway restarts")
    time: str = Field(description="UTC receive time at the gateway, ISO 8601 with microseconds")
    historical: bool = Field(
        False,
        description="true when sent later than the live window after it was received (replayed backlog)",
    )
    durable: bool = Field(
        True,
        description="false: sent while the gateway's storage is unusable (disk full), before it is committed; "
        "the same id comes again once it is durable",
    )


class ReadingMessage(_Envelope):
    type: Literal["reading"]
    metrics: dict[str, float] = Field(description="canonical metric name -> value; unavailable values left out")
    units: dict[str, str] = Field(description="UCUM unit per metric")
    mdc: dict[str, int] = Field(description="IEEE 11073-10101 code per metric")
    flags: list[str] = Field(description="device quality and alarm flags, e.g. probe_off, low_perfusion")
    valid: bool = Field(description="false when a quality flag makes the values unfit for alarms")
    device_time: str | None = Field(None, description="the device's own clock as it sent it, no zone (drifts)")


class StatusMessage(_Envelope):
    type: Literal["status"]
    state: str = Field(description="ok, probe_off, no_sensor, sensor_fault, searching, no_data, disconnected, ...")
    conditions: list[str]
    code: int | None = None
    detail: str = ""


class WaveformMessage(_Envelope):
    type: Literal["waveform"]
    name: str = Field(description="pleth")
    rate_hz: float
    samples: list[int] = Field(description="consecutive samples in device units, the first at `time` - len/rate")


class AlarmMessage(_Envelope):
    type: Literal["alarm"]
    alarm_id: str = Field(description="room/device/rule: name it to acknowledge or silence the alarm")
    rule: str
    alarm_kind: Literal["physiological", "technical"]
    priority: Literal["low", "medium", "high"]
    transition: Literal[
        "raised", "escalated", "acknowledged", "silenced", "indeterminate", "resumed", "suspended", "cleared"
    ] = Field(
        description="indeterminate: no fresh usable data, the condition cannot be judged (the alarm stays); "
        "resumed: fresh data again; suspended: ended because the room went to standby"
    )
    active: bool = Field(description="whether the alarm is still active after this transition")
    indeterminate: bool = Field(False, description="true while the condition cannot be judged (device silent)")
    quality: list[str] = Field(
        default_factory=list, description="device quality flags on the value that caused it, e.g. low_perfusion"
    )
    since: str | None = Field(None, description="UTC time the alarm was raised")
    metric: str | None = None
    value: float | None = Field(None, description="the value that caused the transition")
    limit: float | None = None
    message: str = ""
    role: str | None = Field(None, description="who acknowledged or silenced: a role, never a name")
    profile: str = Field(description="the alarm profile in force")
    example_profile: bool = Field(description="true while the shipped EXAMPLE profile is in force (not advice)")


class SessionMessage(_Envelope):
    type: Literal["session"]
    transition: Literal["started", "stopped", "baseline"]
    session_id: str
    started: str = Field(description="UTC start of the session")
    baseline: dict[str, float] = Field(default_factory=dict, description="the session's first valid blood pressure")


class RoomModeMessage(_Envelope):
    type: Literal["room_mode"]
    mode: Literal["standby", "monitoring"] = Field(
        description="standby: nobody is monitored in this room; its physiological and device alarms are suspended"
    )
    until: str | None = Field(None, description="UTC time standby ends on its own")
    role: str | None = Field(None, description="who set it: a role, never a name")
    reason: str = Field("", description="why monitoring resumed: standby ended, standby expired, session started")


COMMAND_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
ROLE = r"^[a-z][a-z0-9_-]{0,31}$"
_LEVEL = r"[a-z0-9_][a-z0-9_-]{0,47}"  # a room, device or rule name (gateway alarms: room `_gateway`)
ALARM_ID = rf"^{_LEVEL}/{_LEVEL}/{_LEVEL}$"
ISO_UTC = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"


class _Command(BaseModel):
    """What every command carries. Nothing in it is free text: each field matches a strict pattern, so no name or
    note typed into a command can reach a log, a reply, MQTT or InfluxDB."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=COMMAND_ID, description="unique per command; a repeat within the window is not re-run")
    issued_at: str = Field(
        pattern=ISO_UTC, description="UTC time the sender issued it; refused outside the gateway's window (30 s)"
    )
    operator_role: str = Field(pattern=ROLE, description="a role from the gateway's [commands.roles], never a name")


class DeviceCommand(_Command):
    """Sent to `.../{room}/{device}/command`. `id` is echoed in the reply so the sender can match it."""

    action: Literal["start_measurement"]


class RoomCommand(_Command):
    """Sent to `.../{room}/command`: alarm acknowledgement and silence, infusion sessions, standby."""

    action: Literal["acknowledge", "silence", "start_session", "stop_session", "standby", "end_standby"]
    alarm_id: str | None = Field(None, pattern=ALARM_ID, description="for acknowledge and silence")
    silence_s: float = Field(120.0, gt=0, le=600, description="for silence (capped by [commands] silence_max_s)")
    standby_s: float = Field(
        STANDBY_DEFAULT_S, gt=0, le=STANDBY_MAX_S, description="for standby: it ends on its own after this long"
    )

    @model_validator(mode="after")
    def _alarm_id(self) -> RoomCommand:
        if self.action in ("acknowledge", "silence") and not self.alarm_id:
            raise ValueError(f"{self.action} needs alarm_id")
        return self


class CommandReply(BaseModel):
    v: Literal[1] = 1
    type: Literal["command_reply"] = "command_reply"
    id: str | None
    ok: bool
    reason: str = ""
    repeat: bool = Field(False, description="true: a repeat of a command already handled, answered, not re-run")
    time: str


class GatewayCounters(BaseModel):
    received: int = 0
    committed: int = 0
    published: int = 0
    written: int = 0
    protocol_errors: int = 0
    backlog_mqtt: int = 0
    backlog_influx: int = 0
    rejected: int = 0
    dropped: int = 0
    unsaved: int = Field(0, description="records waiting in memory because the outbox cannot be written (disk full)")
    unsaved_dropped: int = Field(0, description="readings lost because that memory's bound was reached")


class GatewayStatusMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1
    type: Literal["gateway"] = "gateway"
    site: str
    gateway: str
    state: Literal["online", "degraded", "offline"] = Field(
        description="online: every link up; degraded: a sink is down and readings wait in the outbox"
    )
    time: str
    version: str = ""
    devices: dict[str, str] = Field(default_factory=dict, description="room/device -> latest state")
    counters: GatewayCounters = Field(default_factory=GatewayCounters)
    links: dict[str, str] = Field(default_factory=dict, description="mqtt, influx and each device: up/down/state")


# --- builders used on the hot path --------------------------------------------------------------------------


def _envelope(origin: dict[str, str], seq: int, received: float) -> dict[str, Any]:
    return {
        "v": SCHEMA_VERSION,
        **origin,
        "id": f"{origin['room']}/{origin['device']}/{seq}",
        "seq": seq,
        "time": iso_utc(received),
        "historical": False,
    }


def reading_record(origin: dict[str, str], seq: int, received: float, reading: Reading) -> dict[str, Any]:
    metrics = dict(reading.metrics)
    return {
        **_envelope(origin, seq, received),
        "type": "reading",
        "metrics": metrics,
        "units": {k: METRICS[k].unit for k in metrics},
        "mdc": {k: METRICS[k].mdc_code for k in metrics},
        "flags": list(reading.flags),
        "valid": reading.trustworthy,
        "device_time": reading.device_time,
    }


def status_record(origin: dict[str, str], seq: int, received: float, status: DeviceStatus) -> dict[str, Any]:
    return {
        **_envelope(origin, seq, received),
        "type": "status",
        "state": str(status.state),
        "conditions": list(status.conditions),
        "code": status.code,
        "detail": status.detail,
    }


def waveform_record(origin: dict[str, str], seq: int, received: float, wave: Waveform) -> dict[str, Any]:
    return {
        **_envelope(origin, seq, received),
        "type": "waveform",
        "name": wave.name,
        "rate_hz": wave.rate_hz,
        "samples": list(wave.samples),
    }


def alarm_record(origin: dict[str, str], seq: int, event: AlarmEvent, profile: str, example: bool) -> dict[str, Any]:
    return {
        **_envelope(origin, seq, event.time),
        "type": "alarm",
        "alarm_id": event.alarm_id,
        "rule": event.rule,
        "alarm_kind": event.kind,
        "priority": event.priority,
        "transition": event.transition,
        "active": event.active,
        "metric": event.metric,
        "value": event.value,
        "limit": event.limit,
        "message": event.message,
        "role": event.role,
        "profile": profile,
        "example_profile": example,
        "indeterminate": event.indeterminate,
        "quality": list(event.quality),
        "since": None if event.since is None else iso_utc(event.since),
    }


def room_mode_record(origin: dict[str, str], seq: int, event: RoomModeEvent) -> dict[str, Any]:
    return {
        **_envelope(origin, seq, event.time),
        "type": "room_mode",
        "mode": event.mode,
        "until": None if event.until is None else iso_utc(event.until),
        "role": event.role,
        "reason": event.reason,
    }


def session_record(origin: dict[str, str], seq: int, event: SessionEvent) -> dict[str, Any]:
    return {
        **_envelope(origin, seq, event.time),
        "type": "session",
        "transition": event.transition,
        "session_id": event.session_id,
        "started": iso_utc(event.started),
        "baseline": dict(event.baseline),
    }


def gateway_status_record(origin: dict[str, str], seq: int, now: float, status: dict[str, Any]) -> dict[str, Any]:
    """The gateway's counters, stored (not published: the retained status topic carries them live)."""
    return {
        **_envelope(origin, seq, now),
        "type": "gateway_status",
        "state": status["state"],
        "counters": dict(status["counters"]),
        "links": dict(status["links"]),
    }


def room_origin(site: str, room: str) -> dict[str, str]:
    return {"site": site, "room": room, "device": "_room", "model": "session", "kind": "session"}


def gateway_origin(site: str, gateway_id: str) -> dict[str, str]:
    return {"site": site, "room": "_gateway", "device": gateway_id, "model": "gateway", "kind": "gateway"}


def origin_for(site: str, room: str, device: str, spec: DeviceSpec) -> dict[str, str]:
    return {"site": site, "room": room, "device": device, "model": spec.model, "kind": str(spec.kind)}


# --- topics --------------------------------------------------------------------------------------------------


def device_topic(prefix: str, site: str, room: str, device: str, leaf: str) -> str:
    return f"{prefix}/{site}/{room}/{device}/{leaf}"


def gateway_topic(prefix: str, site: str, gateway_id: str) -> str:
    # "_gateway" cannot collide with a room: room names must start with a letter or digit.
    return f"{prefix}/{site}/_gateway/{gateway_id}/status"


def schema_document() -> dict[str, Any]:
    """The JSON Schema of every payload, generated from the models (`make schema` writes docs/mqtt-schema.json)."""
    models = (
        ReadingMessage,
        StatusMessage,
        WaveformMessage,
        AlarmMessage,
        SessionMessage,
        RoomModeMessage,
        GatewayStatusMessage,
        DeviceCommand,
        RoomCommand,
        CommandReply,
    )
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/$defs/{model}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Infusion Room Telemetry MQTT payloads",
        "oneOf": [{"$ref": f"#/$defs/{m.__name__}"} for m in models],
        **defs,
    }
