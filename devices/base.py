"""Events, device specs and the driver contract shared by every device model.

This package is pure: no asyncio, serial, MQTT or HTTP imports (tests/devices/test_purity.py enforces it), so a
driver can be fed bytes from a capture file, a test vector or a live port alike, and tested without sleeping.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable


class DeviceKind(StrEnum):
    PULSE_OXIMETER = "pulse_oximeter"
    NIBP = "nibp"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A canonical metric: its IEEE 11073-10101 code, UCUM unit and the range a real device can report.

    The range is a corruption check, not a clinical limit: a value outside it means the frame is damaged.
    """

    name: str
    mdc_ref: str
    mdc_code: int
    unit: str
    low: float
    high: float


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec("spo2", "MDC_PULS_OXIM_SAT_O2", 150456, "%", 1, 100),
        MetricSpec("pulse_rate", "MDC_PULS_OXIM_PULS_RATE", 149530, "/min", 1, 300),
        MetricSpec("perfusion_index", "MDC_PULS_OXIM_PERF_REL", 150448, "%", 0, 30),
        MetricSpec("nibp_systolic", "MDC_PRESS_BLD_NONINV_SYS", 150021, "mm[Hg]", 20, 300),
        MetricSpec("nibp_diastolic", "MDC_PRESS_BLD_NONINV_DIA", 150022, "mm[Hg]", 10, 250),
        MetricSpec("nibp_mean", "MDC_PRESS_BLD_NONINV_MEAN", 150023, "mm[Hg]", 15, 270),
        MetricSpec("nibp_pulse_rate", "MDC_PULS_RATE_NON_INV", 149546, "/min", 1, 300),
    )
}


@dataclass(frozen=True, slots=True)
class SerialSettings:
    baudrate: int
    bytesize: int = 8
    parity: str = "N"  # pyserial's letters: N, E, O, M, S
    stopbits: float = 1
    xonxoff: bool = False
    rtscts: bool = False


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """What the gateway must know about a model without reading its code."""

    model: str
    kind: DeviceKind
    title: str
    serves: tuple[str, ...]  # device names an operator would recognise
    serial: SerialSettings
    metrics: tuple[str, ...]
    frame_interval_s: float  # nominal time between records on the wire
    # False for protocols with neither checksum nor a rich text structure (Nonin DF8): there, random bytes can
    # form a plausible record, and only range and pattern checks stand between noise and a reading.
    stale_after_s: float  # silence longer than this means "no data"
    # Devices that send numerics faster than this are thinned by the gateway to the latest reading per interval;
    # None publishes every record (the 1-a-second devices, NIBP results).
    publish_interval_s: float | None = None
    self_validating: bool = True
    # Narrower ranges than METRICS where the wire format cannot carry the whole range (a one-byte pulse rate).
    limits: tuple[tuple[str, float, float], ...] = ()

    def range_of(self, metric: str) -> tuple[float, float]:
        for name, low, high in self.limits:
            if name == metric:
                return low, high
        return METRICS[metric].low, METRICS[metric].high


# --- events --------------------------------------------------------------------------------------------------


class DeviceState(StrEnum):
    """The one-word state of a device. Conditions (see DeviceStatus) qualify it."""

    OK = "ok"
    PROBE_OFF = "probe_off"  # sensor attached to the device but not on the patient
    NO_SENSOR = "no_sensor"  # no sensor or cable connected
    SENSOR_FAULT = "sensor_fault"  # defective, unrecognised or incompatible sensor or cable
    SEARCHING = "searching"  # looking for a pulse; values not yet valid
    CUFF_ERROR = "cuff_error"
    MEASURING = "measuring"
    CONNECTED = "connected"  # port open, nothing decoded yet
    NO_DATA = "no_data"  # port open but silent for longer than the model's stale_after_s
    DISCONNECTED = "disconnected"  # port cannot be opened or was lost


# Flags that make a reading unfit for a physiological alarm: the value may be wrong or held.
QUALITY_FLAGS: frozenset[str] = frozenset(
    {
        "probe_off",
        "no_sensor",
        "sensor_fault",
        "searching",
        "interference",
        "low_signal_iq",
        "low_perfusion",
        "artifact",
        "out_of_track",
        "ambient_light",
    }
)


