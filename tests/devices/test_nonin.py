"""Nonin DF2 / DF7 / DF8: vectors, framing and resync, status bits, the set-format command and the emulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import (
    METRICS,
    DeviceState,
    DeviceStatus,
    ErrorKind,
    Event,
    Model,
    ProtocolError,
    Reading,
    Sample,
    Waveform,
    event_to_dict,
)
from devices.nonin import (
    ACK,
    MODEL_DF2,
    MODEL_DF7,
    MODEL_DF8,
    MODELS,
    NAK,
    NoninDF2Driver,
    NoninDF7Driver,
    NoninDF8Driver,
    NoninEmulator,
    decode_hr,
    encode_df2,
    encode_df7,
    encode_df8,
    encode_packet,
    select_format_command,
)

VECTORS = Path(__file__).parent.parent / "vectors"
# Bytes that cannot start a record of any of the three formats, in front of or behind a vector.
GARBAGE = b"\x00\x13\x37\x42\x7f\x00\x55"
PACKET_MODELS = (MODEL_DF2, MODEL_DF7)
NORMAL = Sample(metrics={"spo2": 97, "pulse_rate": 72})


def load_cases() -> list[Any]:
    params = []
    for model in MODELS:
        doc = json.loads((VECTORS / f"{model.spec.model.replace('-', '_')}.json").read_text())
        assert doc["model"] == model.spec.model
        for case in doc["cases"]:
            params.append(pytest.param(model, case, id=f"{model.spec.model}-{case['name']}"))
    return params


def nonin_driver(model: Model) -> NoninDF2Driver | NoninDF7Driver | NoninDF8Driver:
    """A Nonin model's driver, typed: the set-format command (`outgoing`) and its reply are Nonin's own."""
    driver = model.driver()
    assert isinstance(driver, NoninDF2Driver | NoninDF7Driver | NoninDF8Driver)
    return driver


def feed_chunks(model: Model, chunks: list[bytes], now: float = 0.0) -> list[Event]:
    driver = model.driver()
    events: list[Event] = []
    for chunk in chunks:
        events += driver.feed(chunk, now)
    return events


def dicts(events: list[Event]) -> list[dict[str, Any]]:
    return [event_to_dict(e) for e in events]


def matches(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    return len(actual) == len(expected) and all(
        all(a.get(k) == v for k, v in e.items()) for a, e in zip(actual, expected, strict=True)
    )


def no_errors(events: list[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, ProtocolError)]


def of_type(events: list[Event], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def valid_raw(model: Model, raw: bytes) -> bool:
    """Independent check of a Reading's bytes: frames, checksums and SYNC (DF2/DF7) or the bit pattern (DF8)."""
    if model is MODEL_DF8:
        return len(raw) == 4 and raw[0] >= 0x80 and all(b < 0x80 for b in raw[1:])
    if len(raw) != 125:
        return False
    for k in range(25):
        frame = raw[5 * k : 5 * k + 5]
        status = frame[1] if model is MODEL_DF2 else frame[0]
        if model is MODEL_DF2 and frame[0] != 0x01:
            return False
        if not status & 0x80 or frame[3] & 0x80 or sum(frame[:4]) % 256 != frame[4]:
            return False
        if bool(status & 0x01) != (k == 0):
            return False
    return True


def in_ranges(reading: Reading) -> bool:
    return all(METRICS[name].low <= value <= METRICS[name].high for name, value in reading.metrics.items())


# --- vectors ------------------------------------------------------------------------------------------------


# Every vector whole, split everywhere, byte by byte and in garbage: tests/devices/test_drivers_generic.py (for every
# model). What is Nonin's own: garbage in front is reported as soon as a record locks, as one error.
@pytest.mark.parametrize(
    ("model", "case"),
    [p for p in load_cases() if any(e.get("type") == "reading" for e in p.values[1]["expect"])],
)
def test_garbage_in_front_is_reported_once_a_record_locks(model: Model, case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["hex"])
    wrapped = feed_chunks(model, [GARBAGE, data])
    assert isinstance(wrapped[0], ProtocolError) and wrapped[0].dropped.startswith(GARBAGE)


