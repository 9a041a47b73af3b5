"""Contec CMS50D+ (firmware 4.6) / CMS50E / CMS50EW: the 115200 8N1 9-byte protocol V7.0 (protocol notes §3.2).

Wire layout:
- 115200 8N1, no handshake [2+]. No checksum ("the protocol assumes that data sending is correct") [1]; no capture
  shows one. The device streams only after the host's start command, 60 real-time packets a second [2+], and stops
  after about 30 s unless kept alive: the keep-alive AF every 5 s, or A1 again [2+].
- Every packet: byte 0 the type (b7 = 0), byte 1 the "high byte" (b7 = 1), then data bytes sent with b7 forced to 1;
  the real bit 7 of data byte k (k >= 2) is bit (k - 2) of byte 1 [2+]. Restored before anything is read.
- Real-time packet 0x01, 9 bytes [2+]: byte 2 b3..0 signal strength, b4 searching too long, b5 low SpO2, b6 beep,
  b7 probe error / finger out; byte 3 b6..0 pleth, b7 searching; byte 4 b3..0 bar graph, b4 PI invalid; byte 5 pulse
  rate (0xFF invalid); byte 6 SpO2 (0x7F invalid); bytes 7-8 PI x 100, low byte first (0xFFFF invalid).
- Finger out: real v4.6 devices send PR 0 and SpO2 0, not the spec's 0xFF/0x7F [2+]: both are treated as missing.
- Commands, 9 bytes, no checksum: `7D 81 CC 80 80 80 80 80 80` (A1 start, A2 stop, AF keep-alive) [2+].

Validation without a checksum: the bit-7 pattern (type b7 = 0, every other byte b7 = 1), a known type, and plausible
values. What that cannot catch: a flipped low bit in a value byte (a pulse of 61 instead of 60). Packets of other
types are skipped as a resync (their lengths are not in the notes).
"""

from __future__ import annotations

import re
from typing import ClassVar

from devices.base import (
    DeviceKind,
    DeviceSpec,
    DeviceState,
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
    Waveform,
)

MAX_PULSE = 254  # one byte, 0xFF meaning invalid

SPEC = DeviceSpec(
    model="contec-cms50",
    kind=DeviceKind.PULSE_OXIMETER,
    title="Contec CMS50 9-byte protocol V7.0",
    serves=("Contec CMS50D+ (v4.6 firmware)", "Contec CMS50E", "Contec CMS50EW"),
    serial=SerialSettings(baudrate=115200),
    metrics=("spo2", "pulse_rate", "perfusion_index"),
    frame_interval_s=1 / 60,
    stale_after_s=3.0,
    publish_interval_s=1.0,
    self_validating=False,  # no checksum: a random packet with the right bit-7 pattern can look plausible
    limits=(("pulse_rate", 1, MAX_PULSE), ("perfusion_index", 0, 22)),
)

REALTIME = 0x01
PACKET = 9
KEEPALIVE_S = 5.0
RESTART_AFTER_S = 2.0
HIGH_BITS = int.from_bytes(b"\x80" * (PACKET - 1), "little")
# Bit k of the high byte, spread to bit 7 of data byte k: the 7 bytes of high bits for each value of the high byte.
SPREAD = [sum(((h >> k) & 1) << (8 * k + 7) for k in range(PACKET - 2)) for h in range(128)]
# (restored byte, bit, flag) of a real-time packet, in the order the flags are listed
FLAGS = (
    (2, 0x80, "probe_off"),
    (3, 0x80, "searching"),
    (2, 0x10, "searching_too_long"),
    (2, 0x20, "device_alarm_spo2_low"),
)


def command(code: int) -> bytes:
    """A host command: type 0x7D, high byte 0x81 (the command code has bit 7 set), unused bytes as 0x80."""
    return bytes([0x7D, 0x81, code & 0x7F | 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80])


START = command(0xA1)
STOP = command(0xA2)
KEEPALIVE = command(0xAF)


def restore(packet: bytes) -> bytes:
    """The packet with each data byte's real bit 7 put back from the high byte."""
    data = int.from_bytes(packet[2:], "little") & ~HIGH_BITS | SPREAD[packet[1] & 0x7F]
    return packet[:2] + data.to_bytes(len(packet) - 2, "little")


def hide(data: bytes) -> bytes:
    """The wire form of a packet: bit 7 of each data byte moved into the high byte."""
    high = 0x80
    for k, b in enumerate(data[2:], 2):
        if b & 0x80:
            high |= 1 << (k - 2)
    return bytes([data[0], high]) + bytes(b | 0x80 for b in data[2:])


