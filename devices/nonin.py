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
  value ranges (the spec's, or the missing codes). A locked device is never dropped for what it says.
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

Skipped bytes are reported as one ProtocolError per contiguous run (FramedDriver), when the run ends (a frame
locks, a reply byte arrives) or reaches `max_buffer` bytes (about 1 s of data), so the events do not depend on how
the stream is chunked; its kind is why its first byte was no frame (bad checksum, implausible values, resync).
Trailing garbage is reported once more bytes follow it.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from enum import Enum
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

FORMAT_DF2 = 0x02
FORMAT_DF7 = 0x07
FORMAT_DF8 = 0x08
ACK = 0x06
NAK = 0x15
REPLIES = (ACK, NAK)
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

STATUS = StatusRules(
    states=(
        ("no_sensor", DeviceState.NO_SENSOR),
        ("probe_off", DeviceState.PROBE_OFF),
        ("out_of_track", DeviceState.SEARCHING),
        ("searching", DeviceState.SEARCHING),
    ),
    conditions=("low_perfusion", "marginal_perfusion", "low_battery"),
    details={
        DeviceState.OK: "valid data",
        DeviceState.NO_SENSOR: "sensor disconnected or inoperable (SNSD)",
        DeviceState.PROBE_OFF: "sensor alarm: finger out or unusable signal (SNSA); display values are held",
        DeviceState.SEARCHING: "no valid pulse (out of track or values missing)",
    },
)


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
SPEC_DF7 = replace(SPEC_DF2, model="nonin-df7", title="Nonin data format 7 (5-byte frames, 16-bit pleth)")
SPEC_DF8 = replace(
    SPEC_DF2,
    model="nonin-df8",
    title="Nonin data format 8 (4 bytes a second, no checksum)",
    frame_interval_s=1.0,
    stale_after_s=5.0,
    publish_interval_s=None,
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


# Enum members looked up on their class cost a call each (3.11): the per-byte and per-frame paths use these names.
FIT_OK, FIT_SHORT, FIT_HEADER, FIT_CHECKSUM, FIT_RANGE = _Fit


WHY: dict[_Fit, ErrorKind | None] = {
    FIT_OK: None,
    FIT_SHORT: None,
    FIT_HEADER: ErrorKind.RESYNC,
    FIT_CHECKSUM: ErrorKind.BAD_CHECKSUM,
    FIT_RANGE: ErrorKind.OUT_OF_RANGE,
}


def _metrics(spo2: int, hr: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if spo2 != MISSING_SPO2:
        metrics["spo2"] = spo2
    if hr != MISSING_HR:
        metrics["pulse_rate"] = hr
    return metrics


class _NoninDriver(FramedDriver):
    """The set-format command and its reply, and what a record's flags say."""

    data_format: ClassVar[int]
    status_rules = STATUS
    max_buffer = 1024  # a longer run of skipped bytes is reported in pieces (about 1 s of data)

    def reset(self) -> None:
        super().reset()
        self._sends = 0
        self._first_sent: float | None = None
        self._reply: int | None = None

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

    def _is_reply(self, byte: int, now: float) -> bool:
        """A 0x06 / 0x15 byte where a frame would start, while the set-format command waits for its reply."""
        return self._reply is None and self._first_sent is not None and now - self._first_sent <= REPLY_WINDOW_S

    def _take_reply(self, byte: int) -> tuple[int, ProtocolError | None]:
        self._reply = byte
        if byte == ACK:
            return 1, None
        return 1, ProtocolError(
            ErrorKind.MALFORMED,
            f"the device refused data format 0x{self.data_format:02X} (NAK): it keeps its stored format; "
            "reconnect to retry within its 5-s window, or set the format with Nonin's tools",
            bytes((byte,)),
        )

    @staticmethod
    def _record(flags: list[str], code: int, metrics: dict[str, float], raw: bytes, wave: Waveform | None) -> Record:
        if not metrics and not {"no_sensor", "probe_off", "out_of_track"} & set(flags):
            flags = ["searching", *flags]
        return Record(Reading(metrics=metrics, flags=tuple(flags), raw=raw), code, wave)


class _PacketDriver(_NoninDriver):
    """DF2 and DF7: frames, packets and pleth. Unlocked, a packet starts at a frame with SYNC (`reject` looks for
    it); locked (`sync` is None), frames follow each other until one fails."""

    header: ClassVar[re.Pattern[bytes]]  # a frame's first 4 bytes (bit 7 set or clear), or as many as there are
    frame_start: ClassVar[re.Pattern[bytes]]  # a header or a reply byte: `sync` while no packet is locked
    status_at: ClassVar[int]
    float_at: ClassVar[int] = 3
    pleth_at: ClassVar[slice]
    no_frame = "no frame with SYNC (header and checksum)"

    def reset(self) -> None:
        super().reset()
        self.sync = self.frame_start
        self._frames: list[bytes] = []
        self._perfusion: str | None = None
        self._perfusion_age = 0
        self.firmware_revision: int | None = None

    def _fit(self, buf: bytes, i: int) -> _Fit:
        if self.header.match(buf, i) is None:
            return FIT_HEADER
        if len(buf) - i < FRAME_LEN:
            return FIT_SHORT
        return FIT_OK if frame_checksum(buf[i : i + 4]) == buf[i + 4] else FIT_CHECKSUM

    def reject(self, buf: bytes, i: int, skipped: int, now: float) -> ErrorKind | None:
        if buf[i] in REPLIES and self._is_reply(buf[i], now):
            return None
        fit = self._fit(buf, i)
        if fit is FIT_OK and not buf[i + self.status_at] & ST_SYNC:
            return ErrorKind.RESYNC
        return WHY[fit]

    def decode_frame(self, buf: bytes, pos: int, now: float) -> tuple[int, Frame | None]:
        if buf[pos] in REPLIES and self._is_reply(buf[pos], now):
            return self._take_reply(buf[pos])
        if self.sync is not None:  # `reject` let through a frame with SYNC, or the start of one
            if len(buf) - pos < FRAME_LEN:
                return self.need(FRAME_LEN)
            self.sync = None  # locked
            self._frames = [buf[pos : pos + FRAME_LEN]]
            return FRAME_LEN, None
        fit = self._fit(buf, pos)
        if fit is FIT_OK:
            frame = buf[pos : pos + FRAME_LEN]
            starts = frame[self.status_at] & ST_SYNC
            if starts and self._frames:
                lost = len(self._frames)
                detail = f"SYNC bit where frame {lost + 1} of 25 was due: frames were lost, packet restarted"
                dropped, self._frames = b"".join(self._frames), [frame]
                return FRAME_LEN, ProtocolError(ErrorKind.RESYNC, detail, dropped)
            if starts or self._frames:
                self._frames.append(frame)
                if len(self._frames) < FRAMES_PER_PACKET:
                    return FRAME_LEN, None
                frames, self._frames = self._frames, []
                return FRAME_LEN, self._packet(frames)
            kind, reason = ErrorKind.RESYNC, "a frame without SYNC where a packet should start"
        elif fit is FIT_SHORT:
            return self.need(FRAME_LEN)
        elif fit is FIT_CHECKSUM:
            kind, reason = ErrorKind.BAD_CHECKSUM, "bad checksum, frame lock lost"
        else:
            kind, reason = ErrorKind.RESYNC, "bad frame header, lock lost"
        self.sync = self.frame_start  # the partial packet's frames and this byte start a run of noise
        self.skip(b"".join(self._frames), kind, reason)
        self._frames = []
        return self.skip(buf[pos : pos + 1], kind, reason)

    def _packet(self, frames: list[bytes]) -> Record:
        floats = [f[self.float_at] & 0x7F for f in frames]
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
        metrics = _metrics(floats[F_SPO2_D], decode_hr(floats[F_HR_D_MSB], floats[F_HR_D_LSB]))
        wave = Waveform("pleth", tuple(int.from_bytes(f[self.pleth_at]) for f in frames), FRAME_RATE_HZ)
        return self._record(flags, status, metrics, b"".join(frames), wave)


class NoninDF2Driver(_PacketDriver):
    spec: ClassVar[DeviceSpec] = SPEC_DF2
    data_format = FORMAT_DF2
    header = re.compile(rb"\x01(?:[\x80-\xff][\x00-\xff][\x00-\x7f]|(?:[\x80-\xff][\x00-\xff]?)?\Z)")
    frame_start = re.compile(rb"[\x06\x15]|" + header.pattern)
    status_at = 1
    pleth_at = slice(2, 3)


class NoninDF7Driver(_PacketDriver):
    spec: ClassVar[DeviceSpec] = SPEC_DF7
    data_format = FORMAT_DF7
    header = re.compile(rb"[\x80-\xff](?:[\x00-\xff]{2}[\x00-\x7f]|[\x00-\xff]{0,2}\Z)")
    frame_start = re.compile(rb"[\x06\x15]|" + header.pattern)
    status_at = 0
    pleth_at = slice(1, 3)


def _follows(prev: bytes, rec: bytes) -> bool:
    """Whether DF8 record `rec` can be the one after `prev` from the same device: slow status bits unchanged and
    display values within a step of each other (a missing value may come or go)."""
    if (prev[0] ^ rec[0]) & S1_SLOW or (prev[3] ^ rec[3]) & S2_SLOW:
        return False
    if MISSING_SPO2 not in (prev[2], rec[2]) and abs(prev[2] - rec[2]) > SPO2_STEP:
        return False
    hr_prev, hr = decode_hr(prev[0], prev[1]), decode_hr(rec[0], rec[1])
    return MISSING_HR in (hr_prev, hr) or abs(hr_prev - hr) <= HR_STEP


# (record byte, bit, flag), in the order the flags are listed
DF8_FLAGS = (
    (0, S1_SNSD, "no_sensor"),
    (3, S2_SNSA, "probe_off"),
    (0, S1_OOT, "out_of_track"),
    (0, S1_ARTF, "artifact"),
    (0, S1_LPRF, "low_perfusion"),
    (0, S1_MPRF, "marginal_perfusion"),
    (3, S2_LOW_BAT | S2_BATT_CRITICAL, "low_battery"),
    (3, S2_BATT_CRITICAL, "battery_critical"),
    (3, S2_SPA, "smartpoint"),
    (3, S2_SPOT_CHECK, "spot_check_mode"),
)
S1_FLAGS = S1_SNSD | S1_OOT | S1_ARTF | S1_LPRF | S1_MPRF
S2_FLAGS = S2_SNSA | S2_LOW_BAT | S2_BATT_CRITICAL | S2_SPA | S2_SPOT_CHECK


class _Sync(Enum):
    LOCKED = "locked"
    QUICK = "quick"  # one record after a short run of skipped bytes
    LOCK_IN = "lock_in"  # LOCK_IN_RECORDS consecutive records after a longer run


SYNC_LOCKED, SYNC_QUICK, SYNC_LOCK_IN = _Sync


class NoninDF8Driver(_NoninDriver):
    """What a record must prove depends on the bytes skipped since the last one (module docstring): `reject` tells
    in the search, so decode_frame finds a record, a lock-in or a reply wherever it is called."""

    spec: ClassVar[DeviceSpec] = SPEC_DF8
    data_format = FORMAT_DF8
    # A reply, or the bit-7 pattern (1 offset in 16 of noise), whole or cut short by the end of input.
    sync = re.compile(rb"[\x06\x15]|[\x80-\xff](?:[\x00-\x7f]{3}|[\x00-\x7f]{0,2}\Z)")
    no_frame = "no DF8 record (bit-7 pattern, or not borne out by its neighbours)"

    def reset(self) -> None:
        super().reset()
        # The last two accepted records and when: the last may be noise that fit the pattern right after a record.
        self._refs: list[tuple[bytes, float]] = []
        self._mark = self.skipped  # `skipped` when the last record was accepted: none skipped since then is lock

    def _sync(self, skipped: int) -> _Sync:
        before = skipped - self._mark
        if before == 0 and self._refs:
            return SYNC_LOCKED
        return SYNC_QUICK if before <= QUICK_RESYNC_BYTES else SYNC_LOCK_IN

    def reject(self, buf: bytes, i: int, skipped: int, now: float) -> ErrorKind | None:
        if buf[i] in REPLIES and self._is_reply(buf[i], now):
            return None
        sync = self._sync(skipped)
        if sync is SYNC_LOCKED:
            return WHY[self._record_fit(buf, i)]
        if sync is SYNC_QUICK:
            return WHY[self._quick_fit(buf, i, now)]
        for k in range(LOCK_IN_RECORDS):
            fit = self._record_fit(buf, i + k * DF8_LEN)
            if fit is FIT_SHORT:
                return None
            if fit is not FIT_OK:
                return WHY[fit] if k == 0 else ErrorKind.RESYNC
            j = i + k * DF8_LEN
            if k and not _follows(buf[j - DF8_LEN : j], buf[j : j + DF8_LEN]):
                return ErrorKind.RESYNC
        return None

    def _record_fit(self, buf: bytes, i: int) -> _Fit:
        """The bit-7 pattern (on the bytes there are) and the values: without a checksum, plausible values are part
        of what makes 4 bytes a record."""
        rec = buf[i : i + DF8_LEN]
        if rec and (rec[0] < 0x80 or max(rec[1:], default=0) >= 0x80):
            return FIT_HEADER
        if len(rec) < DF8_LEN:
            return FIT_SHORT
        spo2, hr = rec[2], decode_hr(rec[0], rec[1])
        (spo2_low, spo2_high), (hr_low, hr_high) = self.ranges["spo2"], self.ranges["pulse_rate"]
        if (spo2 != MISSING_SPO2 and not spo2_low <= spo2 <= spo2_high) or (
            hr != MISSING_HR and not hr_low <= hr <= hr_high
        ):
            return FIT_RANGE
        return FIT_OK

    def _quick_fit(self, buf: bytes, i: int, now: float) -> _Fit:
        rec = buf[i : i + DF8_LEN]
        if rec and rec[0] & (S1_LPRF | S1_MPRF) == S1_LPRF | S1_MPRF:
            return FIT_HEADER  # contradictory perfusion levels: not a record to acquire sync on [guess]
        fresh = [ref for ref, at in self._refs if now - at <= REF_FRESH_S]
        if not fresh and len(rec) == DF8_LEN and rec[3] & S2_UNNAMED:
            return FIT_HEADER
        fit = self._record_fit(buf, i)
        if fit is FIT_OK and fresh and not any(_follows(ref, rec) for ref in fresh):
            return FIT_HEADER
        return fit

    def _accept(self, rec: bytes, now: float) -> None:
        self._refs = [*self._refs[-1:], (rec, now)]
        self._mark = self.skipped

    def decode_frame(self, buf: bytes, pos: int, now: float) -> tuple[int, Frame | None]:
        if buf[pos] in REPLIES and self._is_reply(buf[pos], now):
            return self._take_reply(buf[pos])
        if self._sync(self.skipped) is SYNC_LOCK_IN:  # `reject` found LOCK_IN_RECORDS records that follow
            if len(buf) - pos < LOCK_IN_RECORDS * DF8_LEN:
                return self.need(LOCK_IN_RECORDS * DF8_LEN)
            held = buf[pos : pos + (LOCK_IN_RECORDS - 1) * DF8_LEN]
            detail = (
                f"{LOCK_IN_RECORDS - 1} records held back to confirm sync after {self.skipped - self._mark} bytes "
                f"that were no records: without a checksum only {LOCK_IN_RECORDS} consecutive consistent records "
                "are trusted"
            )
            self._refs = []
            self._accept(held[-DF8_LEN:], now)
            return len(held), ProtocolError(ErrorKind.RESYNC, detail, held)
        if len(buf) - pos < DF8_LEN:
            return self.need(DF8_LEN)
        s1, hr_lsb, spo2, s2 = rec = buf[pos : pos + DF8_LEN]
        self._accept(rec, now)
        flags: list[str] = []
        if s1 & S1_FLAGS or s2 & S2_FLAGS:
            flags = [flag for i, bit, flag in DF8_FLAGS if rec[i] & bit]
            if "low_perfusion" in flags and "marginal_perfusion" in flags:
                flags.remove("marginal_perfusion")
        return DF8_LEN, self._record(flags, (s1 << 8) | s2, _metrics(spo2, decode_hr(s1, hr_lsb)), rec, None)


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