def test_capture_values_and_choice_of_display_slots() -> None:
    case = next(
        c for c in json.loads((VECTORS / "nonin_df2.json").read_text())["cases"] if c["name"] == "xpod_capture_packet"
    )
    data = bytes.fromhex(case["hex"])
    driver = NoninDF2Driver()
    events = driver.feed(data, 0.0)
    reading = of_type(events, Reading)[0]
    # HR-D (frames 20/21) = 61 and SpO2-D (frame 9) = 97; E-HR-D would say 62
    assert reading.metrics == {"spo2": 97, "pulse_rate": 61}
    assert reading.raw == data
    assert driver.firmware_revision == 0x29
    wave = of_type(events, Waveform)[0]
    assert (wave.name, len(wave.samples), wave.rate_hz) == ("pleth", 25, 75.0)


def test_hr_encoding_examples() -> None:
    assert decode_hr(0x00, 0x48) == 72
    assert decode_hr(0x01, 0x16) == 150
    assert decode_hr(0x03, 0x7F) == 511
    assert decode_hr(0xFC, 0xC8) == 72  # reserved and bit-7 bits are masked off


# --- framing and resync -------------------------------------------------------------------------------------


def packets(model: Model, *samples: Sample) -> list[bytes]:
    return [model.encode(s) for s in samples]


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
@pytest.mark.parametrize("lost", [0, 1, 7, 62, 124])
def test_resync_after_a_lost_byte(model: Model, lost: int) -> None:
    p1, p2, p3 = packets(model, NORMAL, Sample({"spo2": 90, "pulse_rate": 150}), Sample({"spo2": 88, "pulse_rate": 40}))
    damaged = p2[:lost] + p2[lost + 1 :]
    events = feed_chunks(model, [p1 + damaged + p3])
    readings = of_type(events, Reading)
    assert [r.metrics for r in readings] == [{"spo2": 97, "pulse_rate": 72}, {"spo2": 88, "pulse_rate": 40}]
    errors = of_type(events, ProtocolError)
    assert len(errors) == 1, errors  # one error for the whole run, not one per byte
    assert errors[0].dropped == damaged
    assert errors[0].kind in (ErrorKind.RESYNC, ErrorKind.BAD_CHECKSUM)


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
def test_resync_after_a_bad_checksum(model: Model) -> None:
    p1, p2, p3 = packets(model, NORMAL, NORMAL, NORMAL)
    bad = bytearray(p2)
    bad[9 * 5 + 4] ^= 0x01  # checksum of frame 10
    events = feed_chunks(model, [p1, bytes(bad), p3])
    errors = of_type(events, ProtocolError)
    assert [e.kind for e in errors] == [ErrorKind.BAD_CHECKSUM]
    assert errors[0].dropped == bytes(bad)
    assert len(of_type(events, Reading)) == 2


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
def test_sync_mid_packet_restarts_the_packet(model: Model) -> None:
    p1, p2, p3 = packets(model, NORMAL, NORMAL, NORMAL)
    short = p2[:20] + p2[25:]  # frame 5 lost whole: every frame is still valid
    events = feed_chunks(model, [p1 + short + p3])
    errors = of_type(events, ProtocolError)
    assert len(errors) == 1 and errors[0].kind is ErrorKind.RESYNC and "lost" in errors[0].detail
    assert errors[0].dropped == short
    assert len(of_type(events, Reading)) == 2


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
def test_no_lock_without_sync(model: Model) -> None:
    p1, p2 = packets(model, NORMAL, NORMAL)
    events = feed_chunks(model, [p1[5:] + p2])  # starts at frame 2
    assert [type(e) for e in events] == [ProtocolError, DeviceStatus, Reading, Waveform]
    assert events[0].dropped == p1[5:]  # type: ignore[union-attr]


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
def test_out_of_range_value_with_good_checksums_is_refused_and_keeps_the_lock(model: Model) -> None:
    bad = bytearray(model.encode(NORMAL))
    fl = 8 * 5 + 3  # float of frame 9: SpO2-D
    bad[fl] = 120
    bad[fl + 1] = sum(bad[fl - 3 : fl + 1]) % 256
    events = feed_chunks(model, [bytes(bad) + model.encode(NORMAL)])
    assert isinstance(events[0], ProtocolError) and events[0].kind is ErrorKind.OUT_OF_RANGE
    assert events[0].dropped == bytes(bad)
    assert [type(e) for e in events[1:]] == [DeviceStatus, Reading, Waveform]