@dataclass(frozen=True, slots=True)
class Reading:
    """Decoded values of one record. Only values the device marked as available are in `metrics`."""

    metrics: Mapping[str, float]
    flags: tuple[str, ...] = ()
    device_time: str | None = None  # the device's own clock, as it said it (no zone), kept beside ours
    raw: bytes = b""

    @property
    def trustworthy(self) -> bool:
        return not QUALITY_FLAGS.intersection(self.flags)


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    state: DeviceState
    conditions: tuple[str, ...] = ()
    code: int | None = None  # the device's own status or error code, where it has one
    detail: str = ""


class ErrorKind(StrEnum):
    BAD_CHECKSUM = "bad_checksum"
    RESYNC = "resync"  # bytes skipped while looking for a frame start
    MALFORMED = "malformed"  # framed, but not a record of this protocol
    OUT_OF_RANGE = "out_of_range"  # a value outside the spec's plausible range: the frame is damaged
    OVERFLOW = "overflow"  # no frame end within the buffer cap


@dataclass(frozen=True, slots=True)
class ProtocolError:
    kind: ErrorKind
    detail: str
    dropped: bytes = b""


@dataclass(frozen=True, slots=True)
class Waveform:
    """Consecutive samples of one waveform (pleth), in device units, as decoded from one or more frames."""

    name: str  # "pleth"
    samples: tuple[int, ...]
    rate_hz: float


Event = Reading | DeviceStatus | ProtocolError | Waveform


def event_to_dict(event: Event) -> dict[str, Any]:
    """The JSON form used by `decode`, test vectors and logs."""
    if isinstance(event, Reading):
        out: dict[str, Any] = {"type": "reading", "metrics": dict(event.metrics), "flags": list(event.flags)}
        if event.device_time is not None:
            out["device_time"] = event.device_time
        return out
    if isinstance(event, DeviceStatus):
        out = {"type": "status", "state": str(event.state), "conditions": list(event.conditions)}
        if event.code is not None:
            out["code"] = event.code
        if event.detail:
            out["detail"] = event.detail
        return out
    if isinstance(event, Waveform):
        return {"type": "waveform", "name": event.name, "rate_hz": event.rate_hz, "samples": list(event.samples)}
    return {"type": "protocol_error", "kind": str(event.kind), "detail": event.detail, "dropped": event.dropped.hex()}


# --- drivers -------------------------------------------------------------------------------------------------


class Driver(Protocol):
    """Turns bytes into events. `feed` is total: it never raises, whatever the bytes."""

    spec: ClassVar[DeviceSpec]

    def feed(self, data: bytes, now: float) -> list[Event]: ...

    def reset(self) -> None: ...

    def flush(self) -> list[Event]: ...


@runtime_checkable
class Polling(Protocol):
    """A driver that talks to its device (a start command, a keep-alive, a poll). The session asks it about every
    0.2 s what to send, and for the events time alone made (`poll`: a measurement started or timed out), since a
    device that never answers sends nothing to `feed`."""

    def outgoing(self, now: float) -> bytes: ...

    def poll(self, now: float) -> list[Event]: ...


@runtime_checkable
class Measuring(Protocol):
    """A device that measures on request (NIBP). The driver owns the measurement cycle; the gateway decides when."""

    def start_measurement(self, now: float) -> bool:
        """Begin a measurement; False (and nothing sent) when one is already running."""
        ...


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """Per-device settings a driver needs from the gateway's config (typed, validated there)."""

    measurement_timeout_s: float = 180.0


class DriverFactory(Protocol):
    """How a driver is made: a driver class is one (its constructor takes the options, all defaulted)."""

    def __call__(self, options: DriverOptions = ...) -> Driver: ...


DEFAULT_OPTIONS = DriverOptions()


@dataclass(frozen=True, slots=True)
class StatusRules:
    """How a model's reading flags name the device's state: the first of `states` whose flag is present wins (else
    OK), the `conditions` present qualify it, `details` words each state for the log."""

    states: tuple[tuple[str, DeviceState], ...] = ()
    conditions: tuple[str, ...] = ()
    details: Mapping[DeviceState, str] = field(default_factory=dict)

    def of(self, flags: tuple[str, ...]) -> tuple[DeviceState, tuple[str, ...]]:
        state = next((s for flag, s in self.states if flag in flags), DeviceState.OK)
        return state, tuple(c for c in self.conditions if c in flags)


class Record(NamedTuple):
    """One decoded record: its reading, the device's own status code, and the pleth samples it carried."""

    reading: Reading
    code: int | None = None
    waveform: Waveform | None = None


