"""Masimo ASCII 1 specifics: statuses on change only, bit fields, damaged lines, buffer limits."""

from __future__ import annotations

import pytest

from devices.base import DeviceState, DeviceStatus, ErrorKind, ProtocolError, Reading
from devices.masimo_ascii1 import MODEL, MasimoAscii1Driver

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
    from datetime import datetime

    from devices.base import Sample

    sample = Sample(
        {"spo2": 98, "pulse_rate": 97, "perfusion_index": 3.6}, device_time=datetime(2016, 2, 22, 22, 47, 45)
    )
    assert MODEL.encode(sample) == (
        b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- "
        b"ALARM=0000 EXC=000800\r\n"
    )
