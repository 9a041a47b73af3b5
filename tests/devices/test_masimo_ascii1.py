"""Masimo ASCII 1 specifics: statuses on change only, bit fields, damaged lines, buffer limits; the fast path
decodes every line as the general parser does."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from devices import masimo_ascii1
from devices.base import DeviceState, DeviceStatus, ErrorKind, ProtocolError, Reading, Record, Sample
from devices.masimo_ascii1 import (
    BLANKING_EXC,
    CACHE_SIZE,
    COND_EXC,
    MODEL,
    MasimoAscii1Driver,
    _LineError,
    _parse_fast,
    _parse_general,
    encode,
    parse_record,
)

LINE = "02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM={alarm} EXC={exc}\r\n"


def line(exc: str = "000800", alarm: str = "0000", **replace: str) -> bytes:
    text = LINE.format(exc=exc, alarm=alarm)
    for key, value in replace.items():
        text = text.replace(f"{key}=", f"{key}=\x00", 1)
        head, _, rest = text.partition(f"{key}=\x00")
        text = f"{head}{key}={value}{rest[rest.index(' ') if ' ' in rest else len(rest) - 2 :]}"
    return text.encode()


def test_status_only_on_change_and_before_the_reading() -> None:
    driver = MasimoAscii1Driver()
    events = driver.feed(line() + line() + line(exc="000828") + line(exc="000828") + line(), 0.0)
    kinds = [(type(e).__name__, getattr(e, "state", None)) for e in events]
    assert kinds == [
        ("DeviceStatus", DeviceState.OK),
        ("Reading", None),
        ("Reading", None),
        ("DeviceStatus", DeviceState.PROBE_OFF),
        ("Reading", None),
        ("Reading", None),
        ("DeviceStatus", DeviceState.OK),
        ("Reading", None),
    ]
    probe_off = events[3]
    assert isinstance(probe_off, DeviceStatus) and probe_off.code == 0x828


def test_reset_announces_the_status_again() -> None:
    driver = MasimoAscii1Driver()
    driver.feed(line(), 0.0)
    driver.reset()
    assert isinstance(driver.feed(line(), 0.0)[0], DeviceStatus)


@pytest.mark.parametrize(
    ("exc", "state", "conditions"),
    [
        ("000001", DeviceState.NO_SENSOR, ()),
        ("001800", DeviceState.NO_SENSOR, ()),
        ("000802", DeviceState.SENSOR_FAULT, ()),
        ("000808", DeviceState.SEARCHING, ()),
        ("000C14", DeviceState.OK, ("low_perfusion", "interference", "low_signal_iq")),
        ("000c00", DeviceState.OK, ("low_signal_iq",)),
        ("000000", DeviceState.OK, ()),
    ],
)
def test_exc_bits_to_state_and_conditions(exc: str, state: DeviceState, conditions: tuple[str, ...]) -> None:
    status = MasimoAscii1Driver().feed(line(exc=exc), 0.0)[0]
    assert isinstance(status, DeviceStatus)
    assert (status.state, status.conditions) == (state, conditions)


def test_unknown_bits_are_kept_as_flags() -> None:
    events = MasimoAscii1Driver().feed(line(exc="800800", alarm="4080"), 0.0)
    reading = events[-1]
    assert isinstance(reading, Reading)
    assert "exc_0x800000" not in reading.flags  # documented reserved bit: ignored
    assert "alarm_0x80" in reading.flags and "alarm_0x4000" in reading.flags


@pytest.mark.parametrize(
    ("damaged", "kind"),
    [
        (line(SPO2="150%"), ErrorKind.OUT_OF_RANGE),
        (line(BPM="000"), ErrorKind.OUT_OF_RANGE),
        (line(PI="45.00%"), ErrorKind.OUT_OF_RANGE),
        (line(SPO2="98%"), ErrorKind.MALFORMED),  # a dropped digit
        (line(EXC="0008G0"), ErrorKind.MALFORMED),
        (line().replace(b"BPM=097", b"BPM=097 BPM=097"), ErrorKind.MALFORMED),
        (line().replace(b"PI=", b"P="), ErrorKind.MALFORMED),  # a byte lost from a key
        (line().replace(b"SPO2=", b"SPO2"), ErrorKind.MALFORMED),
        (line().replace(b"02/22/16", b"13/45/16"), ErrorKind.MALFORMED),
        (line().replace(b"SN=", b"S\x07="), ErrorKind.MALFORMED),
        (line().replace(b"ALARM=0000 ", b""), ErrorKind.MALFORMED),
    ],
)
def test_damaged_lines_are_errors_never_readings(damaged: bytes, kind: ErrorKind) -> None:
    events = MasimoAscii1Driver().feed(damaged, 0.0)
    assert len(events) == 1
    error = events[0]
    assert isinstance(error, ProtocolError) and error.kind == kind
    assert error.dropped == damaged


def test_a_line_without_end_overflows_and_the_stream_recovers() -> None:
    driver = MasimoAscii1Driver()
    events = driver.feed(b"x" * 1000, 0.0)
    assert [e.kind for e in events if isinstance(e, ProtocolError)] == [ErrorKind.OVERFLOW]
    assert any(isinstance(e, Reading) for e in driver.feed(b"\r\n" + line(), 0.0))


def test_lowercase_hex_and_lone_cr_lines() -> None:
    events = MasimoAscii1Driver().feed(b"\r\n\r\n" + line(exc="000c00", alarm="00ff"), 0.0)
    assert [type(e) for e in events] == [DeviceStatus, Reading]


def test_encode_matches_the_real_capture_byte_for_byte() -> None:
    sample = Sample(
        {"spo2": 98, "pulse_rate": 97, "perfusion_index": 3.6}, device_time=datetime(2016, 2, 22, 22, 47, 45)
    )
    assert MODEL.encode(sample) == (
        b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- "
        b"ALARM=0000 EXC=000800\r\n"
    )


# --- the fast path against the general parser ------------------------------------------------------------------
# parse_record takes a line in the usual layout through one regular expression (_parse_fast) and every other line
# through _parse_general. The two must agree on every line, down to the repr of the Record (int vs float metrics,
# the order of the metrics) and the kind and detail of the error: these tests run both on real, encoded and
# damaged lines.

VECTORS = Path(__file__).parent.parent / "vectors"
SEED = 20261202


def outcome(parse: Callable[[bytes], Record], raw: bytes) -> tuple[object, ...]:
    try:
        return ("record", repr(parse(raw)))
    except _LineError as err:
        return ("error", err.kind, err.detail)


def same_as_general(raw: bytes) -> bool:
    """Asserts parse_record and _parse_fast (where it takes the line) decode `raw` as _parse_general does; True if
    the fast path took it."""
    expected = outcome(_parse_general, raw)
    assert outcome(parse_record, raw) == expected, raw
    fast = _parse_fast(raw)
    if fast is not None:
        assert ("record", repr(fast)) == expected, raw
    return fast is not None


def vector_lines() -> list[bytes]:
    """Every line of the model's vectors and of the verbatim samples, with the line ends they come with and with
    CR LF, LF, CR and none."""
    lines: list[bytes] = []
    for case in json.loads((VECTORS / "masimo_ascii1.json").read_text())["cases"]:
        data = bytes.fromhex(case["hex"]) if "hex" in case else str(case["text"]).encode("latin-1")
        lines += data.splitlines(keepends=True)
    samples = (VECTORS / "masimo_ascii1_samples.txt").read_bytes().splitlines()
    lines += [s for s in samples if s and not s.startswith(b"#")]
    bare = {line.rstrip(b"\r\n") for line in lines}
    return lines + [b + end for b in sorted(bare) for end in (b"\r\n", b"\n", b"\r", b"")]


def test_vector_lines_decode_alike() -> None:
    taken = [same_as_general(raw) for raw in vector_lines()]
    assert any(taken) and not all(taken)  # the real Rad-8 capture goes the fast way; the TrendCom lines do not


def random_line(rng: random.Random) -> bytes:
    """A line as encode() writes it, with random values, conditions, alarm word, serial number and clock."""
    conditions = frozenset(c for c in (*COND_EXC, *BLANKING_EXC) if rng.random() < 0.1)
    metrics: dict[str, float | None] = {
        "spo2": None if rng.random() < 0.1 else rng.randint(0, 100),
        "pulse_rate": None if rng.random() < 0.1 else rng.randint(0, 300),
        "perfusion_index": None if rng.random() < 0.1 else rng.randint(0, 9999) / 100,
    }
    when = datetime(2000, 1, 1) + timedelta(seconds=rng.randrange(100 * 365 * 86400))
    alarm = rng.choice([0, 0x10, 0x20, rng.randrange(1 << 16)])
    extra = {"serial": rng.randrange(10**10), "alarm": alarm}
    return encode(Sample(metrics, conditions=conditions, device_time=when, extra=extra))


def digits_or_dashes(rng: random.Random, shape: str) -> str:
    """`shape` with each 9 a random digit, or every 9 a dash; sometimes a digit more or fewer."""
    if rng.random() < 0.1:
        shape = shape + "9" if rng.random() < 0.5 else shape[1:]
    if rng.random() < 0.3:
        return shape.replace("9", "-")
    return "".join(str(rng.randrange(10)) if c == "9" else c for c in shape)


def varied_line(rng: random.Random) -> bytes:
    """A random line with the other values the layout allows: SPCO, SPMET, DESAT, PIDELTA filled in, a PVI, '%'
    left off, lower-case hex, words of other widths, widths one off (some of these are records, some not)."""
    text = random_line(rng).decode()
    optional = " ".join(
        [
            f"SPCO={digits_or_dashes(rng, rng.choice(['9.9', '99.9', '99', '9']))}{rng.choice(['%', ''])}",
            f"SPMET={digits_or_dashes(rng, rng.choice(['9.9', '99.9', '99', '9']))}{rng.choice(['%', ''])}",
            f"DESAT={digits_or_dashes(rng, rng.choice(['9', '99']))}",
            f"PIDELTA={rng.choice('+-')}{digits_or_dashes(rng, rng.choice(['9', '99']))}",
        ]
    )
    text = text.replace("SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+--", optional)
    if rng.random() < 0.3:
        text = text.replace(" ALARM=", f" PVI={digits_or_dashes(rng, rng.choice(['9', '99', '999']))} ALARM=")
    if rng.random() < 0.2:
        text = re.sub(r"(SPO2=\S+)%", r"\1", text)
    if rng.random() < 0.2:
        text = re.sub(r"(PI=\S+)%", r"\1", text)
    if rng.random() < 0.3:  # other widths: 2, 4 or 6 digits by model, but 1 or 9 is no word
        text = re.sub(r"(ALARM|EXC)=(\w+)", lambda m: f"{m[1]}={int(m[2], 16):0{rng.randint(1, 9)}X}", text)
    if rng.random() < 0.2:
        text = re.sub(r"(ALARM|EXC)=(\w+)", lambda m: f"{m[1]}={m[2].lower()}", text)
    if rng.random() < 0.2:
        text = re.sub(r"SN=\d+", "SN=" + digits_or_dashes(rng, "9" * rng.randint(1, 10)), text)
    return text.encode()


ODD_BYTES = b"0123456789-+.%:/= AaFfGgx\r\n\t\x00\x7f\xff"


def bad_clock(rng: random.Random) -> bytes:
    """A `MM/DD/YY HH:MM:SS` with each part near or past its limits."""
    parts = [rng.choice([0, 1, 2, 4, 9, 11, 12, 13, 28, 29, 30, 31, 32, 59, 60, 99]) for _ in range(6)]
    return "{:02d}/{:02d}/{:02d} {:02d}:{:02d}:{:02d}".format(*parts).encode()


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """`raw` with one to three random kinds of damage a serial line or another layout could bring."""
    line = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(9)
        at = rng.randrange(len(line) + 1)
        if kind == 0 and line:
            del line[min(at, len(line) - 1)]
        elif kind == 1 and line:
            line[min(at, len(line) - 1)] = rng.choice([rng.choice(ODD_BYTES), rng.randrange(256)])
        elif kind == 2:
            line[at:at] = bytes([rng.choice(ODD_BYTES)])
        elif kind == 3:
            line = bytearray(re.sub(rb"(ALARM|EXC)=(\w+)", lambda m: m[1] + b"=" + m[2].lower(), bytes(line)))
        elif kind in (4, 5):  # swap, drop or repeat a token after the clock
            head, rest = bytes(line[:18]), bytes(line[18:]).rstrip(b"\r\n").split(b" ")
            i, j = rng.randrange(len(rest)), rng.randrange(len(rest))
            if kind == 4:
                rest[i], rest[j] = rest[j], rest[i]
            else:
                rest[i:i] = [rest[j]] if rng.random() < 0.5 else []
                del rest[i + 1 : i + 2]
            line = bytearray(head + b" ".join(rest) + b"\r\n")
        elif kind == 6:  # an extra space inside, at the start or at the end
            spaces = [i for i, c in enumerate(line) if c == 0x20]
            at = rng.choice([*spaces, 0, len(line.rstrip(b"\r\n"))])
            line[at:at] = b" "
        elif kind == 7:
            line[:17] = bad_clock(rng)
        else:  # another line end, or the line cut short
            line = bytearray(line.rstrip(b"\r\n") + rng.choice([b"", b"\r", b"\n", b"\r\r\n", b"\n\r\n", b"\r\n"]))
            if rng.random() < 0.3:
                line = line[: rng.randrange(len(line) + 1)]
    return bytes(line)


def test_encoded_lines_take_the_fast_path_and_decode_alike() -> None:
    rng = random.Random(SEED)
    assert all(same_as_general(random_line(rng)) for _ in range(3000))


def test_varied_lines_decode_alike_and_records_take_the_fast_path() -> None:
    rng = random.Random(SEED + 1)
    records = 0
    for _ in range(3000):
        raw = varied_line(rng)
        record = outcome(_parse_general, raw)[0] == "record"
        assert same_as_general(raw) == record, raw  # every record in the usual key order is taken by the fast path
        records += record
    assert 500 < records < 2500  # records and errors both


def test_damaged_lines_decode_alike() -> None:
    rng = random.Random(SEED + 2)
    records = taken = 0
    for i in range(20000):
        raw = mutate(rng, random_line(rng) if i % 2 else varied_line(rng))
        taken += same_as_general(raw)
        records += outcome(_parse_general, raw)[0] == "record"
    assert taken > 1000 and records - taken > 100 and 20000 - records > 10000  # fast, general and error outcomes


@pytest.mark.parametrize(
    ("clock", "valid"),
    [
        (b"02/29/16 12:00:00", True),
        (b"02/29/00 23:59:59", True),
        (b"12/31/99 00:00:00", True),
        (b"02/30/16 12:00:00", False),
        (b"02/29/17 12:00:00", False),
        (b"04/31/16 12:00:00", False),
        (b"13/01/16 12:00:00", False),
        (b"00/01/16 12:00:00", False),
        (b"01/00/16 12:00:00", False),
        (b"01/01/16 24:00:00", False),
        (b"01/01/16 23:60:00", False),
        (b"01/01/16 23:59:60", False),
    ],
)
def test_clock_checked_alike_twice(clock: bytes, valid: bool) -> None:
    raw = clock + line()[17:]
    for _ in range(2):  # the second time from the fast path's cache of dates
        assert same_as_general(raw) == valid
        assert outcome(parse_record, raw)[0] == ("record" if valid else "error")
    if not valid:
        assert outcome(parse_record, raw)[1:] == (ErrorKind.MALFORMED, "invalid date or time at the start of the line")


def test_the_fast_paths_caches_stay_bounded() -> None:
    rng = random.Random(SEED + 3)
    for _ in range(3 * CACHE_SIZE):
        same_as_general(random_line(rng))
    assert 0 < len(masimo_ascii1._dates) <= CACHE_SIZE and 0 < len(masimo_ascii1._words) <= CACHE_SIZE