class ContecDriver(FramedDriver):
    spec: ClassVar[DeviceSpec] = SPEC
    status_rules = StatusRules((("probe_off", DeviceState.PROBE_OFF), ("searching", DeviceState.SEARCHING)))
    sync = re.compile(rb"\x01(?:[\x80-\xff]|\Z)")  # the type, then the high byte (bit 7 set), or not yet
    no_frame = "bytes before a real-time packet"

    def reset(self) -> None:
        super().reset()
        self._started = False
        self._next_keepalive = 0.0
        self._last_packet: float | None = None

    def outgoing(self, now: float) -> bytes:
        if not self._started or (self._last_packet is not None and now - self._last_packet > RESTART_AFTER_S):
            self._started = True
            self._last_packet = now  # give the device time to answer before asking again
            self._next_keepalive = now + KEEPALIVE_S
            return START
        if now >= self._next_keepalive:
            self._next_keepalive = now + KEEPALIVE_S
            return KEEPALIVE
        return b""

    def decode_frame(self, buf: bytes, pos: int, now: float) -> tuple[int, Frame | None]:
        if len(buf) - pos < PACKET:
            return self.need(PACKET)
        wire = buf[pos : pos + PACKET]
        if int.from_bytes(wire[1:], "little") & HIGH_BITS != HIGH_BITS:
            return 1, ProtocolError(ErrorKind.RESYNC, "bit-7 pattern broken inside a packet", wire[:1])
        self._last_packet = now
        data = restore(wire)
        flags = tuple(flag for at, bit, flag in FLAGS if data[at] & bit)
        metrics: dict[str, float] = {}
        if not data[2] & 0x80:  # with the finger out, nothing the device shows is the patient's
            pulse, spo2, pi_raw = data[5], data[6], data[7] | data[8] << 8
            if spo2 not in (0, 0x7F):  # real v4.6 devices send 0 with the finger out, not the spec's 0x7F
                metrics["spo2"] = spo2
            if pulse not in (0, 0xFF):
                metrics["pulse_rate"] = pulse
            if not data[4] & 0x10 and pi_raw != 0xFFFF:
                metrics["perfusion_index"] = pi_raw / 100
        pleth = Waveform("pleth", (data[3] & 0x7F,), 60.0)
        return PACKET, Record(Reading(metrics, flags, raw=wire), data[2], pleth)


def encode(sample: Sample) -> bytes:
    """One real-time packet, as the device sends it (finger out: PR 0 and SpO2 0, as real devices do)."""
    probe_off = "probe_off" in sample.conditions or "no_sensor" in sample.conditions
    searching = "searching" in sample.conditions
    spo2 = sample.metrics.get("spo2")
    pulse = sample.metrics.get("pulse_rate")
    pi = sample.metrics.get("perfusion_index")
    byte2 = 0x05 | (0x80 if probe_off else 0)
    pleth = 0x40 if probe_off else 0x30
    byte3 = pleth | (0x80 if searching else 0)
    pi_raw = 0xFFFF if pi is None or probe_off or searching else round(pi * 100)
    byte4 = 0x03 | (0x10 if pi_raw == 0xFFFF else 0)
    if probe_off:
        pr_byte, spo2_byte = 0, 0
    else:
        pr_byte = 0xFF if pulse is None or searching else min(MAX_PULSE, round(pulse))
        spo2_byte = 0x7F if spo2 is None or searching else round(spo2)
    data = bytes([REALTIME, 0, byte2, byte3, byte4, pr_byte, spo2_byte, pi_raw & 0xFF, pi_raw >> 8])
    return hide(data)


class ContecEmulator:
    """The device side: silent until A1, then 60 packets a second; stops on A2 or 30 s without A1 or AF."""

    def __init__(self) -> None:
        self._alive_until: float | None = None
        self._next = 0.0
        self._buf = bytearray()

    def tick(self, now: float, sample: Sample) -> bytes:
        if self._alive_until is None or now > self._alive_until:
            self._alive_until = None
            return b""
        out = b""
        while self._next <= now + 1e-9:
            out += encode(sample)
            self._next += 1 / 60
        return out

    def receive(self, data: bytes, now: float, sample: Sample) -> bytes:
        self._buf += data
        while len(self._buf) >= PACKET:
            if self._buf[0] != 0x7D:
                del self._buf[0]
                continue
            code = restore(bytes(self._buf[:PACKET]))[2]
            del self._buf[:PACKET]
            if code in (0xA1, 0xAF):
                if self._alive_until is None:
                    self._next = now
                if code == 0xA1 or self._alive_until is not None:
                    self._alive_until = now + 30.0
            elif code == 0xA2:
                self._alive_until = None
        return b""


MODEL = Model(spec=SPEC, driver=ContecDriver, encode=encode, emulator=ContecEmulator)
