"""Nonin pulse oximeters' serial data formats 2, 7 and 8 (OEM III, Xpod 3012, 7500, Onyx II 9560, WristOx2 3150).

Wire layout (protocol notes §2; sources in tests/vectors/nonin_df*.json). 9600 8N1, no flow control [2+].

DF2 and DF7 [2+]: 5-byte frames, 75 frames/s, 25 frames = one packet (3 packets/s).
- DF2 frame `01 STATUS PLETH FLOAT CHK`; DF7 frame `STATUS PLETH_MSB PLETH_LSB FLOAT CHK` (no start byte).
  CHK = sum of the first four bytes mod 256. STATUS has bit 7 set; FLOAT has bit 7 clear (in DF7 the notes only
  give the float table's bit layouts, all 7-bit: requiring it there is [guess], and it is what keeps a DF2
  stream from passing as DF7 frames). Bit 7 alone cannot find frames, pleth and CHK take any value.
- STATUS bits: 6 SNSD sensor disconnect (OEM III; [1], reserved on the 9560), 5 ARTF, 4 OOT, 3 SNSA sensor alarm,
  2:1 perfusion (01 green, 11 yellow, 10 red, 00 no pulse marker; present for 12 frames per pulse), 0 SYNC (set
  on frame 1 of a packet only).
- FLOAT by frame: 1/2 HR (recording), 3 SpO2, 4 firmware revision, 6/7 timer, 8 STAT2 (b0 LOW BAT, b5 SPA),
  9 SpO2-D, 10 SpO2 fast, 11 SpO2 beat-to-beat, 14/15 E-HR, 16 E-SpO2, 17 E-SpO2-D, 20/21 HR-D, 22/23 E-HR-D.
  HR = ((MSB & 0x03) << 7) | (LSB & 0x7F); missing HR = 511, missing SpO2 = 127 [2+].
- We report the 4-beat display values (SpO2-D frame 9, HR-D frames 20/21): they are what the device's own screen
  shows and what DF8 sends, so one oximeter reads the same in every format, and they follow a desaturation
  faster than the 8-beat E-*-D values Pufferfish uses. Display values hold the last reading for 10 s after the
  finger comes off (with SNSA set), so SNSA/SNSD always flag the reading (probe_off / no_sensor).
- Framing: slide ONE byte until header and checksum agree; a packet starts at a frame with SYNC; then 5-byte
  steps. A bad frame drops the lock (the partial packet's frames join the skipped bytes); a SYNC frame mid-packet
  means frames were lost: the partial packet is reported and a new one starts [2+].

DF8 [2+]: 4 bytes once a second, `STATUS1 HR SpO2 STATUS2`, NO checksum. STATUS1: b7 = 1, b6 SNSD ([1],
drphrozen; reserved in the 9560 spec), b5 OOT, b4 LPRF (low perfusion), b3 MPRF (marginal), b2 ARTF, b1:0 HR
bits 8:7. HR and SpO2 bytes have b7 = 0. STATUS2: b7 = 0, b5 SPA, b3 SNSA, b0 LOW BAT; b2 spot-check mode and
b1 battery critical are [1] (drphrozen, other models); b6 and b4 are named by no source. The bit-7 pattern and
the value ranges let 1 offset in 35 of uniform noise pass as a record (read as such, 22,000 readings per MB of
noise, one a second at 9600 baud), so what a record must prove depends on what came before it:
- in lock (the previous record ended where this one starts, nothing skipped since): the bit-7 pattern and the
  value ranges (METRICS, or the missing codes). A locked device is never dropped for what it says.
- after at most QUICK_RESYNC_BYTES skipped bytes (a port opened mid-record, a damaged or lost byte): one record,
  which must also not have LPRF and MPRF together [guess: they are alternative levels], and must follow one of
  the last two accepted records that are at most REF_FRESH_S old (`_follows`: slow status bits unchanged, SpO2
  and HR within SPO2_STEP / HR_STEP; two, because the last may be noise read in lock); with no such record (a
  connect, or after a silence), STATUS2 b6 and b4 must be clear instead [guess: unnamed bits read 0; a device
  that sets them only waits for the lock-in].
- after a longer run of bytes that were no records (noise, another format before the set-format command took
  effect): LOCK_IN_RECORDS consecutive records, each following the one before. The first LOCK_IN_RECORDS - 1 are
  held back (one RESYNC error), so a device's first reading after such a run comes 2 s late. In noise a 2-record
  lock-in passes 3 times per MB and each further record 1 time in 10^4: about once per 3 GB.
What this cannot catch, for want of a checksum: any flip of bits 0..6 that keeps the values plausible (SpO2 97
read as 96, HR 72 as 88, a status bit gained or lost); a noise burst whose first 4 bytes fit the pattern, read in
lock (1 burst in 36 that starts right after a record); on a fresh connection to a line that carries only noise,
a record among its first QUICK_RESYNC_BYTES + 1 offsets (1 connection in 10; 1 in 240 without a quality flag);
and, within QUICK_RESYNC_BYTES after such a reading, a record that follows it (1 in 600). Then the lock-in rule
applies. A reading or two cannot raise an alarm (every rule waits its `delay_s` on fresh data).

Host command [2+]: select data format `02 70 02 02 FF 03` (FF = 0x02, 0x07, 0x08, 0x0D), answered by ACK 0x06 or
NAK 0x15 only within the first 5 s after connecting; the format persists in the device, so a gateway sets it on
every connect. `outgoing(now)` returns it on its first call after construction/reset() and once more 2 s later
if no reply was seen ([guess]: the notes give no retry rule). A reply byte is recognised for REPLY_WINDOW_S after
the first send, where a frame would start (no frame of DF2/DF7/DF8 starts with 0x06 or 0x15), so it never breaks
the lock nor becomes data; a NAK becomes a ProtocolError saying the format was refused.

State from status bits (first wins): SNSD -> no_sensor (the bit cannot tell a broken sensor from an unplugged
one; "Sensor Disconnect" is its documented meaning, and the operator's first action, check the cable, is the
same), SNSA -> probe_off, OOT -> searching (flag out_of_track), both display values missing -> searching [guess].
Conditions: low_perfusion (red), marginal_perfusion (yellow), low_battery. In DF2/DF7 a perfusion colour holds
for PERFUSION_HOLD_PACKETS packets, because the marker comes once per pulse and would otherwise flicker between
packets; artifact is a per-packet flag only, not a condition, for the same reason.

Skipped bytes are reported as one ProtocolError per contiguous run, when the run ends (a frame locks, a reply
byte arrives) or reaches RUN_CAP bytes, so the events do not depend on how the stream is chunked. Trailing
garbage is reported once more bytes follow it.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import ClassVar

from devices.base import (
    METRICS,
    DeviceKind,
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    ErrorKind,
    Event,
    FramedDriver,
    Model,
    ProtocolError,
    Reading,
    Sample,
    SerialSettings,
    Waveform,
)

FORMAT_DF2 = 0x02
FORMAT_DF7 = 0x07
FORMAT_DF8 = 0x08
ACK = 0x06
NAK = 0x15
MISSING_HR = 511
MISSING_SPO2 = 127

FRAME_LEN = 5
FRAMES_PER_PACKET = 25
FRAME_RATE_HZ = 75.0
PACKET_INTERVAL_S = FRAMES_PER_PACKET / FRAME_RATE_HZ
DF8_LEN = 4

DEVICE_WINDOW_S = 5.0  # the device answers the set-format command only this long after connecting [2+]
RETRY_AFTER_S = 2.0  # [guess]
REPLY_WINDOW_S = 8.0  # how long after the first send a 0x06 / 0x15 byte counts as the reply
RUN_CAP = 1024  # a longer run of skipped bytes is reported in pieces (about 1 s of data)
PERFUSION_HOLD_PACKETS = 9  # 3 s: one pulse marker at 20 /min or more
# DF8 sync (module docstring). Steps and slow bits are [guess]es, generous on purpose: they only decide whether to
# trust the line again, never drop a record in lock.
QUICK_RESYNC_BYTES = 20  # five records' worth: a partial record at connect, a glitch
LOCK_IN_RECORDS = 3  # after a longer run of non-records: 2 s before the first reading
REF_FRESH_S = 5.0  # the DF8 spec's stale_after_s: an older record says nothing about the next one
SPO2_STEP = 10  # display SpO2 (4-beat average, updated every 1.5 s) between consecutive records, in %
HR_STEP = 40  # display HR between consecutive records, in /min

# Float byte per frame, 0-based frame index.
F_HR_MSB, F_HR_LSB, F_SPO2, F_SREV = 0, 1, 2, 3
F_TMR_MSB, F_TMR_LSB, F_STAT2 = 5, 6, 7
F_SPO2_D, F_SPO2_FAST, F_SPO2_BB = 8, 9, 10
F_EHR_MSB, F_EHR_LSB, F_ESPO2, F_ESPO2_D = 13, 14, 15, 16
F_HR_D_MSB, F_HR_D_LSB, F_EHR_D_MSB, F_EHR_D_LSB = 19, 20, 21, 22

# STATUS byte (DF2/DF7).
ST_SYNC = 0x01
ST_GPRF = 0x02
ST_RPRF = 0x04
ST_SNSA = 0x08
ST_OOT = 0x10
ST_ARTF = 0x20
ST_SNSD = 0x40
# STAT2 (frame 8 float) and DF8 STATUS2.
STAT2_LOW_BAT = 0x01
STAT2_SPA = 0x20
# DF8 STATUS1 / STATUS2.
S1_ARTF, S1_MPRF, S1_LPRF, S1_OOT, S1_SNSD = 0x04, 0x08, 0x10, 0x20, 0x40
S2_LOW_BAT, S2_BATT_CRITICAL, S2_SPOT_CHECK, S2_SNSA, S2_SPA = 0x01, 0x02, 0x04, 0x08, 0x20
S2_UNNAMED = 0x50  # b6, b4: named by no source
# Bits that hold for minutes (a sensor plugged, a battery state, a mode), not from one second to the next.
S1_SLOW = S1_SNSD
S2_SLOW = S2_LOW_BAT | S2_BATT_CRITICAL | S2_SPOT_CHECK

STATE_ORDER: tuple[tuple[str, DeviceState], ...] = (
    ("no_sensor", DeviceState.NO_SENSOR),
    ("probe_off", DeviceState.PROBE_OFF),
    ("out_of_track", DeviceState.SEARCHING),
    ("searching", DeviceState.SEARCHING),
)
CONDITIONS = ("low_perfusion", "marginal_perfusion", "low_battery")
STATE_DETAIL = {
    DeviceState.OK: "valid data",
    DeviceState.NO_SENSOR: "sensor disconnected or inoperable (SNSD)",
    DeviceState.PROBE_OFF: "sensor alarm: finger out or unusable signal (SNSA); display values are held",
    DeviceState.SEARCHING: "no valid pulse (out of track or values missing)",
}


# --- specs ---------------------------------------------------------------------------------------------------

SERVES = ("Nonin OEM III", "Nonin Xpod 3012", "Nonin 7500", "Nonin Onyx II 9560", "Nonin WristOx2 3150")

SPEC_DF2 = DeviceSpec(
    model="nonin-df2",
    kind=DeviceKind.PULSE_OXIMETER,
    title="Nonin data format 2 (5-byte frames, 8-bit pleth)",
    serves=SERVES,
    serial=SerialSettings(baudrate=9600),
    metrics=("spo2", "pulse_rate"),
    frame_interval_s=PACKET_INTERVAL_S,
    stale_after_s=3.0,
    publish_interval_s=1.0,
)
SPEC_DF7 = DeviceSpec(
    model="nonin-df7",
    kind=DeviceKind.PULSE_OXIMETER,
    title="Nonin data format 7 (5-byte frames, 16-bit pleth)",
    serves=SERVES,
    serial=SerialSettings(baudrate=9600),
    metrics=("spo2", "pulse_rate"),
    frame_interval_s=PACKET_INTERVAL_S,
    stale_after_s=3.0,
    publish_interval_s=1.0,
)
SPEC_DF8 = DeviceSpec(
    model="nonin-df8",
    kind=DeviceKind.PULSE_OXIMETER,
    title="Nonin data format 8 (4 bytes a second, no checksum)",
    serves=SERVES,
    serial=SerialSettings(baudrate=9600),
    metrics=("spo2", "pulse_rate"),
    frame_interval_s=1.0,
    stale_after_s=5.0,
    self_validating=False,  # no checksum: a random 4-byte pattern can pass the bit-7 and range checks
)


def select_format_command(data_format: int) -> bytes:
    """The 9560's select-data-format command (notes §2.6)."""
    return bytes((0x02, 0x70, 0x02, 0x02, data_format & 0xFF, 0x03))


