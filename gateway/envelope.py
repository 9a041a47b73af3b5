"""The envelope: what the gateway adds to a device event, and the records that flow to the outbox, MQTT and InfluxDB.

One typed definition per payload kind (a msgspec Struct below) serves every use: the builders make it, the outbox
stores its JSON (encoded once, at `put`), the MQTT sink publishes those stored bytes as they are, the InfluxDB sink
renders its line from the typed fields, and docs/mqtt-schema.json is generated from the same classes. Records are a
union tagged by "type", so a stored body decodes straight back into its class (and one that does not is refused).

Commands coming in stay pydantic models: they are hostile input, and pydantic's per-field errors let a refusal name a
field without quoting the payload (gateway/commands.py).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypedDict

import msgspec
from msgspec import Meta, Struct, field
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import models_json_schema

from devices.base import METRICS, DeviceSpec, DeviceStatus, Reading, Waveform
from gateway.alarms import AlarmEvent, Priority, RoomModeEvent, SessionEvent, Transition

SCHEMA_VERSION = 1
STANDBY_DEFAULT_S = 4 * 3600.0  # a room left in standby by mistake is monitored again after a shift's part
STANDBY_MAX_S = 24 * 3600.0


_second: tuple[float, str] = (-1.0, "")  # the last whole second iso_utc formatted, and its text (one tuple: threads)


def iso_utc(ts: float) -> str:
    """Microsecond ISO 8601 in UTC with a Z: exact enough to rebuild the nanosecond InfluxDB timestamp. The same
    text as datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") (microseconds rounded half to even,
    as datetime does), with the date and time of day formatted once a second: every record is stamped by it."""
    global _second
    fraction, whole = math.modf(ts)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1.0, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1.0, micros + 1_000_000
    second = _second
    if whole != second[0]:
        second = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{second[1]}.{micros:06d}Z"


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


class Origin(TypedDict):
    """Who and where: rooms and devices only, never a patient."""

    site: str
    room: str
    device: str
    model: str
    kind: str


class _Head(Origin):
    id: str
    seq: int
    time: str


# --- records: the outbox body, the MQTT payload and the InfluxDB point of each kind ----------------------------


class Envelope(Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True, tag_field="type"):
    """What every record carries. Frozen: one record is shared by every sink (and the outbox's memory of recent
    records), so none of them can change what another sends. No reference cycles, so no GC tracking."""

    v: Annotated[Literal[1], Meta(description="payload schema version")] = 1
    site: str
    room: str
    device: str
    model: str
    kind: str
    id: Annotated[str, Meta(description="room/device/seq: unique per device; a QoS 1 redelivery repeats it")]
    seq: Annotated[int, Meta(ge=1, description="per-device sequence number, kept across gateway restarts")]
    time: Annotated[str, Meta(description="UTC receive time at the gateway, ISO 8601 with microseconds")]
    historical: Annotated[
        bool, Meta(description="true when sent later than the live window after it was received (replayed backlog)")
    ] = False
    durable: Annotated[
        bool,
        Meta(
            description="false: sent while the gateway's storage is unusable (disk full), before it is committed; "
            "the same id comes again once it is durable"
        ),
    ] = True


class ReadingMessage(Envelope, frozen=True, kw_only=True, gc=False, tag="reading"):
    """Values of one device record, on `.../{room}/{device}/reading` and in the `vitals` measurement."""

    metrics: Annotated[
        dict[str, float], Meta(description="canonical metric name -> value; unavailable values left out")
    ]
    units: Annotated[dict[str, str], Meta(description="UCUM unit per metric")]
    mdc: Annotated[dict[str, int], Meta(description="IEEE 11073-10101 code per metric")]
    flags: Annotated[list[str], Meta(description="device quality and alarm flags, e.g. probe_off, low_perfusion")]
    valid: Annotated[bool, Meta(description="false when a quality flag makes the values unfit for alarms")]
    device_time: Annotated[str | None, Meta(description="the device's own clock as it sent it, no zone (drifts)")] = (
        None
    )


class StatusMessage(Envelope, frozen=True, kw_only=True, gc=False, tag="status"):
    """A device's state when it changes, retained on `.../{room}/{device}/status`; `device_status` in InfluxDB."""

    state: Annotated[
        str, Meta(description="ok, probe_off, no_sensor, sensor_fault, searching, no_data, disconnected, ...")
    ]
    conditions: list[str]
    code: int | None = None
    detail: str = ""


class WaveformMessage(Envelope, frozen=True, kw_only=True, gc=False, tag="waveform"):
    """Pleth samples on `.../{room}/{device}/waveform` (not stored in InfluxDB)."""

    name: Annotated[str, Meta(description="pleth")]
    rate_hz: float
    samples: Annotated[
        list[int], Meta(description="consecutive samples in device units, the first at `time` - len/rate")
    ]


AlarmTransition = Annotated[
    Transition,
    Meta(
        description="indeterminate: no fresh usable data, the condition cannot be judged (the alarm stays); "
        "resumed: fresh data again; suspended: ended because the room went to standby"
    ),
]