def test_df8_resync_and_ranges() -> None:
    rec = encode_df8(NORMAL)
    events = feed_chunks(MODEL_DF8, [rec + rec[:2] + rec[3:] + rec + rec])
    assert [type(e) for e in events] == [DeviceStatus, Reading, ProtocolError, Reading, Reading]
    assert events[2].dropped == rec[:2] + rec[3:]  # type: ignore[union-attr]
    # bit pattern right but HR 400 / SpO2 110: not a record
    for bad in (bytes((0x83, 0x10, 0x61, 0x00)), bytes((0x80, 0x48, 0x6E, 0x00)), bytes((0x80, 0x00, 0x61, 0x00))):
        events = feed_chunks(MODEL_DF8, [bad + rec])
        assert of_type(events, ProtocolError)[0].kind is ErrorKind.OUT_OF_RANGE
        assert [r.raw for r in of_type(events, Reading)] == [rec]


def test_df8_contradictory_perfusion_only_refused_when_acquiring() -> None:
    both = bytes((0x98, 0x48, 0x61, 0x00))  # LPRF and MPRF
    assert not of_type(feed_chunks(MODEL_DF8, [both]), Reading)
    events = feed_chunks(MODEL_DF8, [encode_df8(NORMAL) + both])
    assert [r.flags for r in of_type(events, Reading)] == [(), ("low_perfusion",)]


# --- values and statuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
def test_missing_values_are_left_out(model: Model) -> None:
    for metrics, expected in (
        ({"spo2": None, "pulse_rate": 72}, {"pulse_rate": 72}),
        ({"spo2": 95, "pulse_rate": None}, {"spo2": 95}),
        ({"spo2": None, "pulse_rate": None}, {}),
    ):
        reading = of_type(feed_chunks(model, [model.encode(Sample(metrics))]), Reading)[0]
        assert reading.metrics == expected
        assert 0 not in reading.metrics.values() and 127 not in reading.metrics.values()
    reading = of_type(feed_chunks(model, [model.encode(Sample({"spo2": None, "pulse_rate": None}))]), Reading)[0]
    assert "searching" in reading.flags and not reading.trustworthy


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
def test_probe_off_keeps_held_display_values_but_flags_them(model: Model) -> None:
    packet = model.encode(Sample({"spo2": 97, "pulse_rate": 72}, frozenset({"probe_off"})))
    fl = 3
    floats = [packet[5 * k + fl] for k in range(25)]
    assert (floats[0], floats[1], floats[2]) == (3, 0x7F, 0x7F)  # recording slots missing
    assert (floats[8], floats[19], floats[20]) == (97, 0, 72)  # display slots held
    status_at = 1 if model is MODEL_DF2 else 0
    assert all(packet[5 * k + status_at] & 0x08 for k in range(25))  # SNSA
    events = feed_chunks(model, [packet])
    status, reading = events[0], events[1]
    assert isinstance(status, DeviceStatus) and status.state is DeviceState.PROBE_OFF
    assert isinstance(reading, Reading) and reading.metrics == {"spo2": 97, "pulse_rate": 72}
    assert "probe_off" in reading.flags and not reading.trustworthy


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
@pytest.mark.parametrize(
    ("conditions", "state", "flag", "state_conditions"),
    [
        ((), DeviceState.OK, None, ()),
        (("probe_off",), DeviceState.PROBE_OFF, "probe_off", ()),
        (("no_sensor",), DeviceState.NO_SENSOR, "no_sensor", ()),
        (("searching",), DeviceState.SEARCHING, "out_of_track", ()),
        (("artifact",), DeviceState.OK, "artifact", ()),
        (("low_perfusion",), DeviceState.OK, "low_perfusion", ("low_perfusion",)),
        (("marginal_perfusion",), DeviceState.OK, "marginal_perfusion", ("marginal_perfusion",)),
        (("low_battery",), DeviceState.OK, "low_battery", ("low_battery",)),
        (("probe_off", "no_sensor"), DeviceState.NO_SENSOR, "no_sensor", ()),
    ],
)
def test_status_bits(
    model: Model, conditions: tuple[str, ...], state: DeviceState, flag: str | None, state_conditions: tuple[str, ...]
) -> None:
    events = feed_chunks(model, [model.encode(Sample({"spo2": 97, "pulse_rate": 72}, frozenset(conditions)))])
    status, reading = events[0], events[1]
    assert isinstance(status, DeviceStatus) and isinstance(reading, Reading)
    assert (status.state, status.conditions) == (state, state_conditions)
    if flag is None:
        assert reading.flags == ()
    else:
        assert flag in reading.flags


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
def test_status_on_change_only_and_after_reset(model: Model) -> None:
    ok = model.encode(NORMAL)
    off = model.encode(Sample(NORMAL.metrics, frozenset({"probe_off"})))
    driver = model.driver()
    events = driver.feed(ok + ok + off + off + ok, 0.0)
    states = [e.state for e in events if isinstance(e, DeviceStatus)]
    assert states == [DeviceState.OK, DeviceState.PROBE_OFF, DeviceState.OK]
    kinds = [type(e) for e in events if not isinstance(e, Waveform)]
    assert kinds == [DeviceStatus, Reading, Reading, DeviceStatus, Reading, Reading, DeviceStatus, Reading]
    driver.reset()
    assert isinstance(driver.feed(ok, 0.0)[0], DeviceStatus)


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
def test_perfusion_colour_holds_between_pulse_markers(model: Model) -> None:
    red = bytearray(model.encode(Sample(NORMAL.metrics, frozenset({"low_perfusion"}))))
    plain = bytearray(model.encode(NORMAL))
    status_at = 1 if model is MODEL_DF2 else 0
    for k in range(25):  # no pulse marker in this packet
        i = 5 * k
        plain[i + status_at] &= ~0x06
        plain[i + 4] = sum(plain[i : i + 4]) % 256
    events = feed_chunks(model, [bytes(red) + bytes(plain) * 9 + bytes(plain)])
    readings = of_type(events, Reading)
    assert all("low_perfusion" in r.flags for r in readings[:10])
    assert "low_perfusion" not in readings[10].flags  # expired after 3 s without a marker
    statuses = of_type(events, DeviceStatus)
    assert [s.conditions for s in statuses] == [("low_perfusion",), ()]


