"""The alarm engine driven through time by `now` alone: delays to the tick, hysteresis, data quality first,
technical alarms, acknowledge, latching, escalation and session baselines."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from devices.base import DeviceState
from gateway.alarms import (
    EXAMPLE_KETAMINE_PROFILE,
    AlarmEngine,
    AlarmEvent,
    AlarmProfile,
    SessionEvent,
    TechnicalRule,
    TechnicalRules,
    ThresholdRule,
)

SPO2_LOW = ThresholdRule(
    id="spo2-low", metric="spo2", below=92, priority="medium", delay_s=10, hysteresis=2, clear_delay_s=5
)


def engine(*rules: ThresholdRule, **tech: TechnicalRule) -> AlarmEngine:
    return AlarmEngine(AlarmProfile(rules=rules, technical=TechnicalRules(**tech)))


def alarms(events: Sequence[AlarmEvent | SessionEvent]) -> list[tuple[str, str]]:
    return [(e.rule, e.transition) for e in events if isinstance(e, AlarmEvent)]


def feed(
    eng: AlarmEngine, values: Sequence[float], start: float = 0.0, step: float = 1.0, ok: bool = True
) -> list[tuple[float, str, str]]:
    """One spo2 reading per `step` seconds; returns (time, rule, transition) of every alarm event."""
    out: list[tuple[float, str, str]] = []
    for i, v in enumerate(values):
        now = start + i * step
        for e in eng.on_reading("3", "ox", {"spo2": v}, ok, now) + eng.tick(now):
            if isinstance(e, AlarmEvent):
                out.append((now, e.rule, e.transition))
    return out


def test_delay_is_honoured_to_the_tick() -> None:
    eng = engine(SPO2_LOW)
    events = feed(eng, [97, 91, 91, 91, 91, 91, 91, 91, 91, 91, 91, 91, 91])
    assert events == [(11.0, "spo2-low", "raised")]  # low from t=1, delay 10 s -> raised at t=11, not before


def test_tick_raises_between_readings_when_the_delay_ends() -> None:
    eng = engine(SPO2_LOW)
    eng.on_reading("3", "ox", {"spo2": 90}, True, 100.0)
    assert eng.tick(109.99) == []
    raised = eng.tick(110.0)
    assert [(e.transition, e.value, e.limit, e.priority) for e in raised] == [("raised", 90, 92, "medium")]


def test_a_short_dip_does_not_raise() -> None:
    eng = engine(SPO2_LOW)
    assert feed(eng, [97, 91, 91, 91, 95, 91, 91, 91, 96, 97]) == []


def test_hysteresis_prevents_flapping_and_clear_needs_its_delay() -> None:
    eng = engine(SPO2_LOW)
    values = [90] * 12 + [92, 93, 92, 93, 92, 93] + [94] * 8
    events = feed(eng, values)
    assert [t for _, _, t in events] == ["raised", "cleared"]  # 92/93 are inside the band: held, no flapping
    raised_at, cleared_at = events[0][0], events[1][0]
    assert raised_at == 10.0
    assert cleared_at == 18.0 + 5  # first 94 at t=18, clear delay 5 s


def test_flagged_readings_never_raise_or_clear_a_physiological_alarm() -> None:
    eng = engine(SPO2_LOW)
    assert feed(eng, [80] * 30, ok=False) == []
    assert feed(eng, [85] * 12, start=100) == [(110.0, "spo2-low", "raised")]
    assert feed(eng, [99] * 20, start=200, ok=False) == []  # probe off with a held value: the alarm stays


def test_silent_device_raises_no_data_at_once_and_clears_on_data() -> None:
    eng = engine()
    assert alarms(eng.on_status("3", "ox", DeviceState.NO_DATA, None, 50.0)) == [("no_data", "raised")]
    events = eng.on_reading("3", "ox", {"spo2": 97}, True, 55.0)
    assert alarms(events) == [("no_data", "cleared")]


def test_probe_off_is_a_technical_alarm_after_its_delay() -> None:
    eng = engine(sensor=TechnicalRule(priority="medium", delay_s=15))
    assert eng.on_status("3", "ox", DeviceState.PROBE_OFF, 0x820, 0.0) == []
    assert eng.tick(14.9) == []
    raised = eng.tick(15.0)
    assert [(e.rule, e.kind, e.transition) for e in raised] == [("sensor", "technical", "raised")]
    assert alarms(eng.on_status("3", "ox", DeviceState.OK, 0x800, 20.0)) == [("sensor", "cleared")]


def test_disconnected_port_and_cuff_error() -> None:
    eng = engine()
    assert eng.on_status("3", "cuff", DeviceState.DISCONNECTED, None, 0.0) == []
    assert alarms(eng.tick(2.0)) == [("device_disconnected", "raised")]
    assert alarms(eng.on_status("3", "cuff", DeviceState.CUFF_ERROR, 87, 3.0)) == [
        ("device_disconnected", "cleared"),
        ("cuff_error", "raised"),
    ]
    reading = eng.on_reading("3", "cuff", {"nibp_systolic": 120, "nibp_diastolic": 80}, True, 600.0)
    assert alarms(reading) == [("cuff_error", "cleared")]


def test_acknowledge_stops_escalation() -> None:
    rule = SPO2_LOW.model_copy(update={"escalate_after_s": 30, "delay_s": 0})
    eng = engine(rule)
    eng.on_reading("3", "ox", {"spo2": 90}, True, 0.0)
    escalated = eng.tick(30.0)
    assert [(e.transition, e.priority) for e in escalated] == [("escalated", "high")]
    eng2 = engine(rule)
    eng2.on_reading("3", "ox", {"spo2": 90}, True, 0.0)
    ack = eng2.acknowledge("3", "3/ox/spo2-low", "nurse", 5.0)
    assert [(e.transition, e.role) for e in ack] == [("acknowledged", "nurse")]
    assert eng2.tick(100.0) == []
    with pytest.raises(ValueError, match="already acknowledged"):
        eng2.acknowledge("3", "3/ox/spo2-low", None, 6.0)
    with pytest.raises(ValueError, match="no active alarm"):
        eng2.acknowledge("4", "3/ox/spo2-low", None, 6.0)


def test_latching_alarm_stays_until_acknowledged() -> None:
    rule = ThresholdRule(id="sys-high", metric="nibp_systolic", above=179, priority="high", latching=True)
    eng = engine(rule)
    assert alarms(eng.on_reading("3", "cuff", {"nibp_systolic": 185, "nibp_diastolic": 100}, True, 0.0)) == [
        ("sys-high", "raised")
    ]
    assert alarms(eng.on_reading("3", "cuff", {"nibp_systolic": 140, "nibp_diastolic": 90}, True, 600.0)) == []
    assert [a.rule for a in eng.active()] == ["sys-high"]
    ack = eng.acknowledge("3", "3/cuff/sys-high", "nurse", 700.0)
    assert [e.transition for e in ack] == ["acknowledged", "cleared"]
    assert eng.active() == []


def test_session_baseline_and_relative_rule() -> None:
    rule = ThresholdRule(id="sys-rise", metric="nibp_systolic", above_baseline_pct=25, priority="medium")
    eng = engine(rule)
    bp = {"nibp_systolic": 120.0, "nibp_diastolic": 80.0, "nibp_mean": 93.0}
    assert alarms(eng.on_reading("3", "cuff", {**bp, "nibp_systolic": 200}, True, 0.0)) == []  # no session yet
    assert [e.transition for e in eng.start_session("3", "s-1", 10.0)] == ["started"]
    first = eng.on_reading("3", "cuff", bp, True, 20.0)
    baseline = [e for e in first if isinstance(e, SessionEvent)]
    assert baseline and baseline[0].baseline["nibp_systolic"] == 120.0
    assert alarms(eng.on_reading("3", "cuff", {**bp, "nibp_systolic": 150}, True, 620.0)) == []  # limit is 150
    raised = [
        e for e in eng.on_reading("3", "cuff", {**bp, "nibp_systolic": 151}, True, 1220.0) if isinstance(e, AlarmEvent)
    ]
    assert [(e.transition, e.limit, e.value) for e in raised] == [("raised", 150.0, 151)]
    stopped = eng.stop_session("3", 2000.0)
    assert stopped[0].transition == "stopped" and stopped[0].baseline["nibp_systolic"] == 120.0
    with pytest.raises(ValueError, match="no session"):
        eng.stop_session("3", 2001.0)


def test_nibp_overdue_against_the_schedule() -> None:
    eng = AlarmEngine(AlarmProfile(), nibp_schedules={"3/cuff": 600})
    assert eng.tick(0.0) == []
    assert eng.tick(959.0) == []
    assert alarms(eng.tick(961.0)) == [("nibp_overdue", "raised")]
    assert alarms(eng.on_reading("3", "cuff", {"nibp_systolic": 120, "nibp_diastolic": 80}, True, 970.0)) == [
        ("nibp_overdue", "cleared")
    ]


def test_gateway_alarms_broker_and_outbox() -> None:
    eng = engine()
    assert eng.on_gateway("gw", False, 0.1, 0.0) == []
    assert alarms(eng.on_gateway("gw", False, 0.1, 10.0)) == [("broker_lost", "raised")]
    assert alarms(eng.on_gateway("gw", True, 0.9, 11.0)) == [("broker_lost", "cleared"), ("outbox_filling", "raised")]


def test_rules_are_validated() -> None:
    with pytest.raises(ValidationError, match="exactly one of below, above or above_baseline_pct"):
        ThresholdRule(id="x", metric="spo2", below=90, above=99, priority="low")
    with pytest.raises(ValidationError, match="outside what a device reports"):
        ThresholdRule(id="x", metric="spo2", below=150, priority="low")
    with pytest.raises(ValidationError, match="applies to nibp"):
        ThresholdRule(id="x", metric="spo2", above_baseline_pct=10, priority="low")
    with pytest.raises(ValidationError, match="unique"):
        AlarmProfile(rules=(SPO2_LOW, SPO2_LOW))


def test_example_profile_is_labelled_as_an_example() -> None:
    assert EXAMPLE_KETAMINE_PROFILE.example is True
    assert "example" in EXAMPLE_KETAMINE_PROFILE.name
    ids = {r.id for r in EXAMPLE_KETAMINE_PROFILE.rules}
    assert {"spo2-low", "spo2-very-low", "sys-severe-high", "dia-severe-high", "sys-rise-baseline"} <= ids
