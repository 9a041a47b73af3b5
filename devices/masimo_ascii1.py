"""Masimo Rad-8 / Radical-7 / Radical-5 serial output in "ASCII 1" mode.

Wire layout (protocol notes §1; sources in tests/vectors/masimo_ascii1.json):
- 9600 8N1, no handshake [2+]. Output only: the device takes no host command in this mode [2+]. The Rad-8
  defaults to ASCII 2; the operator must select AS1 in setup level 3 [2+].
- One printable-ASCII record a second, ending in CR LF [2+]; no checksum, no STX/ETX [2+]:
  `MM/DD/YY HH:MM:SS SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+--
  ALARM=0000 EXC=000800` (Rad-8 / Radical-7 "blue"). Fields are single-space separated `KEY=value` of fixed
  width, but models add and drop keys (PVI on the Radical-7; SPHB, SPOC, RESVD, EXC1 on rainbow units [1]; no SN
  or PI on the Radical-5 [1]), so fields are looked up by key, never by position.
- A value is missing when it holds `-` in place of digits (`---%`, `--.--%`, `+--`). The second character is
  tested, because the first may be a sign [2+].
- ALARM (2, 4 or 6 hex digits by model) and EXC (3 or 6 hex digits) are bit fields [2+]; bits above 0x800 of EXC
  and most ALARM bits beyond 0x3F are one-source [1] (MD PnP's decode). EXC 0x800 means the SET algorithm runs
  normally: it is not an error. Unknown bits are kept as `exc_0x...` / `alarm_0x...` flags.

Decoding rules, which keep garbage from ever becoming a reading (there is no checksum to lean on):
- a record must start with a valid `MM/DD/YY HH:MM:SS `; every token must be `KEY=value` with an upper-case key,
  no key twice; SPO2, BPM, ALARM and EXC must be present, and every known key's value must have its format;
- SPO2, BPM and PI have their fixed widths (`098%`, `097`, `03.60%`), so a dropped digit is caught, and a
  known key with a character lost (`P=`, `SPMT=`) rejects the line rather than passing as a new field;
- values outside the spec's plausible ranges reject the whole line (it is damaged; FramedDriver checks them);
- what no check can catch, for want of a checksum: a bit flip that turns one digit into another (`8` -> `9`).
  Uniform noise cannot pass: the start alone (12 digits and 6 separators in place) fits under 1 line start in 10^31,
  and 100 MB of it made no reading (tests/devices/test_noise.py), so nothing beyond the rules above is needed.
- anything else (a partial first line after opening the port, the TrendCom trend format, noise) is one
  ProtocolError per line: every line is a frame (no `sync`). A line with no LF within MAX_LINE bytes is an
  overflow; the rest of it, up to its LF, is skipped as one run of noise (so lines after it in the same read are
  still read).
"""

from __future__ import annotations

import re
from datetime import datetime
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
)

SPEC = DeviceSpec(
    model="masimo-ascii1",
    kind=DeviceKind.PULSE_OXIMETER,
    title="Masimo ASCII 1 serial output",
    serves=("Masimo Rad-8", "Masimo Radical-7", "Masimo Radical-5"),
    serial=SerialSettings(baudrate=9600),
    metrics=("spo2", "pulse_rate", "perfusion_index"),
    frame_interval_s=1.0,
    stale_after_s=5.0,
)

MAX_LINE = 400  # the longest layout (rainbow Radical-7) is about 190 characters
LINE_END = re.compile(rb"\n")