# --- host command -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "fmt"), [(MODEL_DF2, 2), (MODEL_DF7, 7), (MODEL_DF8, 8)], ids=["df2", "df7", "df8"])
def test_set_format_command_once_then_one_retry(model: Model, fmt: int) -> None:
    cmd = bytes((0x02, 0x70, 0x02, 0x02, fmt, 0x03))
    assert select_format_command(fmt) == cmd
    driver = nonin_driver(model)
    assert driver.outgoing(10.0) == cmd
    assert driver.outgoing(10.5) == b""
    assert driver.outgoing(12.0) == cmd  # no ACK within 2 s
    assert driver.outgoing(13.0) == b"" and driver.outgoing(30.0) == b""
    driver.reset()
    assert driver.outgoing(40.0) == cmd
    driver.feed(b"\x06", 40.1)
    assert driver.outgoing(42.5) == b""  # ACKed: no retry


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
def test_ack_between_records_is_the_reply_not_data(model: Model) -> None:
    driver = nonin_driver(model)
    driver.outgoing(0.0)
    rec = model.encode(NORMAL)
    cut = 60 if model is not MODEL_DF8 else 4  # between two frames of the packet
    stream = rec[:cut] + bytes((ACK,)) + rec[cut:] + rec
    events = driver.feed(stream, 0.2)
    assert not of_type(events, ProtocolError)
    assert len(of_type(events, Reading)) == 2
    assert driver.format_accepted is True


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
def test_nak_is_reported_as_refused(model: Model) -> None:
    driver = nonin_driver(model)
    driver.outgoing(0.0)
    events = driver.feed(b"\x00\x00" + bytes((NAK,)) + model.encode(NORMAL), 0.3)
    errors = of_type(events, ProtocolError)
    assert [e.dropped for e in errors] == [b"\x00\x00", b"\x15"]
    assert "refused" in errors[1].detail
    assert driver.format_accepted is False
    assert len(of_type(events, Reading)) == 1


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
def test_reply_bytes_are_data_when_no_command_is_pending(model: Model) -> None:
    rec = model.encode(NORMAL)
    events = feed_chunks(model, [bytes((ACK,)) + rec])
    assert isinstance(events[0], ProtocolError) and events[0].dropped == b"\x06"
    driver = nonin_driver(model)
    driver.outgoing(0.0)
    late = driver.feed(bytes((ACK,)) + rec, 100.0)  # long after the reply window
    assert isinstance(late[0], ProtocolError) and driver.format_accepted is None


# --- emulator -----------------------------------------------------------------------------------------------


