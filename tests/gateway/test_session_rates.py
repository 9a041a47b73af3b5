"""Fast devices are thinned to one reading a second; opt-in waveforms are batched to one message a second."""

from __future__ import annotations

import itertools
from dataclasses import replace

from devices.base import Reading, Waveform
from gateway.config import DeviceConfig
from gateway.session import DeviceSession


def make(waveform: bool) -> tuple[DeviceSession, list[tuple[object, float]]]:
    out: list[tuple[object, float]] = []
    cfg = DeviceConfig(room="1", name="ox", model="masimo-ascii1", port="/dev/null", waveform=waveform)
    session = DeviceSession(cfg, lambda _s, event, now: out.append((event, now)))
    session.spec = replace(session.spec, publish_interval_s=1.0)  # as a 60-a-second oximeter declares
    return session, out


def test_sixty_readings_a_second_become_one_a_second_latest_wins() -> None:
    session, out = make(waveform=False)
    for i in range(180):  # three seconds at 60 Hz
        now = 100.0 + i / 60
        session.handle([Reading({"spo2": 90 + i % 10}), Waveform("pleth", (i,), 60.0)], now)
    readings = [(e, t) for e, t in out if isinstance(e, Reading)]
    assert len(readings) == 3
    times = [t for _, t in readings]
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))
    assert session.received == 180
    assert not [e for e, _ in out if isinstance(e, Waveform)]  # not opted in


def test_waveform_batches_hold_every_sample_once() -> None:
    session, out = make(waveform=True)
    for i in range(150):
        session.handle([Waveform("pleth", (i,), 75.0)], 10.0 + i / 75)
    session.advance(20.0)
    waves = [e for e, _ in out if isinstance(e, Waveform)]
    assert 2 <= len(waves) <= 3
    assert [s for w in waves for s in w.samples] == list(range(150))
    assert all(w.rate_hz == 75.0 for w in waves)