def decode_hr(msb: int, lsb: int) -> int:
    """The 9-bit heart rate split over two 7-bit bytes (notes §2.2, pitfall 1)."""
    return ((msb & 0x03) << 7) | (lsb & 0x7F)


def frame_checksum(frame: bytes) -> int:
    return sum(frame[:4]) & 0xFF


class _Fit(Enum):
    OK = "ok"
    SHORT = "short"  # so far so good: need more bytes to decide
    HEADER = "header"
    CHECKSUM = "checksum"
    RANGE = "range"


def _value_error(spo2: int, hr: int) -> str | None:
    """Why these values cannot come from a device, or None: missing codes or plausible METRICS ranges."""
    if spo2 != MISSING_SPO2 and not METRICS["spo2"].low <= spo2 <= METRICS["spo2"].high:
        return f"SpO2 {spo2} is neither the missing code 127 nor a plausible value"
    if hr != MISSING_HR and not METRICS["pulse_rate"].low <= hr <= METRICS["pulse_rate"].high:
        return f"HR {hr} is neither the missing code 511 nor a plausible value"
    return None


def _metrics(spo2: int, hr: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if spo2 != MISSING_SPO2:
        metrics["spo2"] = spo2
    if hr != MISSING_HR:
        metrics["pulse_rate"] = hr
    return metrics


class _NoninDriver(FramedDriver):
    """The set-format command and its reply, runs of skipped bytes, and statuses on change."""

    data_format: ClassVar[int]

    def __init__(self) -> None:
        super().__init__()
        self._status: DeviceStatus | None = None
        self._run = bytearray()
        self._run_kind = ErrorKind.RESYNC
        self._run_reason = ""
        self._sends = 0
        self._first_sent: float | None = None
        self._reply: int | None = None

    def reset(self) -> None:
        super().reset()
        self._status = None
        self._run.clear()
        self._sends = 0
        self._first_sent = None
        self._reply = None

    @property
    def format_accepted(self) -> bool | None:
        """True after an ACK, False after a NAK, None while no reply was seen."""
        return None if self._reply is None else self._reply == ACK

    def outgoing(self, now: float) -> bytes:
        if self._sends == 0:
            self._sends, self._first_sent = 1, now
            return select_format_command(self.data_format)
        if (
            self._sends == 1
            and self._reply is None
            and self._first_sent is not None
            and now - self._first_sent >= RETRY_AFTER_S
        ):
            self._sends = 2
            return select_format_command(self.data_format)
        return b""

    def _awaiting_reply(self, now: float) -> bool:
        return self._reply is None and self._first_sent is not None and now - self._first_sent <= REPLY_WINDOW_S

    def _take_reply(self, byte: int) -> list[Event]:
        events = self._end_run()
        self._reply = byte
        if byte == NAK:
            events.append(
                ProtocolError(
                    ErrorKind.MALFORMED,
                    f"the device refused data format 0x{self.data_format:02X} (NAK): it keeps its stored format; "
                    "reconnect to retry within its 5-s window, or set the format with Nonin's tools",
                    bytes((byte,)),
                )
            )
        return events

    def _skip(self, data: bytes, kind: ErrorKind, reason: str) -> list[Event]:
        if not self._run:
            self._run_kind, self._run_reason = kind, reason
        self._run += data
        return self._end_run() if len(self._run) >= RUN_CAP else []

    def _end_run(self) -> list[Event]:
        if not self._run:
            return []
        error = ProtocolError(self._run_kind, f"{self._run_reason}; skipped {len(self._run)} bytes", bytes(self._run))
        self._run.clear()
        return [error]

    def _scan(self, buf: bytes, pos: int, now: float) -> int:
        """How many bytes from `pos` on cannot start a record (stopping at RUN_CAP for the run)."""
        awaiting = self._awaiting_reply(now)
        limit = min(len(buf), pos + RUN_CAP - len(self._run))
        i = pos
        while i < limit:
            if awaiting and buf[i] in (ACK, NAK):
                break
            fit = self._fit(buf, i)
            if fit is _Fit.SHORT or (fit is _Fit.OK and self._starts_record(buf, i)):
                break
            i += 1
        self.examined += i - pos
        return i - pos

    def _skip_scanned(self, buf: bytes, pos: int, n: int, reason: str) -> tuple[int, list[Event]]:
        first = self._fit(buf, pos)
        kind = {_Fit.CHECKSUM: ErrorKind.BAD_CHECKSUM, _Fit.RANGE: ErrorKind.OUT_OF_RANGE}.get(first, ErrorKind.RESYNC)
        detail = {
            _Fit.CHECKSUM: "bad checksum",
            _Fit.RANGE: "implausible values",
        }.get(first, reason)
        return n, self._skip(buf[pos : pos + n], kind, detail)

    def _emit(self, flags: list[str], code: int, metrics: dict[str, float], raw: bytes) -> list[Event]:
        if not metrics and not {"no_sensor", "probe_off", "out_of_track"} & set(flags):
            flags = ["searching", *flags]
        state = next((s for flag, s in STATE_ORDER if flag in flags), DeviceState.OK)
        conditions = tuple(c for c in CONDITIONS if c in flags)
        events: list[Event] = []
        if self._status is None or (state, conditions) != (self._status.state, self._status.conditions):
            self._status = DeviceStatus(state, conditions, code, STATE_DETAIL[state])
            events.append(self._status)
        events.append(Reading(metrics=metrics, flags=tuple(flags), raw=raw))
        return events

    def _fit(self, buf: bytes, i: int) -> _Fit:
        raise NotImplementedError

    def _starts_record(self, buf: bytes, i: int) -> bool:
        return True


class _PacketDriver(_NoninDriver):
    """DF2 and DF7: frames, packets and pleth."""

    status_at: ClassVar[int]
    float_at: ClassVar[int] = 3

    def __init__(self) -> None:
        super().__init__()
        self._locked = False
        self._frames: list[bytes] = []
        self._perfusion: str | None = None
        self._perfusion_age = 0
        self.firmware_revision: int | None = None

    def reset(self) -> None:
        super().reset()
        self._locked = False
        self._frames = []
        self._perfusion = None
        self._perfusion_age = 0

    def _pleth(self, frame: bytes) -> int:
        raise NotImplementedError

    def _starts_record(self, buf: bytes, i: int) -> bool:
        return bool(buf[i + self.status_at] & ST_SYNC)

    def _decode(self, buf: bytes, pos: int, now: float) -> tuple[int, list[Event]]:
        if buf[pos] in (ACK, NAK) and self._awaiting_reply(now):
            return 1, self._take_reply(buf[pos])
        events: list[Event] = []
        if self._locked:
            fit = self._fit(buf, pos)
            if fit is _Fit.SHORT:
                return 0, []
            if fit is _Fit.OK:
                frame = buf[pos : pos + FRAME_LEN]
                sync = bool(frame[self.status_at] & ST_SYNC)
                if sync and self._frames:
                    events.append(
                        ProtocolError(
                            ErrorKind.RESYNC,
                            f"SYNC bit where frame {len(self._frames) + 1} of 25 was due: frames were lost, "
                            "packet restarted",
                            b"".join(self._frames),
                        )
                    )
                    self._frames = []
                if sync or self._frames:
                    self._frames.append(frame)
                    if len(self._frames) == FRAMES_PER_PACKET:
                        events += self._packet(self._frames)
                        self._frames = []
                    return FRAME_LEN, events
                reason = "a frame without SYNC where a packet should start"
                kind = ErrorKind.RESYNC
            else:
                kind = ErrorKind.BAD_CHECKSUM if fit is _Fit.CHECKSUM else ErrorKind.RESYNC
                reason = "bad checksum, frame lock lost" if fit is _Fit.CHECKSUM else "bad frame header, lock lost"
            self._locked = False
            events += self._skip(b"".join(self._frames), kind, reason)
            self._frames = []
        n = self._scan(buf, pos, now)
        if n:
            consumed, skipped = self._skip_scanned(buf, pos, n, "no frame with SYNC (header and checksum)")
            return consumed, events + skipped
        if self._fit(buf, pos) is not _Fit.OK:
            return 0, events  # SHORT, or a reply byte that _decode takes on its next call
        self._locked = True
        self._frames = [buf[pos : pos + FRAME_LEN]]
        return FRAME_LEN, [*events, *self._end_run()]

    def _packet(self, frames: list[bytes]) -> list[Event]:
        raw = b"".join(frames)
        floats = [f[self.float_at] & 0x7F for f in frames]
        spo2 = floats[F_SPO2_D]
        hr = decode_hr(floats[F_HR_D_MSB], floats[F_HR_D_LSB])
        problem = _value_error(spo2, hr)
        if problem is not None:
            return [ProtocolError(ErrorKind.OUT_OF_RANGE, f"packet with checksums right but {problem}", raw)]
        status = 0
        worst: str | None = None
        for f in frames:
            s = f[self.status_at]
            status |= s
            colour = {ST_GPRF: "green", ST_GPRF | ST_RPRF: "yellow", ST_RPRF: "red"}.get(s & (ST_GPRF | ST_RPRF))
            if colour == "red" or (colour == "yellow" and worst != "red") or (colour and worst is None):
                worst = colour
        if worst is not None:
            self._perfusion, self._perfusion_age = worst, 0
        else:
            self._perfusion_age += 1
            if self._perfusion_age > PERFUSION_HOLD_PACKETS:
                self._perfusion = None
        self.firmware_revision = floats[F_SREV]
        stat2 = floats[F_STAT2]
        flags: list[str] = []
        for bit, flag in ((ST_SNSD, "no_sensor"), (ST_SNSA, "probe_off"), (ST_OOT, "out_of_track")):
            if status & bit:
                flags.append(flag)
        if status & ST_ARTF:
            flags.append("artifact")
        if self._perfusion == "red":
            flags.append("low_perfusion")
        elif self._perfusion == "yellow":
            flags.append("marginal_perfusion")
        if stat2 & STAT2_LOW_BAT:
            flags.append("low_battery")
        if stat2 & STAT2_SPA:
            flags.append("smartpoint")
        events = self._emit(flags, status, _metrics(spo2, hr), raw)
        events.append(Waveform("pleth", tuple(self._pleth(f) for f in frames), FRAME_RATE_HZ))
        return events


class NoninDF2Driver(_PacketDriver):
    spec: ClassVar[DeviceSpec] = SPEC_DF2
    data_format = FORMAT_DF2
    status_at = 1

    def _fit(self, buf: bytes, i: int) -> _Fit:
        n = len(buf) - i
        if buf[i] != 0x01 or (n > 1 and not buf[i + 1] & 0x80) or (n > 3 and buf[i + 3] & 0x80):
            return _Fit.HEADER
        if n < FRAME_LEN:
            return _Fit.SHORT
        return _Fit.OK if frame_checksum(buf[i : i + 4]) == buf[i + 4] else _Fit.CHECKSUM

    def _pleth(self, frame: bytes) -> int:
        return frame[2]


class NoninDF7Driver(_PacketDriver):
    spec: ClassVar[DeviceSpec] = SPEC_DF7
    data_format = FORMAT_DF7
    status_at = 0

    def _fit(self, buf: bytes, i: int) -> _Fit:
        n = len(buf) - i
        if not buf[i] & 0x80 or (n > 3 and buf[i + 3] & 0x80):
            return _Fit.HEADER
        if n < FRAME_LEN:
            return _Fit.SHORT
        return _Fit.OK if frame_checksum(buf[i : i + 4]) == buf[i + 4] else _Fit.CHECKSUM

    def _pleth(self, frame: bytes) -> int:
        return (frame[1] << 8) | frame[2]


def _follows(prev: bytes, rec: bytes) -> bool:
    """Whether DF8 record `rec` can be the one after `prev` from the same device: slow status bits unchanged and
    display values within a step of each other (a missing value may come or go)."""
    if (prev[0] ^ rec[0]) & S1_SLOW or (prev[3] ^ rec[3]) & S2_SLOW:
        return False
    if MISSING_SPO2 not in (prev[2], rec[2]) and abs(prev[2] - rec[2]) > SPO2_STEP:
        return False
    hr_prev, hr = decode_hr(prev[0], prev[1]), decode_hr(rec[0], rec[1])
    return MISSING_HR in (hr_prev, hr) or abs(hr_prev - hr) <= HR_STEP


# Where a DF8 record can start: the bit-7 pattern, whole or cut short by the end of the buffer.
DF8_CANDIDATE = re.compile(rb"[\x80-\xff](?:[\x00-\x7f]{3}|[\x00-\x7f]{0,2}\Z)")
DF8_CANDIDATE_OR_REPLY = re.compile(rb"[\x06\x15]|[\x80-\xff](?:[\x00-\x7f]{3}|[\x00-\x7f]{0,2}\Z)")


class _Sync(Enum):
    LOCKED = "locked"
    QUICK = "quick"  # one record after a short run of skipped bytes
    LOCK_IN = "lock_in"  # LOCK_IN_RECORDS consecutive records after a longer run


class NoninDF8Driver(_NoninDriver):
    spec: ClassVar[DeviceSpec] = SPEC_DF8
    data_format = FORMAT_DF8

    def __init__(self) -> None:
        super().__init__()
        # The last two accepted records and when: the last may be noise that fit the pattern right after a record.
        self._refs: list[tuple[bytes, float]] = []
        self._since = 0  # bytes skipped since the last accepted record (or the start): 0 after a record is lock
        self._now = 0.0
        self._origin = 0  # where the current _decode call starts in its buffer: offsets are counted from there

    def reset(self) -> None:
        super().reset()
        self._refs, self._since = [], 0

    def _sync(self, i: int) -> _Sync:
        before = self._since + i - self._origin
        if before == 0 and self._refs:
            return _Sync.LOCKED
        return _Sync.QUICK if before <= QUICK_RESYNC_BYTES else _Sync.LOCK_IN

    def _fit(self, buf: bytes, i: int) -> _Fit:
        sync = self._sync(i)
        if sync is _Sync.LOCKED:
            return self._record_fit(buf, i)
        if sync is _Sync.QUICK:
            return self._quick_fit(buf, i)
        for k in range(LOCK_IN_RECORDS):
            fit = self._record_fit(buf, i + k * DF8_LEN)
            if fit is _Fit.SHORT:
                return fit
            if fit is not _Fit.OK:
                return fit if k == 0 else _Fit.HEADER
            j = i + k * DF8_LEN
            if k and not _follows(buf[j - DF8_LEN : j], buf[j : j + DF8_LEN]):
                return _Fit.HEADER
        return _Fit.OK

    @staticmethod
    def _record_fit(buf: bytes, i: int) -> _Fit:
        """The bit-7 pattern (on the bytes there are) and the value ranges."""
        rec = buf[i : i + DF8_LEN]
        if rec and (not rec[0] & 0x80 or any(b & 0x80 for b in rec[1:])):
            return _Fit.HEADER
        if len(rec) < DF8_LEN:
            return _Fit.SHORT
        if _value_error(rec[2], decode_hr(rec[0], rec[1])) is not None:
            return _Fit.RANGE
        return _Fit.OK

    def _quick_fit(self, buf: bytes, i: int) -> _Fit:
        rec = buf[i : i + DF8_LEN]
        if rec and rec[0] & (S1_LPRF | S1_MPRF) == S1_LPRF | S1_MPRF:
            return _Fit.HEADER  # contradictory perfusion levels: not a record to acquire sync on [guess]
        fresh = [ref for ref, at in self._refs if self._now - at <= REF_FRESH_S]
        if not fresh and len(rec) == DF8_LEN and rec[3] & S2_UNNAMED:
            return _Fit.HEADER
        fit = self._record_fit(buf, i)
        if fit is _Fit.OK and fresh and not any(_follows(ref, rec) for ref in fresh):
            return _Fit.HEADER
        return fit

    def _accept(self, rec: bytes, now: float) -> None:
        self._refs = [*self._refs[-1:], (rec, now)]
        self._since = 0

    def _scan(self, buf: bytes, pos: int, now: float) -> int:
        """_NoninDriver._scan, jumping straight to the offsets that fit the bit-7 pattern (1 in 16 of noise):
        every other offset fails every check at its first byte. The search ends DF8_LEN - 1 bytes past `limit`
        (a candidate before `limit` is whole there, and the pattern's end-of-input branch cannot match before it),
        so a large read is searched once, not to its end once per RUN_CAP piece."""
        candidate = DF8_CANDIDATE_OR_REPLY if self._awaiting_reply(now) else DF8_CANDIDATE
        limit = min(len(buf), pos + RUN_CAP - len(self._run))
        stop = min(len(buf), limit + DF8_LEN - 1)
        i = pos
        while (m := candidate.search(buf, i, stop)) is not None and m.start() < limit:
            i = m.start()
            if buf[i] in (ACK, NAK) or self._fit(buf, i) in (_Fit.SHORT, _Fit.OK):
                self.examined += i - pos
                return i - pos
            i += 1
        self.examined += stop - pos
        return limit - pos

    def _skip(self, data: bytes, kind: ErrorKind, reason: str) -> list[Event]:
        self._since += len(data)
        return super()._skip(data, kind, reason)

    def _decode(self, buf: bytes, pos: int, now: float) -> tuple[int, list[Event]]:
        self._now, self._origin = now, pos
        if buf[pos] in (ACK, NAK) and self._awaiting_reply(now):
            return 1, self._take_reply(buf[pos])
        fit = self._fit(buf, pos)
        if fit is _Fit.SHORT:
            return 0, []
        if fit is not _Fit.OK:
            n = self._scan(buf, pos, now)
            if n:
                reason = "no DF8 record (bit-7 pattern, or not borne out by its neighbours)"
                return self._skip_scanned(buf, pos, n, reason)
            if self._fit(buf, pos) is not _Fit.OK:
                return 0, []
        if self._sync(pos) is _Sync.LOCK_IN:
            held = buf[pos : pos + (LOCK_IN_RECORDS - 1) * DF8_LEN]
            events = self._end_run()
            events.append(
                ProtocolError(
                    ErrorKind.RESYNC,
                    f"{LOCK_IN_RECORDS - 1} records held back to confirm sync after {self._since} bytes that were no "
                    f"records: without a checksum only {LOCK_IN_RECORDS} consecutive consistent records are trusted",
                    held,
                )
            )
            self._refs = []
            self._accept(held[-DF8_LEN:], now)
            return len(held), events
        s1, hr_lsb, spo2, s2 = rec = buf[pos : pos + DF8_LEN]
        self._accept(rec, now)
        flags: list[str] = []
        for byte, bit, flag in (
            (s1, S1_SNSD, "no_sensor"),
            (s2, S2_SNSA, "probe_off"),
            (s1, S1_OOT, "out_of_track"),
            (s1, S1_ARTF, "artifact"),
            (s1, S1_LPRF, "low_perfusion"),
            (s1, S1_MPRF, "marginal_perfusion"),
            (s2, S2_LOW_BAT | S2_BATT_CRITICAL, "low_battery"),
            (s2, S2_BATT_CRITICAL, "battery_critical"),
            (s2, S2_SPA, "smartpoint"),
            (s2, S2_SPOT_CHECK, "spot_check_mode"),
        ):
            if byte & bit:
                flags.append(flag)
        if "low_perfusion" in flags and "marginal_perfusion" in flags:
            flags.remove("marginal_perfusion")
        metrics = _metrics(spo2, decode_hr(s1, hr_lsb))
        return DF8_LEN, [*self._end_run(), *self._emit(flags, (s1 << 8) | s2, metrics, rec)]


# --- encode (simulators) -------------------------------------------------------------------------------------


def _values(sample: Sample) -> tuple[int, int]:
    spo2, hr = sample.metrics.get("spo2"), sample.metrics.get("pulse_rate")
    return (
        MISSING_SPO2 if spo2 is None else min(100, max(1, round(spo2))),
        MISSING_HR if hr is None else min(300, max(1, round(hr))),
    )


def encode_packet(sample: Sample, data_format: int, timer: int = 0) -> bytes:
    """One DF2 or DF7 packet (25 frames): the sample's values in every float slot, recording and display.

    probe_off sets SNSA and the recording slots to the missing codes (display slots hold the value, as the device
    does for 10 s); searching sets OOT; no_sensor / sensor_fault set SNSD; perfusion conditions set the colour
    bits on frames 1-12 (one pulse marker per packet), and green when none applies and a pulse is shown.
    """
    spo2, hr = _values(sample)
    cond = sample.conditions
    blank = bool({"probe_off", "searching", "no_sensor", "sensor_fault"} & cond)
    rec_spo2, rec_hr = (MISSING_SPO2, MISSING_HR) if blank else (spo2, hr)
    status = 0x80
    if cond & {"no_sensor", "sensor_fault"}:
        status |= ST_SNSD
    if "probe_off" in cond:
        status |= ST_SNSA
    if "searching" in cond:
        status |= ST_OOT
    if "artifact" in cond:
        status |= ST_ARTF
    if "low_perfusion" in cond:
        perfusion = ST_RPRF
    elif "marginal_perfusion" in cond:
        perfusion = ST_RPRF | ST_GPRF
    else:
        perfusion = 0 if blank or hr == MISSING_HR else ST_GPRF
    timer &= 0x3FFF
    floats = [0] * FRAMES_PER_PACKET
    floats[F_HR_MSB], floats[F_HR_LSB] = rec_hr >> 7, rec_hr & 0x7F
    floats[F_SPO2] = floats[F_SPO2_FAST] = floats[F_SPO2_BB] = floats[F_ESPO2] = rec_spo2
    floats[F_EHR_MSB], floats[F_EHR_LSB] = rec_hr >> 7, rec_hr & 0x7F
    floats[F_SREV] = int(sample.extra.get("firmware_revision", 0x29)) & 0x7F
    floats[F_TMR_MSB], floats[F_TMR_LSB] = timer >> 7, timer & 0x7F
    floats[F_STAT2] = STAT2_LOW_BAT if "low_battery" in cond else 0
    floats[F_SPO2_D] = floats[F_ESPO2_D] = spo2
    floats[F_HR_D_MSB], floats[F_HR_D_LSB] = hr >> 7, hr & 0x7F
    floats[F_EHR_D_MSB], floats[F_EHR_D_LSB] = hr >> 7, hr & 0x7F
    rate = (hr if hr != MISSING_HR else 60) / 60.0
    out = bytearray()
    for k, value in enumerate(floats):
        st = status | (ST_SYNC if k == 0 else 0) | (perfusion if k < 12 else 0)
        phase = 2 * math.pi * rate * (timer * FRAMES_PER_PACKET + k) / FRAME_RATE_HZ
        wave = 0.0 if blank else math.sin(phase)
        if data_format == FORMAT_DF7:
            pleth = round(32768 + 20000 * wave)
            head = bytes((st, pleth >> 8, pleth & 0xFF, value))
        else:
            head = bytes((0x01, st, round(128 + 100 * wave), value))
        out += head + bytes((frame_checksum(head),))
    return bytes(out)


def encode_df2(sample: Sample) -> bytes:
    return encode_packet(sample, FORMAT_DF2)


def encode_df7(sample: Sample) -> bytes:
    return encode_packet(sample, FORMAT_DF7)


def encode_df8(sample: Sample) -> bytes:
    """The 4-byte DF8 record: display values (held while probe_off, as in DF2), status bits from conditions."""
    spo2, hr = _values(sample)
    cond = sample.conditions
    s1 = 0x80 | (hr >> 7)
    for condition, bit in (("searching", S1_OOT), ("artifact", S1_ARTF), ("low_perfusion", S1_LPRF)):
        if condition in cond:
            s1 |= bit
    if cond & {"no_sensor", "sensor_fault"}:
        s1 |= S1_SNSD
    if "marginal_perfusion" in cond and "low_perfusion" not in cond:
        s1 |= S1_MPRF
    s2 = (S2_SNSA if "probe_off" in cond else 0) | (S2_LOW_BAT if "low_battery" in cond else 0)
    return bytes((s1, hr & 0x7F, spo2, s2))


# --- emulator ------------------------------------------------------------------------------------------------


class NoninEmulator:
    """The device side: streams in the selected format and answers the set-format command within 5 s.

    The window starts at the first tick or received byte (the host connecting). Formats 0x02, 0x07 and 0x08 are
    accepted; DF13 and any other value, or a command after the window, get NAK and leave the format unchanged.
    """

    def __init__(self, data_format: int = FORMAT_DF2) -> None:
        if data_format not in (FORMAT_DF2, FORMAT_DF7, FORMAT_DF8):
            raise ValueError(f"unsupported Nonin data format 0x{data_format:02X}")
        self.data_format = data_format
        self._start: float | None = None
        self._next: float | None = None
        self._timer = 0
        self._cmd = bytearray()

    def _interval(self) -> float:
        return 1.0 if self.data_format == FORMAT_DF8 else PACKET_INTERVAL_S

    def tick(self, now: float, sample: Sample) -> bytes:
        if self._start is None:
            self._start = now
        if self._next is None:
            self._next = now
        out = b""
        while now >= self._next - 1e-9:
            if self.data_format == FORMAT_DF8:
                out += encode_df8(sample)
            else:
                out += encode_packet(sample, self.data_format, self._timer)
            self._timer = (self._timer + 1) & 0x3FFF
            self._next += self._interval()
        return out

    def receive(self, data: bytes, now: float, sample: Sample) -> bytes:
        if self._start is None:
            self._start = now
        self._cmd += data
        out = b""
        while True:
            start = self._cmd.find(0x02)
            if start < 0:
                self._cmd.clear()
                break
            del self._cmd[:start]
            if len(self._cmd) < 3:
                break
            end = 3 + self._cmd[2]
            if len(self._cmd) <= end:
                break
            frame = bytes(self._cmd[: end + 1])
            if frame[end] != 0x03:
                del self._cmd[:1]  # not a command frame: look for the next STX
                continue
            del self._cmd[: end + 1]
            if frame[1] == 0x70:
                out += bytes((self._set_format(frame, now),))
        return out

    def _set_format(self, frame: bytes, now: float) -> int:
        assert self._start is not None
        within = now - self._start <= DEVICE_WINDOW_S + 1e-9
        if within and frame[2] == 2 and frame[3] == 0x02 and frame[4] in (FORMAT_DF2, FORMAT_DF7, FORMAT_DF8):
            self.data_format = frame[4]
            return ACK
        return NAK


MODEL_DF2 = Model(spec=SPEC_DF2, driver=NoninDF2Driver, encode=encode_df2, emulator=lambda: NoninEmulator(FORMAT_DF2))
MODEL_DF7 = Model(spec=SPEC_DF7, driver=NoninDF7Driver, encode=encode_df7, emulator=lambda: NoninEmulator(FORMAT_DF7))
MODEL_DF8 = Model(spec=SPEC_DF8, driver=NoninDF8Driver, encode=encode_df8, emulator=lambda: NoninEmulator(FORMAT_DF8))
MODELS = (MODEL_DF2, MODEL_DF7, MODEL_DF8)