# EXC bit -> flag. Several bits fold into one flag because the gateway acts on them alike.
EXC_FLAGS: dict[int, str] = {
    0x000001: "no_sensor",
    0x000002: "sensor_fault",  # defective sensor
    0x000004: "low_perfusion",
    0x000008: "searching",  # pulse search
    0x000010: "interference",
    0x000020: "probe_off",  # sensor off the patient
    0x000040: "ambient_light",
    0x000080: "sensor_fault",  # unrecognised sensor
    0x000100: "sensor_fault",  # incompatible sensor [1]; the manual says reserved
    0x000400: "low_signal_iq",
    0x001000: "no_sensor",  # no cable connected [1]
    0x002000: "sensor_fault",  # cable life expired [1]
    0x004000: "sensor_fault",  # incompatible cable [1]
    0x008000: "sensor_fault",  # unrecognised cable [1]
    0x010000: "sensor_fault",  # defective cable [1]
    0x020000: "sensor_calibrating",  # [1]
    0x040000: "sensor_fault",  # sensor life expired [1]
    0x080000: "sensor_fault",  # emitter temperature out of range [1]
    0x100000: "sensor_fault",  # sensor current limit exceeded [1]
    0x200000: "spco_low_confidence",  # [1]
    0x400000: "spmet_low_confidence",  # [1]
}
EXC_SET = 0x000800  # Masimo SET: normal operation, not a flag
EXC_RESERVED = 0x000200 | 0x800000

ALARM_FLAGS: dict[int, str] = {
    0x0001: "device_alarm_spo2_high",
    0x0002: "device_alarm_spo2_low",
    0x0004: "device_alarm_pulse_high",
    0x0008: "device_alarm_pulse_low",
    0x0010: "device_alarm_active",
    0x0020: "device_alarm_silenced",
    0x0040: "low_battery",  # [1]
    0x0100: "device_alarm_spco_high",  # [1]
    0x0200: "device_alarm_spco_low",  # [1]
    0x0400: "device_alarm_spmet_high",  # [1]
    0x0800: "device_alarm_spmet_low",  # [1]
    0x1000: "device_alarm_desat",  # [1]
    0x2000: "device_alarm_pi_delta",  # [1]
}

# State priority: the first present wins; the other quality flags become conditions.
STATUS = StatusRules(
    states=(
        ("no_sensor", DeviceState.NO_SENSOR),
        ("sensor_fault", DeviceState.SENSOR_FAULT),
        ("probe_off", DeviceState.PROBE_OFF),
        ("searching", DeviceState.SEARCHING),
    ),
    conditions=("low_perfusion", "interference", "low_signal_iq", "ambient_light", "sensor_calibrating"),
    details={
        DeviceState.OK: "valid data",
        DeviceState.NO_SENSOR: "no sensor or cable connected",
        DeviceState.SENSOR_FAULT: "sensor or cable fault",
        DeviceState.PROBE_OFF: "sensor off patient",
        DeviceState.SEARCHING: "searching for pulse",
    },
)

PREFIX = re.compile(rb"(\d\d)/(\d\d)/(\d\d) (\d\d):(\d\d):(\d\d) ")
KEY = re.compile(r"[A-Z][A-Z0-9]*\Z")
LOOSE_VALUE = re.compile(r"[0-9A-Fa-f.+\-%]+\Z")
# Known keys: value formats, digits or the dash form of the same shape.
FORMATS: dict[str, re.Pattern[str]] = {
    "SN": re.compile(r"(\d{1,10}|-{1,10})\Z"),
    # The metrics' widths are fixed on every model seen [2+]: a dropped digit must not pass as another value.
    "SPO2": re.compile(r"(\d{3}|-{3})%?\Z"),
    "BPM": re.compile(r"(\d{3}|-{3})\Z"),
    "PI": re.compile(r"(\d{2}\.\d{2}|--\.--)%?\Z"),
    "SPCO": re.compile(r"(\d{1,2}\.\d|-{1,2}\.-|-{1,2})%?\Z"),
    "SPMET": re.compile(r"(\d{1,2}\.\d|-{1,2}\.-|-{1,2})%?\Z"),
    "DESAT": re.compile(r"(\d{1,2}|-{1,2})\Z"),
    "PIDELTA": re.compile(r"[+-](\d{1,2}|-{1,2})\Z"),
    "PVI": re.compile(r"(\d{1,3}|-{1,3})\Z"),
    "ALARM": re.compile(r"[0-9A-Fa-f]{2,8}\Z"),
    "EXC": re.compile(r"[0-9A-Fa-f]{3,8}\Z"),
}
REQUIRED = ("SPO2", "BPM", "ALARM", "EXC")
KNOWN_KEYS = frozenset(FORMATS) | {"SPHB", "SPOC", "RESVD", "EXC1"}
# A key with one character lost (`P` for `PI`, `SPMT` for `SPMET`) is a damaged line, not a new field.
DAMAGED_KEYS: dict[str, str] = {k[:i] + k[i + 1 :]: k for k in KNOWN_KEYS for i in range(len(k))}