# What `decode_frame` found at a frame start: a record, a status of its own (a cuff error), or why it was no frame.
Frame = Record | DeviceStatus | ProtocolError

SYNC_SPAN = 16  # the longest match a `sync` pattern may make (see FramedDriver._to_frame_start)
# The detail of a run of noise that starts with a match of `sync` rejected for this reason.
REJECTED = {ErrorKind.BAD_CHECKSUM: "bad checksum", ErrorKind.OUT_OF_RANGE: "implausible values"}
OK_STATE: tuple[DeviceState, tuple[str, ...]] = (DeviceState.OK, ())
RESYNC = ErrorKind.RESYNC  # a module constant: an enum member looked up on its class costs a call in the hot path


class FramedDriver(ABC):
    """Everything a driver does besides decoding one frame, at a cost linear in the bytes fed, whatever the split.

    A model gives its `spec`, `status_rules`, `sync` (where a frame can start) and `decode_frame`; this class:
    - finds frame starts with one C-level search of `sync` (None: a frame can start anywhere, as in a line
      protocol or a locked stream; `reject` may turn down a match, in the search, when a checksum or value there
      tells), and keeps the bytes skipped on the way as one run of noise, reported as one ProtocolError when a
      frame ends it (or in pieces of `max_buffer` bytes), so the events do not depend on how reads split the
      stream; `skip` adds bytes a decode rejected to that run;
    - buffers at most one frame between reads (what waits is cut off as OVERFLOW past `max_buffer` bytes), and does
      not call a decode again before what it said it waits for (`need`) has arrived;
    - checks every value of a Record against `spec.range_of` (outside: the frame is damaged, OUT_OF_RANGE, and the
      record is dropped whole), derives the device status from its flags and reports it only when the state or
      conditions change, then the reading and its waveform;
    - hands over events that time made (`announce`: a measurement started) with the next `feed` or `poll`.
    `examined` counts the bytes copied into decode rounds plus the bytes searched (sync searches, and what a decode
    adds): a deterministic measure of decoding work that tests compare across read sizes.
    """

    spec: ClassVar[DeviceSpec]
    status_rules: ClassVar[StatusRules] = StatusRules()
    # Where a frame can start: at most SYNC_SPAN bytes, with the branches cut short by the end of the input (`\Z`)
    # so that a partial start waits for its next byte. A locked stream may set it to None on the instance.
    sync: re.Pattern[bytes] | None = None
    no_frame: ClassVar[str] = "no frame start"  # the detail of a run of skipped bytes that no decode rejected
    max_buffer: ClassVar[int] = 4096

    def __init__(self, options: DriverOptions = DEFAULT_OPTIONS) -> None:
        self.options = options
        self.ranges = {name: self.spec.range_of(name) for name in self.spec.metrics}  # the spec's, looked up once
        self._buf = bytearray()
        self._held = bytearray()
        self._run: tuple[ErrorKind, str] = (ErrorKind.RESYNC, self.no_frame)
        self._need = 0
        self._until: int | None = None
        self._state: tuple[DeviceState, tuple[str, ...]] | None = None
        self._announced: list[Event] = []
        self._events: list[Event] = []
        self._rejects = type(self).reject is not FramedDriver.reject
        self.fed = 0  # bytes given to feed
        self.examined = 0  # bytes copied into decode rounds or searched
        self._released = 0  # bytes of noise reported so far
        self.reset()

    @abstractmethod
    def decode_frame(self, buf: bytes, pos: int, now: float) -> tuple[int, Frame | None]:
        """Decode the frame that may start at `buf[pos]` (where `sync` matched): (bytes consumed, what it was).

        (0, None) waits for more bytes (`return self.need(n)` says how many); (n, None) consumes bytes that carry
        nothing (an acknowledgement, a blank line); a candidate that is no frame is either one ProtocolError of its
        own (`return 1, ProtocolError(...)`) or joins the run of noise (`return self.skip(buf[pos : pos + 1], ...)`).
        """

    def reset(self) -> None:
        """The port was (re)opened: nothing buffered belongs to the new stream, and the status is announced again.
        Also called by __init__: a model sets up its own state by extending this."""
        self._buf.clear()
        self._held.clear()
        self._need, self._until = 0, None
        self._state = None

    def flush(self) -> list[Event]:
        """End of input (a capture file ends): what is left in the buffer is a truncated frame, said so."""
        left = bytes(self._held + self._buf)
        self.reset()
        if not left:
            return []
        return [ProtocolError(ErrorKind.MALFORMED, f"input ended inside a frame ({len(left)} bytes)", left)]

    def poll(self, now: float) -> list[Event]:
        """The events time made since the last `feed` or `poll` (`announce`)."""
        if not self._announced:
            return []
        events, self._announced = self._announced, []
        return events

    def feed(self, data: bytes, now: float) -> list[Event]:
        self.fed += len(data)
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need and (self._until is None or self._until not in data):
                return []  # what the decode waits for has not come (time-made events wait for `poll` or more)
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = bytes(data)  # no copy when data is bytes already
        events = self._events = self.poll(now) if self._announced else []
        self.examined += len(buf)
        pos, end = 0, len(buf)
        held = self._held
        self._need, self._until = 0, None  # set again only by a decode that waits (and so ends the loop)
        while pos < end:
            sync = self.sync
            if sync is not None:
                pos, found = self._to_frame_start(sync, buf, pos, now)
                if not found:
                    continue
            noise = len(held)
            try:
                consumed, frame = self.decode_frame(buf, pos, now)
            except Exception as exc:  # a driver bug must not take the gateway down or lose the stream
                self._need, self._until = 0, None
                consumed, frame = 1, ProtocolError(ErrorKind.MALFORMED, f"decoder error: {exc!r}", buf[pos : pos + 1])
            if consumed <= 0:
                break
            pos += consumed
            if len(held) != noise:
                continue  # the decode put what it consumed into the run of noise
            if noise:  # a frame, or a candidate rejected on its own, ends the run
                self._release()
            if frame is None:
                continue
            if type(frame) is ProtocolError:
                events.append(frame)
            elif type(frame) is Record:  # inline: values in range, status on change, reading, waveform
                reading = frame.reading
                if not self._in_range(reading):
                    continue
                state = self.status_rules.of(reading.flags) if reading.flags else OK_STATE
                if state != self._state:
                    self._state = state
                    detail = self.status_rules.details.get(state[0], "")
                    events.append(DeviceStatus(state[0], state[1], frame.code, detail))
                events.append(reading)
                if frame.waveform is not None:
                    events.append(frame.waveform)
            elif isinstance(frame, DeviceStatus):
                self._status(frame, events)
        if pos < end:
            self._buf += buf[pos:]  # at most a frame: skipped bytes are held (`skip`), not left here
            if len(self._buf) > self.max_buffer:
                events.append(
                    ProtocolError(ErrorKind.OVERFLOW, f"no frame end within {self.max_buffer} bytes", bytes(self._buf))
                )
                self._buf.clear()
                self._need, self._until = 0, None
        else:
            self._need, self._until = 0, None  # a hint holds only while its decode waits
        return events

    @property
    def skipped(self) -> int:
        """Bytes ever put into runs of noise (a decode may count from a mark of its own)."""
        return self._released + len(self._held)

    def need(self, count: int, until: int | None = None) -> tuple[int, None]:
        """For decode_frame to return while it waits: not called again at this position before `count` bytes from
        it are there, or the byte `until` (a line's LF) arrives. The decode must wait on any shorter input."""
        self._need, self._until = count, until
        return 0, None

    def skip(self, data: bytes, kind: ErrorKind = ErrorKind.RESYNC, detail: str = "") -> tuple[int, None]:
        """For decode_frame: bytes that are no frame join the run of noise; a run that starts here is reported with
        this kind and detail. Returns (len(data), None), what the decode returns when `data` is what it consumed."""
        self._hold(data, kind, detail)
        return len(data), None

    def announce(self, event: Event) -> None:
        """An event that time made, not bytes (a measurement started, one timed out): out with the next `poll`, or
        first in the next feed that decodes. Statuses are reported only on change, as decoded ones are."""
        if isinstance(event, DeviceStatus):
            self._status(event, self._announced)
        else:
            self._announced.append(event)

    def reject(self, buf: bytes, i: int, skipped: int, now: float) -> ErrorKind | None:
        """Optional: why no frame can start at this match of `sync` (a bad checksum, implausible values, no frame
        start), or None to have decode_frame look. Called in the search, so that noise costs no decode; `skipped` is
        `self.skipped` as it will be when the bytes before `i` are skipped. A run of noise that starts with a
        rejected match is reported with its kind."""
        return None

    def _to_frame_start(self, sync: re.Pattern[bytes], buf: bytes, pos: int, now: float) -> tuple[int, bool]:
        """Skips the bytes from `pos` to where a frame may start (True) or to where the run of noise reaches
        `max_buffer` bytes (False). The search ends SYNC_SPAN bytes past that cap, so a large read of noise is
        searched once, not to its end once per run piece; a match cut short by that end (`\\Z`) starts at or past
        the cap and does not count. A run that starts with a rejected match has the kind of that rejection."""
        end = len(buf)
        limit = pos + self.max_buffer - len(self._held)
        limit = end if limit > end else limit
        stop = end if limit + SYNC_SPAN > end else limit + SYNC_SPAN
        m = sync.search(buf, pos, stop)
        why, found = RESYNC, True
        if not self._rejects:
            if m is None or (i := m.start()) >= limit:
                i, found = limit, False
        else:
            while m is not None and (i := m.start()) < limit:
                rejected = self.reject(buf, i, self.skipped + i - pos, now)
                if rejected is None:
                    break
                if i == pos:
                    why = rejected
                m = sync.search(buf, i + 1, stop)
            else:
                i, found = limit, False
        if i > pos:
            self.examined += i - pos
            self._hold(buf[pos:i], why)
        return i, found

    def _hold(self, data: bytes, kind: ErrorKind, detail: str = "") -> None:
        if not self._held:
            self._run = (kind, detail or REJECTED.get(kind, self.no_frame))
        self._held += data
        if len(self._held) >= self.max_buffer:
            self._release()

    def _release(self) -> None:
        dropped = bytes(self._held)
        self._held.clear()
        self._released += len(dropped)
        self._events.append(ProtocolError(*self._run, dropped))

    def _in_range(self, reading: Reading) -> bool:
        """Every value against the spec's range: one outside means the frame is damaged (and is said so)."""
        for name, value in reading.metrics.items():
            low, high = self.ranges.get(name) or self.spec.range_of(name)
            if not low <= value <= high:
                detail = f"{name} {value:g} outside {low:g}..{high:g}: the frame is damaged"
                self._events.append(ProtocolError(ErrorKind.OUT_OF_RANGE, detail, reading.raw))
                return False
        return True

    def _status(self, status: DeviceStatus, out: list[Event]) -> None:
        state = (status.state, status.conditions)
        if state != self._state:
            self._state = state
            out.append(status)