def run_loop(
    driver: Any, emulator: NoninEmulator, sample: Sample, until: float, connect_at: float = 0.0, step: float = 0.05
) -> list[tuple[float, Event]]:
    """Host and device in scenario time: the driver's commands go to the emulator, the device's bytes to the driver."""
    out: list[tuple[float, Event]] = []
    k = 0
    while k * step <= until + 1e-9:
        t = k * step
        if t >= connect_at - 1e-9:
            cmd = driver.outgoing(t)
            if cmd:
                out += [(t, e) for e in driver.feed(emulator.receive(cmd, t, sample), t)]
        data = emulator.tick(t, sample)
        if t >= connect_at - 1e-9:
            out += [(t, e) for e in driver.feed(data, t)]
        k += 1
    return out


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
def test_emulator_with_its_own_driver(model: Model) -> None:
    driver = nonin_driver(model)
    emulator = model.make_emulator()
    assert isinstance(emulator, NoninEmulator)
    events = [e for _, e in run_loop(driver, emulator, NORMAL, until=3.0)]
    assert driver.format_accepted is True
    assert not of_type(events, ProtocolError)
    readings = of_type(events, Reading)
    per_second = 1 if model is MODEL_DF8 else 3
    assert len(readings) == 3 * per_second + 1
    assert all(r.metrics == {"spo2": 97, "pulse_rate": 72} for r in readings)
    if model is not MODEL_DF8:
        assert len(of_type(events, Waveform)) == len(readings)


def test_emulator_switches_format_on_command() -> None:
    driver = NoninDF2Driver()
    emulator = NoninEmulator(0x07)  # a device left in DF7 by another host
    timed = run_loop(driver, emulator, NORMAL, until=2.0, connect_at=1.0)
    assert emulator.data_format == 0x02 and driver.format_accepted is True
    readings = [(t, e) for t, e in timed if isinstance(e, Reading)]
    assert len(readings) >= 3 and all(e.metrics == {"spo2": 97, "pulse_rate": 72} for _, e in readings)


def test_emulator_refuses_after_its_window_and_keeps_streaming_its_format() -> None:
    driver = NoninDF2Driver()
    emulator = NoninEmulator(0x07)
    timed = run_loop(driver, emulator, NORMAL, until=9.0, connect_at=6.0)
    assert emulator.data_format == 0x07 and driver.format_accepted is False
    events = [e for _, e in timed]
    assert not of_type(events, Reading)  # the DF2 driver cannot read the DF7 stream
    assert any("refused" in e.detail for e in of_type(events, ProtocolError))


def test_emulator_answers_split_commands_and_naks_unknown_formats() -> None:
    emulator = NoninEmulator(0x02)
    assert emulator.receive(b"\x02\x70\x02", 0.0, NORMAL) == b""
    assert emulator.receive(b"\x02\x08\x03", 0.1, NORMAL) == b"\x06"
    assert emulator.data_format == 0x08
    assert emulator.receive(select_format_command(0x0D), 0.2, NORMAL) == b"\x15"  # DF13 not emulated
    assert emulator.receive(b"\xff" + select_format_command(0x07), 0.3, NORMAL) == b"\x06"
    assert emulator.data_format == 0x07
    assert emulator.receive(select_format_command(0x02), 5.5, NORMAL) == b"\x15"
    assert emulator.data_format == 0x07


def test_emulator_rates_and_timer() -> None:
    emulator = NoninEmulator(0x02)
    data = b"".join(emulator.tick(k / 10, NORMAL) for k in range(10))  # 0.0 .. 0.9 s
    assert len(data) == 3 * 125
    timers = [((data[125 * p + 25 + 3] & 0x7F) << 7) | (data[125 * p + 30 + 3] & 0x7F) for p in range(3)]
    assert timers == [0, 1, 2]
    df8 = NoninEmulator(0x08)
    assert len(b"".join(df8.tick(k / 10, NORMAL) for k in range(21))) == 3 * 4


def test_encode_slots() -> None:
    packet = encode_df2(Sample({"spo2": 93, "pulse_rate": 150}, extra={"firmware_revision": 0x31}))
    floats = [packet[5 * k + 3] for k in range(25)]
    assert floats[3] == 0x31
    for msb, lsb in ((0, 1), (13, 14), (19, 20), (21, 22)):
        assert (floats[msb], floats[lsb]) == (0x01, 0x16)
    for k in (2, 8, 9, 10, 15, 16):
        assert floats[k] == 93
    assert packet[1] == 0x83 and packet[6] == 0x82  # SYNC + green on frame 1, green on frame 2
    df7 = encode_df7(Sample({"spo2": 93, "pulse_rate": 150}, frozenset({"low_perfusion", "searching"})))
    assert df7[0] & 0x16 == 0x14  # red perfusion and OOT
    assert encode_df8(Sample({"spo2": 97, "pulse_rate": 72})) == bytes.fromhex("80486100")
    assert encode_df8(Sample({"spo2": 95, "pulse_rate": 150})) == bytes.fromhex("81165F00")
    assert encode_df8(Sample({"spo2": None, "pulse_rate": None}, frozenset({"probe_off"}))) == bytes.fromhex("837F7F08")