class _LineError(Exception):
    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _missing(value: str) -> bool:
    return "-" in value[:2]


def _number(fields: dict[str, str], key: str) -> float | None:
    value = fields.get(key)
    if value is None or _missing(value):
        return None
    return float(value.rstrip("%"))


def _bits(value: int, table: dict[int, str], unknown_prefix: str, ignore: int = 0) -> list[str]:
    flags: list[str] = []
    bit = 1
    while bit <= value:
        if value & bit and not ignore & bit:
            flag = table.get(bit, f"{unknown_prefix}0x{bit:x}")
            if flag not in flags:
                flags.append(flag)
        bit <<= 1
    return flags


# --- fast path ---------------------------------------------------------------------------------------------------
# A gateway decodes one line a second from each of hundreds of devices, nearly all in the one layout their model
# sends (the Rad-8's, as `encode` writes it; the Radical-7 adds PVI). One match of FAST_LINE accepts only lines the
# general parser accepts, with the same fields, so such a line is decoded without the per-token checks; anything
# else (other layouts, damage, noise) goes to `_parse_general`, which alone says why a line is not a record.
# Each value pattern is the one of FORMATS, in bytes; the time of day is checked here, the date by `_date_text`.
FAST_LINE = re.compile(
    rb"(\d\d/\d\d/\d\d) ((?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d)"
    rb" SN=(?:\d{1,10}|-{1,10})"
    rb" SPO2=(?:(\d{3})|-{3})%?"
    rb" BPM=(?:(\d{3})|-{3})"
    rb" PI=(?:(\d\d\.\d\d)|--\.--)%?"
    rb" SPCO=(?:\d{1,2}\.\d|-{1,2}\.-|-{1,2})%?"
    rb" SPMET=(?:\d{1,2}\.\d|-{1,2}\.-|-{1,2})%?"
    rb" DESAT=(?:\d{1,2}|-{1,2})"
    rb" PIDELTA=[+-](?:\d{1,2}|-{1,2})"
    rb"(?: PVI=(?:\d{1,3}|-{1,3}))?"
    rb" ALARM=([0-9A-Fa-f]{2,8})"
    rb" EXC=([0-9A-Fa-f]{3,8})"
    rb"[\r\n]*\Z"  # what `raw.rstrip(b"\r\n")` takes off
)
CACHE_SIZE = 256  # entries per cache below; emptied when full, so noise that passes FAST_LINE cannot grow them
_dates: dict[bytes, str | None] = {}
_words: dict[tuple[bytes, bytes], tuple[int, tuple[str, ...]]] = {}


def _date_text(date: bytes) -> str | None:
    """`MM/DD/YY` -> `YYYY-MM-DDT` as strftime writes it, or None for no such day. Cached: a device's date changes
    once a day, and building a datetime for it was the dearest step of a line."""
    text = _dates.get(date, "")  # "" (never a date text): not seen yet
    if text == "":
        try:
            text = datetime(2000 + int(date[6:8]), int(date[0:2]), int(date[3:5])).strftime("%Y-%m-%dT")
        except ValueError:
            text = None
        if len(_dates) >= CACHE_SIZE:
            _dates.clear()
        _dates[date] = text
    return text