# --- simulation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """What a simulated device shows at one instant: canonical metrics (None = not available) and conditions
    such as "probe_off" or "searching"."""

    metrics: Mapping[str, float | None]
    conditions: frozenset[str] = frozenset()
    device_time: datetime | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class Emulator(Protocol):
    """The device side of a protocol, for simulators. Pure like a driver; `now` is scenario time in seconds.

    `tick` returns what the device sends of its own accord by `now` (a record a second, a pleth stream while
    started, a finished acknowledgement); `receive` takes the host's bytes and returns the device's immediate
    replies. A device that only answers commands returns b"" from `tick` until it has something to say.
    """

    def tick(self, now: float, sample: Sample) -> bytes: ...

    def receive(self, data: bytes, now: float, sample: Sample) -> bytes: ...


class StreamingEmulator:
    """An output-only device: one `encode(sample)` every `interval_s`, whatever the host sends."""

    def __init__(self, encode: Callable[[Sample], bytes], interval_s: float) -> None:
        self._encode = encode
        self._interval = interval_s
        self._next: float | None = None

    def tick(self, now: float, sample: Sample) -> bytes:
        if self._next is None:
            self._next = now
        out = b""
        while now >= self._next - 1e-9:
            out += self._encode(sample)
            self._next += self._interval
        return out

    def receive(self, data: bytes, now: float, sample: Sample) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Model:
    """A registry entry: everything the gateway, `decode` and `simulate` need for one model.

    `encode` turns one sample into one record on the wire (the unit the driver decodes into one Reading).
    `emulator` builds the device side for simulators; None means a StreamingEmulator of `encode` at the spec's
    frame interval (output-only devices).
    """

    spec: DeviceSpec
    driver: DriverFactory  # `model.driver()`, or `model.driver(DriverOptions(...))` with a device's own settings
    encode: Callable[[Sample], bytes]
    emulator: Callable[[], Emulator] | None = None

    def make_emulator(self) -> Emulator:
        if self.emulator is not None:
            return self.emulator()
        return StreamingEmulator(self.encode, self.spec.frame_interval_s)
