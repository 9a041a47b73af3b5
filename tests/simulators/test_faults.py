"""Scenario faults: a bad line never turns into wrong readings; unplug and silence keep frames off the wire."""

from __future__ import annotations

import random

from devices.base import ProtocolError, Reading
from devices.registry import get_model
from simulators.scenarios import load_scenario, parse_scenario
from simulators.serve import DeviceSimulator, damage

MASIMO = get_model("masimo-ascii1")


def run_ticks(sim: DeviceSimulator, n: int) -> bytes:
    return b"".join(sim.step()[1] for _ in range(n))


NOISY = """
[[keyframes]]
t = 0
spo2 = 97
pulse_rate = 70
perfusion_index = 3.1
[noise]
spo2 = 1.0
pulse_rate = 3.0
[[faults]]
t = 0
duration_s = 100
kind = "noise"
garbage = 0.3
drop = 0.02
"""


def test_garbage_and_dropped_bytes_never_become_a_wrong_reading() -> None:
    """Masimo ASCII 1 has no checksum; fixed widths and formats must still catch every lost byte."""
    scenario = parse_scenario(NOISY)
    sim = DeviceSimulator(MASIMO, scenario, seed=3)
    wire = run_ticks(sim, 100)
    clean = DeviceSimulator(MASIMO, scenario, seed=3)
    expected = MASIMO.driver().feed(b"".join(MASIMO.encode(clean.step()[0]) for _ in range(100)), 0)
    truth = [e.metrics for e in expected if isinstance(e, Reading)]
    events = MASIMO.driver().feed(wire, 0.0)
    readings = [e for e in events if isinstance(e, Reading)]
    assert [e for e in events if isinstance(e, ProtocolError)], "a bad line must show as protocol errors"
    assert 0 < len(readings) < 100
    for reading in readings:  # every reading that got through is one the device really sent
        assert reading.metrics in truth


def test_packaged_line_noise_scenario_damages_the_stream() -> None:
    sim = DeviceSimulator(MASIMO, load_scenario("line_noise"), seed=3)
    wire = run_ticks(sim, 60)
    clean = DeviceSimulator(MASIMO, load_scenario("line_noise"), seed=3)
    expected = [e for e in MASIMO.driver().feed(b"".join(MASIMO.encode(clean.step()[0]) for _ in range(60)), 0)]
    truth = [e.metrics for e in expected if isinstance(e, Reading)]
    events = MASIMO.driver().feed(wire, 0.0)
    readings = [e for e in events if isinstance(e, Reading)]
    errors = [e for e in events if isinstance(e, ProtocolError)]
    assert errors, "30 s of a bad line must show as protocol errors"
    assert len(readings) < 60
    assert len(readings) + len(errors) >= 50  # each damaged line is reported, not silently skipped
    assert len(truth) == 60


def test_unplug_closes_and_reopens_at_the_scenario_times() -> None:
    sim = DeviceSimulator(MASIMO, load_scenario("unplug"), seed=1)
    changes: list[tuple[float, bool]] = []
    sim.on_unplug = lambda unplugged: changes.append((sim.t - sim.tick_s, unplugged))
    wire = run_ticks(sim, 60)
    assert changes == [(20.0, True), (30.0, False)]
    assert sim.frames_lost == 10
    assert wire.count(b"\r\n") == 50


def test_silence_keeps_the_port_open_but_sends_nothing() -> None:
    scenario = parse_scenario(
        """
[[keyframes]]
t = 0
spo2 = 97
pulse_rate = 70
[[faults]]
t = 5
duration_s = 5
kind = "silence"
"""
    )
    sim = DeviceSimulator(MASIMO, scenario, seed=1)
    sim.on_unplug = lambda _u: (_ for _ in ()).throw(AssertionError("silence is not an unplug"))
    outputs = [sim.step()[1] for _ in range(12)]
    assert [bool(o) for o in outputs] == [True] * 5 + [False] * 5 + [True] * 2


def test_faults_only_hit_the_devices_they_name() -> None:
    scenario = parse_scenario(
        """
[[keyframes]]
t = 0
spo2 = 97
pulse_rate = 70
[[faults]]
t = 0
duration_s = 100
kind = "silence"
devices = ["nibp"]
"""
    )
    sim = DeviceSimulator(MASIMO, scenario, seed=1)
    assert all(sim.step()[1] for _ in range(5))


def test_damage_drops_and_flips_bytes() -> None:
    rng = random.Random(1)
    frame = bytes(range(100))
    assert damage(frame, 0, 0, 0, rng) == frame
    assert damage(frame, 0, 1.0, 0, rng) == b""
    flipped = damage(frame, 0, 0, 1.0, rng)
    assert len(flipped) == 100 and all(a != b for a, b in zip(frame, flipped, strict=True))
    assert len(damage(frame, 1.0, 0, 0, rng)) > 100