class AlarmMessage(Envelope, frozen=True, kw_only=True, gc=False, tag="alarm"):
    """An alarm transition on `.../{room}/alarms/events`; while active, retained on `.../alarms/active/...`."""

    alarm_id: Annotated[str, Meta(description="room/device/rule: name it to acknowledge or silence the alarm")]
    rule: str
    alarm_kind: Literal["physiological", "technical"]
    priority: Priority
    transition: AlarmTransition
    active: Annotated[bool, Meta(description="whether the alarm is still active after this transition")]
    indeterminate: Annotated[bool, Meta(description="true while the condition cannot be judged (device silent)")] = (
        False
    )
    quality: Annotated[
        list[str], Meta(description="device quality flags on the value that caused it, e.g. low_perfusion")
    ] = field(default_factory=list)
    since: Annotated[str | None, Meta(description="UTC time the alarm was raised")] = None
    metric: str | None = None
    value: Annotated[float | None, Meta(description="the value that caused the transition")] = None
    limit: float | None = None
    message: str = ""
    role: Annotated[str | None, Meta(description="who acknowledged or silenced: a role, never a name")] = None
    profile: Annotated[str, Meta(description="the alarm profile in force")]
    example_profile: Annotated[
        bool, Meta(description="true while the shipped EXAMPLE profile is in force (not advice)")
    ]


class SessionMessage(Envelope, frozen=True, kw_only=True, gc=False, tag="session"):
    """An infusion session starts, stops or gets its baseline; retained on `.../{room}/session`."""

    transition: Literal["started", "stopped", "baseline"]
    session_id: str
    started: Annotated[str, Meta(description="UTC start of the session")]
    baseline: Annotated[dict[str, float], Meta(description="the session's first valid blood pressure")] = field(
        default_factory=dict
    )


class RoomModeMessage(Envelope, frozen=True, kw_only=True, gc=False, tag="room_mode"):
    """A room enters or leaves standby; retained on `.../{room}/mode`."""

    mode: Annotated[
        Literal["standby", "monitoring"],
        Meta(
            description="standby: nobody is monitored in this room; its physiological and device alarms are suspended"
        ),
    ]
    until: Annotated[str | None, Meta(description="UTC time standby ends on its own")] = None
    role: Annotated[str | None, Meta(description="who set it: a role, never a name")] = None
    reason: Annotated[
        str, Meta(description="why monitoring resumed: standby ended, standby expired, session started")
    ] = ""


class GatewayCounters(Struct, frozen=True, kw_only=True, gc=False):
    received: int = 0
    committed: int = 0
    published: int = 0
    written: int = 0
    protocol_errors: int = 0
    backlog_mqtt: int = 0
    backlog_influx: int = 0
    rejected: int = 0
    dropped: int = 0
    unsaved: Annotated[
        int, Meta(description="records waiting in memory because the outbox cannot be written (disk full)")
    ] = 0
    unsaved_dropped: Annotated[int, Meta(description="readings lost because that memory's bound was reached")] = 0


GatewayState = Literal["online", "degraded", "offline"]


class GatewayStatusRecord(Envelope, frozen=True, kw_only=True, gc=False, tag="gateway_status"):
    """The gateway's counters, stored for the gateway-health dashboard (`gateway` measurement). Not published: the
    retained gateway status (GatewayStatusMessage) carries the same counters live."""

    state: GatewayState
    counters: GatewayCounters
    links: dict[str, str]


Record = (
    ReadingMessage
    | StatusMessage
    | WaveformMessage
    | AlarmMessage
    | SessionMessage
    | RoomModeMessage
    | GatewayStatusRecord
)


def record_type(record: Envelope) -> str:
    """The record's "type" tag: "reading", "status", "alarm", ..."""
    return str(record.__struct_config__.tag)


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Record] = msgspec.json.Decoder(Record)
encode = _encoder.encode  # the record's JSON: what the outbox stores and MQTT publishes


def decode(body: bytes | str) -> Record:
    """The record of a stored body. Raises msgspec.DecodeError (a ValueError) when the body is not JSON or not a
    record of a known type with the right fields."""
    return _decoder.decode(body)


# --- the retained gateway status and command replies (published, not stored) ---------------------------------


class GatewayStatusMessage(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag="gateway"
):
    """Retained on `.../_gateway/{id}/status`; the broker's last will says "offline"."""

    v: Literal[1] = 1
    site: str
    gateway: str
    state: Annotated[
        GatewayState,
        Meta(description="online: every link up; degraded: a sink is down and readings wait in the outbox"),
    ]
    time: str
    version: str = ""
    devices: Annotated[dict[str, str], Meta(description="room/device -> latest state")] = field(default_factory=dict)
    counters: GatewayCounters = field(default_factory=GatewayCounters)
    links: Annotated[dict[str, str], Meta(description="mqtt, influx and each device: up/down/state")] = field(
        default_factory=dict
    )


class CommandReply(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag="command_reply"
):
    """The answer to a command, on the command's topic + `/reply`."""

    v: Literal[1] = 1
    id: str | None
    ok: bool
    reason: str = ""
    repeat: Annotated[bool, Meta(description="true: a repeat of a command already handled, answered, not re-run")] = (
        False
    )
    time: str