def _words_of(exc_hex: bytes, alarm_hex: bytes) -> tuple[int, tuple[str, ...]]:
    """EXC and ALARM as sent -> the EXC code and the flags of both. Cached: a device repeats the same pair for
    minutes on end, and `_bits` walks every bit of both words."""
    words = _words.get((exc_hex, alarm_hex))
    if words is None:
        exc = int(exc_hex, 16)
        flags = _bits(exc, EXC_FLAGS, "exc_", ignore=EXC_SET | EXC_RESERVED) + _bits(
            int(alarm_hex, 16), ALARM_FLAGS, "alarm_"
        )
        if len(_words) >= CACHE_SIZE:
            _words.clear()
        words = _words[(exc_hex, alarm_hex)] = (exc, tuple(flags))
    return words


def _parse_fast(raw: bytes) -> Record | None:
    """The Record `_parse_general` makes of `raw`, for a line in the usual layout; None for any other line."""
    match = FAST_LINE.match(raw)
    if match is None:
        return None
    date, hms, spo2, bpm, pi, alarm_hex, exc_hex = match.groups()
    day = _date_text(date)
    if day is None:
        return None
    metrics: dict[str, float] = {}  # in the order the general parser fills it, so even the reprs are equal
    if spo2 is not None:
        metrics["spo2"] = int(spo2)
    if bpm is not None:
        metrics["pulse_rate"] = int(bpm)
    if pi is not None:
        metrics["perfusion_index"] = float(pi)
    exc, flags = _words_of(exc_hex, alarm_hex)
    # Reading's fields by position (metrics, flags, device_time, raw): keywords cost a frozen dataclass ~150 ns more.
    return Record(Reading(metrics, flags, day + hms.decode("ascii"), raw), exc)


def parse_record(raw: bytes) -> Record:
    """One line with its CR LF -> a Record (the EXC word its code), or _LineError saying why it is not a record."""
    record = _parse_fast(raw)
    return record if record is not None else _parse_general(raw)


