"""Events, device specs and the driver contract shared by every device model.

This package is pure: no asyncio, serial, MQTT or HTTP imports (tests/devices/test_purity.py enforces it), so a
driver can be fed bytes from a capture file, a test vector or a live port alike, and tested without sleeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Protocol


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

    def outgoing(self, now: float) -> bytes: ...

    def reset(self) -> None: ...

    def flush(self) -> list[Event]: ...


class MeasuringDriver(Driver, Protocol):
    """A device that measures on request (NIBP). The driver owns the measurement cycle; the gateway decides when."""

    def start_measurement(self, now: float) -> bool:
        """Begin a measurement; False (and nothing sent) when one is already running."""
        ...


class FramedDriver(ABC):
    """Buffering and resync shared by all drivers, at a cost linear in the bytes fed, whatever the split.

    Subclasses implement `_decode(buf, pos, now) -> (consumed, events)` on the bytes from `buf[pos]` on;
    consumed == 0 means "need more bytes". A round of `feed` copies the unconsumed bytes once and walks them by
    offset, so a 4 KiB read of small frames is not copied once per frame. Linear cost needs two more things of a
    subclass, since a byte left unconsumed is looked at again on every later read:
    - skipped bytes are consumed, not left in the buffer: `_hold` keeps a run of noise (reported whole by
      `_release` when a frame start ends it, in pieces of `max_buffer` bytes) so the events do not depend on the
      split; what waits in the buffer is at most one frame;
    - a decode that waits may say what it waits for (`_need`: this many bytes from `pos`; `_until`: a byte such as
      LF), and is not called again until that arrives. It must return (0, []) on any shorter input.
    `examined` counts the bytes copied into rounds plus the bytes the subclass's resync scans searched (they add
    their spans): a deterministic measure of decoding work that tests compare across read sizes.
    The buffer cap here guarantees memory stays bounded even if a subclass waits forever.
    """

    spec: ClassVar[DeviceSpec]
    max_buffer: ClassVar[int] = 4096

    def __init__(self) -> None:
        self._buf = bytearray()
        self._held = bytearray()
        self._need = 0
        self._until: int | None = None
        self.fed = 0  # bytes given to feed
        self.examined = 0  # bytes copied into decode rounds or searched by resync scans

    def reset(self) -> None:
        self._buf.clear()
        self._held.clear()
        self._need, self._until = 0, None

    def outgoing(self, now: float) -> bytes:
        return b""

    def flush(self) -> list[Event]:
        """End of input (a capture file ends): what is left in the buffer is a truncated frame, said so."""
        left = bytes(self._held + self._buf)
        self._buf.clear()
        self._held.clear()
        self._need, self._until = 0, None
        if not left:
            return []
        return [ProtocolError(ErrorKind.MALFORMED, f"input ended inside a frame ({len(left)} bytes)", left)]

    def feed(self, data: bytes, now: float) -> list[Event]:
        self.fed += len(data)
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need and (self._until is None or self._until not in data):
                return []  # what the last decode waits for has not arrived: it would return (0, []) again
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = bytes(data)  # no copy when data is bytes already
        self.examined += len(buf)
        events: list[Event] = []
        pos = 0
        while pos < len(buf):
            self._need, self._until = 0, None
            try:
                consumed, new = self._decode(buf, pos, now)
            except Exception as exc:  # a driver bug must not take the gateway down or lose the stream
                self._need, self._until = 0, None
                consumed, new = 1, [ProtocolError(ErrorKind.MALFORMED, f"decoder error: {exc!r}", buf[pos : pos + 1])]
            events.extend(new)
            if consumed <= 0:
                break
            pos += consumed
        if pos < len(buf):
            self._buf += buf[pos:]  # at most a frame: skipped bytes are held (`_hold`), not left here
        else:
            self._need, self._until = 0, None  # a hint holds only while its decode waits
        if len(self._buf) > self.max_buffer:
            events.append(
                ProtocolError(ErrorKind.OVERFLOW, f"no frame end within {self.max_buffer} bytes", bytes(self._buf))
            )
            self._buf.clear()
            self._need, self._until = 0, None
        return events

    def _hold(self, data: bytes) -> list[Event]:
        """Skipped bytes join the current run of noise; a run reaching `max_buffer` bytes is reported then."""
        self._held += data
        if len(self._held) < self.max_buffer:
            return []
        return self._release(f"no frame start within {self.max_buffer} bytes")

    def _release(self, detail: str) -> list[Event]:
        """The run of noise ends (a frame start follows it, or the run is long enough): one RESYNC error."""
        if not self._held:
            return []
        error = ProtocolError(ErrorKind.RESYNC, detail, bytes(self._held))
        self._held.clear()
        return [error]

    @abstractmethod
    def _decode(self, buf: bytes, pos: int, now: float) -> tuple[int, list[Event]]: ...


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
class DriverOptions:
    """Per-device settings a driver needs from the gateway's config (typed, validated there)."""

    measurement_timeout_s: float = 180.0


@dataclass(frozen=True, slots=True)
class Model:
    """A registry entry: everything the gateway, `decode` and `simulate` need for one model.

    `encode` turns one sample into one record on the wire (the unit the driver decodes into one Reading).
    `emulator` builds the device side for simulators; None means a StreamingEmulator of `encode` at the spec's
    frame interval (output-only devices).
    """

    spec: DeviceSpec
    driver: Callable[[], Driver]
    encode: Callable[[Sample], bytes]
    emulator: Callable[[], Emulator] | None = None
    # Models whose driver takes per-device options (a cuff's measurement timeout); None: `driver()` as it is.
    configured_driver: Callable[[DriverOptions], Driver] | None = None

    def make_driver(self, options: DriverOptions | None = None) -> Driver:
        if options is not None and self.configured_driver is not None:
            return self.configured_driver(options)
        return self.driver()

    def make_emulator(self) -> Emulator:
        if self.emulator is not None:
            return self.emulator()
        return StreamingEmulator(self.encode, self.spec.frame_interval_s)
