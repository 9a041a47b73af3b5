"""The chores FramedDriver does for every model, on a toy protocol: runs of noise, rejected frame starts, range
checks against the spec, statuses on change, time-made events, and the optional capabilities' Protocols.

Toy frame: `AA SPO2 PULSE SUM`, SUM the low byte of the first three; SPO2 0 means the probe is off.
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
    Event,
    Frame,
    FramedDriver,
    Measuring,
    Polling,
    ProtocolError,
    Reading,
    Record,
    SerialSettings,
    StatusRules,
    event_to_dict,
)

SPEC = DeviceSpec(
    model="toy",
    kind=DeviceKind.PULSE_OXIMETER,
    title="toy",
    serves=(),
    serial=SerialSettings(9600),
    metrics=("spo2", "pulse_rate"),
    frame_interval_s=1.0,
    stale_after_s=3.0,
    limits=(("pulse_rate", 1, 250),),
)


class ToyDriver(FramedDriver):
    spec: ClassVar[DeviceSpec] = SPEC
    status_rules = StatusRules((("probe_off", DeviceState.PROBE_OFF),))
    sync = re.compile(rb"\xaa")

    def reject(self, buf: bytes, i: int, skipped: int, now: float) -> ErrorKind | None:
        if len(buf) - i >= 4 and sum(buf[i : i + 3]) & 0xFF != buf[i + 3]:
            return ErrorKind.BAD_CHECKSUM
        return None

    def decode_frame(self, buf: bytes, pos: int, now: float) -> tuple[int, Frame | None]:
        if len(buf) - pos < 4:
            return self.need(4)
        spo2, pulse = buf[pos + 1], buf[pos + 2]
        metrics = {"spo2": spo2, "pulse_rate": pulse} if spo2 else {}
        return 4, Record(Reading(metrics, () if spo2 else ("probe_off",), raw=buf[pos : pos + 4]), code=spo2)


class ToyPollingDriver(ToyDriver):
    def outgoing(self, now: float) -> bytes:
        self.announce(DeviceStatus(DeviceState.MEASURING))
        return b"?"


def frame(spo2: int, pulse: int = 72) -> bytes:
    return bytes((0xAA, spo2, pulse, (0xAA + spo2 + pulse) & 0xFF))


def feed(data: bytes, step: int = 0) -> list[Event]:
    driver = ToyDriver()
    step = step or len(data)
    return [e for i in range(0, len(data), step) for e in driver.feed(data[i : i + step], 0.0)]


def test_noise_is_one_error_when_a_frame_ends_it_whatever_the_split() -> None:
    stream = b"\x00\x01\x02" + frame(97) + b"\xaa\x00" + frame(96)
    events = feed(stream)
    assert [type(e) for e in events] == [ProtocolError, DeviceStatus, Reading, ProtocolError, Reading]
    assert [e.dropped for e in events if isinstance(e, ProtocolError)] == [b"\x00\x01\x02", b"\xaa\x00"]
    assert all(feed(stream, step) == events for step in (1, 2, 3, 5))


def test_a_rejected_start_gives_the_run_its_kind() -> None:
    bad = frame(97)[:3] + b"\x00"
    events = feed(bad + b"\x01\x02" + frame(97))
    error = events[0]
    assert isinstance(error, ProtocolError) and error.kind is ErrorKind.BAD_CHECKSUM
    assert error.dropped == bad + b"\x01\x02"


def test_values_outside_the_spec_make_the_record_an_error() -> None:
    """One place checks ranges: METRICS (SpO2 1-100) and the spec's own narrower limits (pulse 1-250)."""
    for damaged in (frame(101), frame(97, 251)):
        events = feed(damaged + frame(97))
        assert isinstance(events[0], ProtocolError) and events[0].kind is ErrorKind.OUT_OF_RANGE
        assert events[0].dropped == damaged
        assert [type(e) for e in events[1:]] == [DeviceStatus, Reading]  # no status from the damaged record


def test_status_only_on_change_with_the_device_code() -> None:
    events = feed(frame(97) + frame(96) + frame(0) + frame(0) + frame(95))
    statuses = [e for e in events if isinstance(e, DeviceStatus)]
    assert [(s.state, s.code) for s in statuses] == [
        (DeviceState.OK, 97),
        (DeviceState.PROBE_OFF, 0),
        (DeviceState.OK, 95),
    ]
    assert sum(isinstance(e, Reading) for e in events) == 5


def test_flush_reports_what_waits_and_reset_announces_the_status_again() -> None:
    driver = ToyDriver()
    assert driver.feed(b"\x00" + frame(97)[:2], 0.0) == []
    assert [event_to_dict(e)["dropped"] for e in driver.flush()] == ["00aa61"]
    driver.feed(frame(97), 0.0)
    driver.reset()
    assert isinstance(driver.feed(frame(97), 0.0)[0], DeviceStatus)


def test_time_made_events_come_with_the_next_poll_or_feed_and_capabilities_are_protocols() -> None:
    driver = ToyPollingDriver()
    assert isinstance(driver, Polling) and not isinstance(driver, Measuring)
    assert not isinstance(ToyDriver(), Polling)  # no `outgoing`: an output-only device is never polled
    driver.outgoing(0.0)
    driver.outgoing(0.2)  # the same status again is not repeated
    assert [type(e) for e in driver.poll(0.2)] == [DeviceStatus]
    assert driver.poll(0.4) == []
    assert [type(e) for e in driver.feed(frame(97), 0.4)] == [DeviceStatus, Reading]  # measuring -> ok
    driver.outgoing(0.6)  # measuring again: it comes first with the next feed
    states = [e.state for e in driver.feed(frame(97), 0.6) if isinstance(e, DeviceStatus)]
    assert states == [DeviceState.MEASURING, DeviceState.OK]