def _parse_general(raw: bytes) -> Record:
    """`parse_record` for any line: each token checked on its own, so a line that is not a record says why."""
    line = raw.rstrip(b"\r\n")
    prefix = PREFIX.match(line)
    if prefix is None:
        raise _LineError(ErrorKind.MALFORMED, "not an ASCII 1 record: no 'MM/DD/YY HH:MM:SS ' at the start")
    try:
        mm, dd, yy, hh, mi, ss = (int(g) for g in prefix.groups())
        device_time = datetime(2000 + yy, mm, dd, hh, mi, ss).strftime("%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise _LineError(ErrorKind.MALFORMED, "invalid date or time at the start of the line") from None
    try:
        text = line[prefix.end() :].decode("ascii")
    except UnicodeDecodeError:
        raise _LineError(ErrorKind.MALFORMED, "non-ASCII bytes in the record") from None
    if not text.isprintable():
        raise _LineError(ErrorKind.MALFORMED, "control characters in the record")
    fields: dict[str, str] = {}
    for token in text.split(" "):
        key, sep, value = token.partition("=")
        if not sep or not KEY.match(key) or not value:
            hint = " (looks like TrendCom trend output, not ASCII 1)" if key in ("SpO2", "PR") else ""
            raise _LineError(ErrorKind.MALFORMED, f"token {token[:20]!r} is not KEY=value{hint}")
        if key in fields:
            raise _LineError(ErrorKind.MALFORMED, f"key {key} appears twice")
        if key not in KNOWN_KEYS and key in DAMAGED_KEYS:
            raise _LineError(ErrorKind.MALFORMED, f"key {key} looks like {DAMAGED_KEYS[key]} with a byte lost")
        pattern = FORMATS.get(key, LOOSE_VALUE)
        if not pattern.match(value):
            raise _LineError(ErrorKind.MALFORMED, f"{key}={value[:20]!r} has not the format of an ASCII 1 field")
        fields[key] = value
    absent = [k for k in REQUIRED if k not in fields]
    if absent:
        raise _LineError(ErrorKind.MALFORMED, f"not an ASCII 1 record: no {', '.join(absent)}")

    metrics: dict[str, float] = {}
    for key, metric in (("SPO2", "spo2"), ("BPM", "pulse_rate"), ("PI", "perfusion_index")):
        number = _number(fields, key)
        if number is not None:
            metrics[metric] = number if metric == "perfusion_index" else int(number)
    exc = int(fields["EXC"], 16)
    alarm = int(fields["ALARM"], 16)
    flags = _bits(exc, EXC_FLAGS, "exc_", ignore=EXC_SET | EXC_RESERVED) + _bits(alarm, ALARM_FLAGS, "alarm_")
    return Record(Reading(metrics=metrics, flags=tuple(flags), device_time=device_time, raw=raw), exc)


class MasimoAscii1Driver(FramedDriver):
    spec: ClassVar[DeviceSpec] = SPEC
    status_rules = STATUS
    no_frame = f"rest of a line longer than {MAX_LINE} bytes"  # the only bytes this driver skips

    def reset(self) -> None:
        super().reset()
        self.sync = None

    def decode_frame(self, buf: bytes, pos: int, now: float) -> tuple[int, Frame | None]:
        if self.sync is not None:  # the LF that ends an overlong line: the next line starts after it
            self.sync = None
            return self.skip(buf[pos : pos + 1])
        end = buf.find(b"\n", pos, pos + MAX_LINE + 2)
        self.examined += (min(len(buf), pos + MAX_LINE + 2) if end < 0 else end) - pos
        if end < 0:
            if len(buf) - pos > MAX_LINE + 1:
                self.sync = LINE_END  # the rest of the line, up to its LF, is skipped as one run
                cut = buf[pos : pos + MAX_LINE + 2]
                return len(cut), ProtocolError(ErrorKind.OVERFLOW, f"no line end within {MAX_LINE} bytes", cut)
            return self.need(MAX_LINE + 2, until=ord("\n"))
        raw = buf[pos : end + 1]
        if not raw.strip(b"\r\n"):
            return len(raw), None  # blank lines between records (a tty's CR->NL mapping makes them)
        try:
            return len(raw), parse_record(raw)
        except _LineError as err:
            return len(raw), ProtocolError(err.kind, err.detail, raw)


# --- encode (simulators) -------------------------------------------------------------------------------------

COND_EXC = {"low_perfusion": 0x004, "interference": 0x010, "low_signal_iq": 0x400, "ambient_light": 0x040}
BLANKING_EXC = {"no_sensor": 0x001, "probe_off": 0x820, "searching": 0x808, "sensor_fault": 0x002}


def encode(sample: Sample) -> bytes:
    """The byte-exact Rad-8 ASCII 1 line (notes §1.7), CR LF included."""
    when = sample.device_time or datetime(2016, 1, 1)
    blank = next((c for c in BLANKING_EXC if c in sample.conditions), None)
    if blank is not None:
        exc = BLANKING_EXC[blank]
        spo2 = pulse = pi = None
    else:
        exc = EXC_SET
        spo2, pulse, pi = (sample.metrics.get(m) for m in ("spo2", "pulse_rate", "perfusion_index"))
    for condition, bit in COND_EXC.items():
        if condition in sample.conditions:
            exc |= bit
    serial = int(sample.extra.get("serial", 56661))
    alarm = int(sample.extra.get("alarm", 0))
    fields = [
        when.strftime("%m/%d/%y %H:%M:%S"),
        f"SN={serial:010d}",
        "SPO2=---%" if spo2 is None else f"SPO2={round(spo2):03d}%",
        "BPM=---" if pulse is None else f"BPM={round(pulse):03d}",
        "PI=--.--%" if pi is None else f"PI={pi:05.2f}%",
        "SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+--",
        f"ALARM={alarm:04X}",
        f"EXC={exc:06X}",
    ]
    return (" ".join(fields) + "\r\n").encode("ascii")


MODEL = Model(spec=SPEC, driver=MasimoAscii1Driver, encode=encode)