# --- commands in (hostile input: pydantic, see the module docstring) ------------------------------------------

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


# --- builders: typed, one per kind -----------------------------------------------------------------------------


def _head(origin: Origin, seq: int, at: float) -> _Head:
    return {**origin, "id": f"{origin['room']}/{origin['device']}/{seq}", "seq": seq, "time": iso_utc(at)}


def reading_record(origin: Origin, seq: int, received: float, reading: Reading) -> ReadingMessage:
    # A value that is not a finite number cannot be JSON: it is unavailable, and left out like one.
    metrics = {k: float(v) for k, v in reading.metrics.items() if math.isfinite(v)}
    return ReadingMessage(
        **_head(origin, seq, received),
        metrics=metrics,
        units={k: METRICS[k].unit for k in metrics},
        mdc={k: METRICS[k].mdc_code for k in metrics},
        flags=list(reading.flags),
        valid=reading.trustworthy,
        device_time=reading.device_time,
    )


def status_record(origin: Origin, seq: int, received: float, status: DeviceStatus) -> StatusMessage:
    return StatusMessage(
        **_head(origin, seq, received),
        state=str(status.state),
        conditions=list(status.conditions),
        code=status.code,
        detail=status.detail,
    )


def waveform_record(origin: Origin, seq: int, received: float, wave: Waveform) -> WaveformMessage:
    return WaveformMessage(
        **_head(origin, seq, received), name=wave.name, rate_hz=wave.rate_hz, samples=list(wave.samples)
    )


def alarm_record(origin: Origin, seq: int, event: AlarmEvent, profile: str, example: bool) -> AlarmMessage:
    return AlarmMessage(
        **_head(origin, seq, event.time),
        alarm_id=event.alarm_id,
        rule=event.rule,
        alarm_kind=event.kind,
        priority=event.priority,
        transition=event.transition,
        active=event.active,
        metric=event.metric,
        value=event.value,
        limit=event.limit,
        message=event.message,
        role=event.role,
        profile=profile,
        example_profile=example,
        indeterminate=event.indeterminate,
        quality=list(event.quality),
        since=None if event.since is None else iso_utc(event.since),
    )


def room_mode_record(origin: Origin, seq: int, event: RoomModeEvent) -> RoomModeMessage:
    return RoomModeMessage(
        **_head(origin, seq, event.time),
        mode=event.mode,
        until=None if event.until is None else iso_utc(event.until),
        role=event.role,
        reason=event.reason,
    )


def session_record(origin: Origin, seq: int, event: SessionEvent) -> SessionMessage:
    return SessionMessage(
        **_head(origin, seq, event.time),
        transition=event.transition,
        session_id=event.session_id,
        started=iso_utc(event.started),
        baseline=dict(event.baseline),
    )


def gateway_status_record(origin: Origin, seq: int, now: float, status: GatewayStatusMessage) -> GatewayStatusRecord:
    """The gateway's counters, stored (not published: the retained status topic carries them live)."""
    return GatewayStatusRecord(
        **_head(origin, seq, now), state=status.state, counters=status.counters, links=dict(status.links)
    )


def room_origin(site: str, room: str) -> Origin:
    return {"site": site, "room": room, "device": "_room", "model": "session", "kind": "session"}


def gateway_origin(site: str, gateway_id: str) -> Origin:
    return {"site": site, "room": "_gateway", "device": gateway_id, "model": "gateway", "kind": "gateway"}


def origin_for(site: str, room: str, device: str, spec: DeviceSpec) -> Origin:
    return {"site": site, "room": room, "device": device, "model": spec.model, "kind": str(spec.kind)}


# --- topics --------------------------------------------------------------------------------------------------


def device_topic(prefix: str, site: str, room: str, device: str, leaf: str) -> str:
    return f"{prefix}/{site}/{room}/{device}/{leaf}"


def gateway_topic(prefix: str, site: str, gateway_id: str) -> str:
    # "_gateway" cannot collide with a room: room names must start with a letter or digit.
    return f"{prefix}/{site}/_gateway/{gateway_id}/status"


PUBLISHED: tuple[type[Struct], ...] = (
    ReadingMessage,
    StatusMessage,
    WaveformMessage,
    AlarmMessage,
    SessionMessage,
    RoomModeMessage,
    GatewayStatusMessage,
    CommandReply,
)


def schema_document() -> dict[str, Any]:
    """The JSON Schema of every payload (`make schema` writes docs/mqtt-schema.json): what the gateway publishes,
    from the Structs above, and the commands it takes, from their pydantic models."""
    _, published = msgspec.json.schema_components(PUBLISHED, ref_template="#/$defs/{name}")
    commands = (DeviceCommand, RoomCommand)
    _, defs = models_json_schema([(m, "validation") for m in commands], ref_template="#/$defs/{model}")
    names = [m.__name__ for m in PUBLISHED] + [m.__name__ for m in commands]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Infusion Room Telemetry MQTT payloads",
        "oneOf": [{"$ref": f"#/$defs/{name}"} for name in names],
        "$defs": {**published, **defs["$defs"]},
    }
