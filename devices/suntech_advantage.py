"""SunTech Advantage OEM NIBP module: a polled binary protocol (protocol notes §4).

Wire layout:
- 9600 8N1, no flow control [2+]. Host -> module: `3A` + command + CS. Module -> host: `3E LEN data CS`, LEN the
  whole packet's length including `>`, LEN and CS (at most 0x43) [2+]. CS makes the sum of every byte 0 mod 256 [2+].
  The receiver scans for 0x3E, reads LEN, waits for LEN bytes, checks the sum; on a failure it drops one byte and
  scans again [2+].
- Commands [2+]: start (adult) `3A 20 A6`, get cuff pressure `3A 79 05 00 48`, get BP data `3A 79 03 00 4A`;
  abort `3A 79 01 00 4C` [1].
- Replies: 4-byte acknowledgements `3E 04 <char> CS`: `O` command received (a start is acknowledged so), `K`
  measurement finished: fetch the result [2+]; `A` abort, `B` busy (send again), `E` error, `N` invalid packet or
  checksum, `D` unrecognisable, `S` sleep, `T` timeout [1 each]. Cuff pressure `3E 05 LL HH CS`, signed 16-bit LE,
  -1 = no value [2+ layout, 1 for -1]. BP data: 24 bytes, LEN 0x18: SYS at 2 and DIA at 4 (uint16 LE), beats at 6,
  status at 7, test codes 8-15 [1], pulse rate at 16, MAP at 18 (uint16 LE), error code at 20 [2+].
- Error codes are DECIMAL (85-99), one implementation mixes them up with hex (pitfall §6.9). Categories follow the
  notes' table [1, vendor wording quoted in one implementation].

The driver owns the measurement cycle: `start_measurement(now)` queues the start; `outgoing(now)` sends it, then
polls the cuff pressure every 0.2 s while measuring; "K" fetches the result; a measurement that does not finish
within `measurement_timeout_s` becomes a `cuff_error` status with condition `timeout`, and the next one still runs.
A module is silent between measurements, so `stale_after_s` is large: its watchdog is the measurement timeout and
the gateway's `nibp_overdue` alarm.
"""

from __future__ import annotations

import re
from typing import ClassVar

from devices.base import (
    DeviceKind,
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    ErrorKind,
    Frame,
    FramedDriver,
    Model,
    ProtocolError,
    Reading,
    Record,
    Sample,
    SerialSettings,
    StatusRules,
)

SPEC = DeviceSpec(
    model="suntech-advantage",
    kind=DeviceKind.NIBP,
    title="SunTech Advantage OEM NIBP module",
    serves=("SunTech Advantage OEM NIBP module", "monitors built on it"),
    serial=SerialSettings(baudrate=9600),
    metrics=("nibp_systolic", "nibp_diastolic", "nibp_mean", "nibp_pulse_rate"),
    frame_interval_s=600.0,
    stale_after_s=3600.0,
)

START = 0x3E
HOST = 0x3A
MAX_LEN = 0x43
POLL_S = 0.2

ERRORS: dict[int, str] = {
    1: "weak_signal",
    2: "motion_artifact",
    3: "out_of_range",
    4: "timeout",
    85: "kinked_hose",
    86: "aborted",
    87: "cuff_leak",
    88: "timeout",
    89: "overpressure",
    90: "device_fault",
    91: "device_fault",
    97: "device_fault",
    99: "device_fault",
}
ACKS = {
    ord("O"): "command received",
    ord("K"): "measurement finished",
    ord("A"): "abort received",
    ord("B"): "busy",
    ord("E"): "error",
    ord("N"): "invalid packet or checksum",
    ord("D"): "unrecognisable command",
    ord("S"): "sleep",
    ord("T"): "timeout",
}


def checksum(data: bytes) -> int:
    return (0x100 - sum(data)) & 0xFF


def command(payload: bytes) -> bytes:
    """A host packet: `3A` + payload + the checksum that makes the sum 0."""
    body = bytes([HOST]) + payload
    return body + bytes([checksum(body)])


def reply(data: bytes) -> bytes:
    """A module packet: `3E LEN data CS`."""
    body = bytes([START, len(data) + 3]) + data
    return body + bytes([checksum(body)])


START_BP = command(b"\x20")
GET_PRESSURE = command(b"\x79\x05\x00")
GET_RESULT = command(b"\x79\x03\x00")
ABORT = command(b"\x79\x01\x00")