# --- properties ---------------------------------------------------------------------------------------------

CONDITIONS = ("probe_off", "searching", "no_sensor", "artifact", "low_perfusion", "marginal_perfusion", "low_battery")


def gen_samples() -> st.SearchStrategy[Sample]:
    return st.builds(
        lambda spo2, hr, cond: Sample({"spo2": spo2, "pulse_rate": hr}, frozenset(cond)),
        st.one_of(st.none(), st.integers(1, 100)),
        st.one_of(st.none(), st.integers(1, 300)),
        st.sets(st.sampled_from(CONDITIONS), max_size=3),
    )


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_feed_never_raises_and_readings_validate(model: Model, data: bytes) -> None:
    for reading in of_type(feed_chunks(model, [data]), Reading):
        assert valid_raw(model, reading.raw) and in_ranges(reading)


@pytest.mark.parametrize("model", PACKET_MODELS, ids=lambda m: m.spec.model)
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_never_make_a_packet_reading(model: Model, data: bytes) -> None:
    assert not of_type(feed_chunks(model, [data]), Reading)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corrupted_streams_never_read_invalid_bytes(model: Model, data: st.DataObject) -> None:
    stream = bytearray(b"".join(model.encode(data.draw(gen_samples())) for _ in range(3)))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(stream) - 1))
        action = data.draw(st.sampled_from(("flip", "drop", "insert")))
        if action == "flip":
            stream[i] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "drop":
            del stream[i]
        else:
            stream.insert(i, data.draw(st.integers(0, 255)))
    for reading in of_type(feed_chunks(model, [bytes(stream)]), Reading):
        assert valid_raw(model, reading.raw) and in_ranges(reading)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_arbitrary_splits_give_the_same_events(model: Model, data: st.DataObject) -> None:
    stream = data.draw(st.binary(max_size=30))
    for _ in range(2):
        stream += model.encode(data.draw(gen_samples())) + data.draw(st.binary(max_size=8))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert feed_chunks(model, chunks) == feed_chunks(model, [stream])


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.spec.model)
@settings(max_examples=200, deadline=None)
@given(sample=gen_samples())
def test_encode_then_feed_round_trips(model: Model, sample: Sample) -> None:
    events = feed_chunks(model, [model.encode(sample)])
    assert not of_type(events, ProtocolError)
    readings = of_type(events, Reading)
    assert len(readings) == 1
    reading = readings[0]
    assert reading.metrics == {k: v for k, v in sample.metrics.items() if v is not None}
    assert in_ranges(reading)
    expected = {"probe_off": "probe_off", "searching": "out_of_track", "no_sensor": "no_sensor"}
    expected |= {"artifact": "artifact", "low_perfusion": "low_perfusion", "low_battery": "low_battery"}
    for condition, flag in expected.items():
        assert (flag in reading.flags) == (condition in sample.conditions), (condition, reading.flags)
    if "marginal_perfusion" in sample.conditions and "low_perfusion" not in sample.conditions:
        assert "marginal_perfusion" in reading.flags
    status = events[0]
    assert isinstance(status, DeviceStatus)
    if not sample.conditions & {"probe_off", "searching", "no_sensor"} and reading.metrics:
        assert status.state is DeviceState.OK


def test_driver_classes_and_specs() -> None:
    assert [m.spec.model for m in MODELS] == ["nonin-df2", "nonin-df7", "nonin-df8"]
    assert (MODEL_DF2.driver, MODEL_DF7.driver, MODEL_DF8.driver) == (NoninDF2Driver, NoninDF7Driver, NoninDF8Driver)
    for model in PACKET_MODELS:
        assert model.spec.publish_interval_s == 1.0 and abs(model.spec.frame_interval_s - 1 / 3) < 1e-9
        assert len(model.encode(NORMAL)) == 125
    assert MODEL_DF8.spec.publish_interval_s is None and MODEL_DF8.spec.frame_interval_s == 1.0
    assert all(m.spec.serial.baudrate == 9600 for m in MODELS)
    assert encode_packet(NORMAL, 0x02) == encode_df2(NORMAL)
