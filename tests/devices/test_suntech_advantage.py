"""The SunTech measurement cycle, driver against emulator in scenario time: start, poll, "K", result; errors and
timeouts become cuff_error statuses; the next measurement still runs."""

from __future__ import annotations

from devices.base import DeviceState, DeviceStatus, DriverOptions, Event, ProtocolError, Reading, Sample
from devices.suntech_advantage import ABORT, GET_PRESSURE, START_BP, SuntechDriver, SuntechEmulator, command

BP = Sample({"nibp_systolic": 184, "nibp_diastolic": 112, "nibp_mean": 136, "nibp_pulse_rate": 92})


def run(
    driver: SuntechDriver, emulator: SuntechEmulator, sample: Sample, until: float, start: float = 0.0
) -> list[Event]:
    """Step both sides every 0.1 s of scenario time, wiring bytes both ways."""
    events: list[Event] = []
    t = start
    while t <= until:
        out = driver.outgoing(t)
        events += driver.poll(t)
        wire = emulator.tick(t, sample) + (emulator.receive(out, t, sample) if out else b"")
        if wire:
            events += driver.feed(wire, t)
        t = round(t + 0.1, 3)
    return events


def test_full_cycle_gives_the_result() -> None:
    driver, emulator = SuntechDriver(), SuntechEmulator(inflate_s=20)
    assert driver.start_measurement(0.0)
    assert not driver.start_measurement(0.5)  # one at a time
    events = run(driver, emulator, BP, 10)
    assert [e.state for e in events if isinstance(e, DeviceStatus)] == [DeviceState.MEASURING]
    assert driver.cuff_pressure is not None and driver.cuff_pressure > 100  # polled while inflating
    events = run(driver, emulator, BP, 25, start=10.1)
    readings = [e for e in events if isinstance(e, Reading)]
    assert [r.metrics for r in readings] == [
        {"nibp_systolic": 184.0, "nibp_diastolic": 112.0, "nibp_mean": 136.0, "nibp_pulse_rate": 92.0}
    ]
    assert driver.start_measurement(30.0)  # the next one runs


def test_error_code_becomes_a_cuff_error_with_its_category() -> None:
    driver, emulator = SuntechDriver(), SuntechEmulator(inflate_s=5)
    driver.start_measurement(0.0)
    failed = Sample(BP.metrics, extra={"nibp_error": 2})
    events = run(driver, emulator, failed, 8)
    errors = [e for e in events if isinstance(e, DeviceStatus) and e.state == DeviceState.CUFF_ERROR]
    assert [(e.code, e.conditions) for e in errors] == [(2, ("motion_artifact",))]
    assert not [e for e in events if isinstance(e, Reading)]


def test_a_measurement_that_never_finishes_times_out_and_the_next_runs() -> None:
    driver = SuntechDriver(DriverOptions(measurement_timeout_s=30))
    driver.start_measurement(0.0)
    assert [e.state for e in driver.poll(0.0) if isinstance(e, DeviceStatus)] == [DeviceState.MEASURING]
    assert driver.outgoing(0.0) == START_BP
    assert driver.outgoing(0.3) == GET_PRESSURE
    driver.outgoing(31.0)
    timeout = [e for e in driver.poll(31.0) if isinstance(e, DeviceStatus)]
    assert [(e.state, e.conditions) for e in timeout] == [(DeviceState.CUFF_ERROR, ("timeout",))]
    assert driver.start_measurement(40.0)


def test_emulator_answers_like_the_module() -> None:
    emulator = SuntechEmulator()
    assert emulator.receive(START_BP, 0, BP) == bytes.fromhex("3E 04 4F 6F")  # "O", the notes' precomputed ack
    assert emulator.receive(START_BP, 1, BP)[2:3] == b"B"  # busy: a measurement is running
    assert emulator.receive(ABORT, 2, BP) == bytes.fromhex("3E 04 41 7D") + bytes.fromhex("3E 04 4B 73")
    assert emulator.receive(b"\x3a\x20\x00", 3, BP)[2:3] == b"N"  # bad checksum
    assert emulator.receive(command(b"\x8a"), 3, BP)[2:3] == b"D"  # not understood


def test_busy_is_retried_and_unknown_acks_are_reported() -> None:
    driver = SuntechDriver()
    driver.start_measurement(0.0)
    driver.poll(0.0)
    driver.outgoing(0.0)
    assert driver.feed(bytes.fromhex("3E 04 42 7C"), 0.1) == []  # "B": send again shortly
    assert START_BP in driver.outgoing(0.7)
    err = driver.feed(bytes.fromhex("3E 04 45 79"), 1.0)  # "E"
    assert [type(e) for e in err] == [ProtocolError]


def test_the_configured_measurement_timeout_reaches_the_driver() -> None:
    """Issue 16: `measurement_timeout_s` was validated in the config and then ignored (the driver kept 180 s)."""
    from gateway.config import DeviceConfig
    from gateway.session import DeviceSession

    cfg = DeviceConfig(room="3", name="cuff", model="suntech-advantage", port="/dev/null", measurement_timeout_s=45)
    driver = DeviceSession(cfg, lambda *a: None).driver
    assert isinstance(driver, SuntechDriver)
    assert driver.start_measurement(0.0)
    driver.outgoing(0.0)
    driver.outgoing(44.0)
    early = [e.state for e in driver.poll(44.0) if isinstance(e, DeviceStatus)]
    assert DeviceState.CUFF_ERROR not in early  # 44 s: still within the configured 45 s (the default was 180 s)
    driver.outgoing(46.0)
    late = [e for e in driver.poll(46.0) if isinstance(e, DeviceStatus)]
    assert [(e.state, e.conditions) for e in late] == [(DeviceState.CUFF_ERROR, ("timeout",))]