class SuntechDriver(FramedDriver):
    spec: ClassVar[DeviceSpec] = SPEC
    status_rules = StatusRules(details={DeviceState.OK: "measurement done"})
    sync = re.compile(rb"\x3e")
    no_frame = "bytes before a packet start"

    def reset(self) -> None:
        super().reset()
        self._queue: list[bytes] = []
        self._measuring_since: float | None = None
        self._next_poll = 0.0
        self._busy_retry: float | None = None
        self._last_command = b""
        self.cuff_pressure: int | None = None

    def start_measurement(self, now: float) -> bool:
        if self._measuring_since is not None:
            return False
        self._measuring_since = now
        self._queue.append(START_BP)
        self._next_poll = now + POLL_S
        self.announce(DeviceStatus(DeviceState.MEASURING, detail="measurement started"))
        return True

    def abort(self, now: float) -> None:
        self._queue.append(ABORT)

    def outgoing(self, now: float) -> bytes:
        if self._busy_retry is not None and now >= self._busy_retry:
            self._busy_retry = None
            self._queue.append(self._last_command)
        if self._measuring_since is not None:
            timeout = self.options.measurement_timeout_s
            if now - self._measuring_since > timeout:
                self._measuring_since = None
                self._queue.clear()
                detail = f"measurement did not finish in {timeout:g} s"
                self.announce(DeviceStatus(DeviceState.CUFF_ERROR, ("timeout",), detail=detail))
            elif now >= self._next_poll and not self._queue:
                self._queue.append(GET_PRESSURE)
                self._next_poll = now + POLL_S
        out = b"".join(self._queue)
        if self._queue:
            self._last_command = self._queue[-1]
        self._queue.clear()
        return out

    def decode_frame(self, buf: bytes, pos: int, now: float) -> tuple[int, Frame | None]:
        if len(buf) - pos < 2:
            return self.need(2)
        length = buf[pos + 1]
        if not 4 <= length <= MAX_LEN:
            return 1, ProtocolError(ErrorKind.RESYNC, f"impossible packet length {length}", buf[pos : pos + 1])
        if len(buf) - pos < length:
            return self.need(length)
        packet = buf[pos : pos + length]
        if sum(packet) & 0xFF:
            return 1, ProtocolError(ErrorKind.BAD_CHECKSUM, "packet checksum does not sum to 0", packet[:1])
        data = packet[2:-1]
        if length == 4:
            return length, self._ack(data[0], now)
        if length == 5:
            value = int.from_bytes(data, "little", signed=True)
            self.cuff_pressure = None if value == -1 else value
        elif length == 0x18:
            return length, self._result(packet)
        return length, None  # other documented replies (module data, version strings) carry nothing for us

    def _ack(self, char: int, now: float) -> ProtocolError | None:
        if char == ord("K") and self._measuring_since is not None:
            self._queue.append(GET_RESULT)
            return None
        if char == ord("B"):
            self._busy_retry = now + 0.5
            return None
        if char in (ord("O"), ord("A"), ord("K")):
            return None
        meaning = ACKS.get(char, f"unknown acknowledgement 0x{char:02x}")
        return ProtocolError(ErrorKind.MALFORMED, f"module answered {chr(char)!r}: {meaning}", bytes([char]))

    def _result(self, packet: bytes) -> Frame:
        self._measuring_since = None
        self.cuff_pressure = None
        code = packet[20]
        if code:
            category = ERRORS.get(code, "device_fault")
            return DeviceStatus(DeviceState.CUFF_ERROR, (category,), code, f"measurement failed: error {code}")
        sys_ = int.from_bytes(packet[2:4], "little")
        dia = int.from_bytes(packet[4:6], "little")
        mean = int.from_bytes(packet[18:20], "little")
        if not dia < mean < sys_:  # each value's own range is checked by FramedDriver against the spec
            return ProtocolError(ErrorKind.OUT_OF_RANGE, f"implausible result {sys_}/{dia} mean {mean}", packet)
        metrics = {"nibp_systolic": sys_, "nibp_diastolic": dia, "nibp_mean": mean, "nibp_pulse_rate": packet[16]}
        return Record(Reading({k: float(v) for k, v in metrics.items()}, raw=packet), code=0)


def encode(sample: Sample) -> bytes:
    """The 24-byte BP data reply for a sample (error code from sample.extra['nibp_error'])."""
    error = int(sample.extra.get("nibp_error", 0))
    m = sample.metrics

    def val(name: str) -> int:
        v = m.get(name)
        return 0 if v is None or error else round(v)

    data = (
        val("nibp_systolic").to_bytes(2, "little")
        + val("nibp_diastolic").to_bytes(2, "little")
        + bytes([30, 1])
        + bytes(8)
        + bytes([val("nibp_pulse_rate") & 0xFF, 0])
        + val("nibp_mean").to_bytes(2, "little")
        + bytes([error, 0, 0])
    )
    return reply(data)


class SuntechEmulator:
    """The module's side: acknowledges a start, inflates and deflates over `inflate_s`, says "K", gives results."""

    def __init__(self, inflate_s: float = 25.0) -> None:
        self.inflate_s = inflate_s
        self._started: float | None = None
        self._finished = False
        self._buf = bytearray()

    def tick(self, now: float, sample: Sample) -> bytes:
        if self._started is not None and not self._finished and now - self._started >= self.inflate_s:
            self._finished = True
            return reply(b"K")
        return b""

    def receive(self, data: bytes, now: float, sample: Sample) -> bytes:
        self._buf += data
        out = b""
        while self._buf:
            if self._buf[0] != HOST:
                del self._buf[0]
                continue
            size = {0x20: 3, 0x79: 5}.get(self._buf[1] if len(self._buf) > 1 else -1, 3)
            if len(self._buf) < size:
                break
            packet, self._buf = bytes(self._buf[:size]), self._buf[size:]
            out += self._answer(packet, now, sample)
        return out

    def _answer(self, packet: bytes, now: float, sample: Sample) -> bytes:
        if sum(packet) & 0xFF:
            return reply(b"N")
        if packet == START_BP:
            if self._started is not None and not self._finished:
                return reply(b"B")
            self._started, self._finished = now, False
            return reply(b"O")
        if packet == GET_PRESSURE:
            if self._started is None or self._finished:
                return reply((-1).to_bytes(2, "little", signed=True))
            t = (now - self._started) / self.inflate_s
            peak = (sample.metrics.get("nibp_systolic") or 120) + 30
            pressure = round(peak * (t / 0.3 if t < 0.3 else (1 - t) / 0.7))
            return reply(max(0, pressure).to_bytes(2, "little", signed=True))
        if packet == GET_RESULT:
            self._started = None
            return encode(sample)
        if packet == ABORT:
            self._finished = True
            return reply(b"A") + reply(b"K")
        return reply(b"D")


MODEL = Model(spec=SPEC, driver=SuntechDriver, encode=encode, emulator=SuntechEmulator)
