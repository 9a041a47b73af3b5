"""The alarm engine driven through time by `now` alone: delays to the tick, hysteresis, signal quality, fresh data
only, technical alarms, acknowledge, latching, escalation as one alarm, standby, durable state and baselines."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from devices.base import DeviceState
from gateway.alarms import (
    EXAMPLE_KETAMINE_PROFILE,
    AlarmEngine,
    AlarmEvent,
    AlarmProfile,
    EngineEvent,
    QualityPolicy,
    RoomModeEvent,
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


def only_alarms(events: Sequence[EngineEvent]) -> list[AlarmEvent]:
    return [e for e in events if isinstance(e, AlarmEvent)]


def alarms(events: Sequence[EngineEvent]) -> list[tuple[str, str]]:
    return [(e.rule, e.transition) for e in events if isinstance(e, AlarmEvent)]


def feed(
    eng: AlarmEngine, values: Sequence[float], start: float = 0.0, step: float = 1.0, flags: Sequence[str] = ()
) -> list[tuple[float, str, str]]:
    """One spo2 reading per `step` seconds; returns (time, rule, transition) of every alarm event."""
    out: list[tuple[float, str, str]] = []
    for i, v in enumerate(values):
        now = start + i * step
        for e in eng.on_reading("3", "ox", {"spo2": v}, flags, now) + eng.tick(now):
            if isinstance(e, AlarmEvent):
                out.append((now, e.rule, e.transition))
    return out


def test_delay_is_honoured_to_the_tick() -> None:
    eng = engine(SPO2_LOW)
    events = feed(eng, [97, 91, 91, 91, 91, 91, 91, 91, 91, 91, 91, 91, 91])
    assert events == [(11.0, "spo2-low", "raised")]  # low from t=1, delay 10 s -> raised at t=11, not before


def test_tick_raises_between_readings_when_the_delay_ends() -> None:
    eng = engine(SPO2_LOW)
    eng.on_reading("3", "ox", {"spo2": 90}, (), 100.0)
    eng.on_reading("3", "ox", {"spo2": 90}, (), 105.0)  # readings 5 s apart: the value stays current between
    assert eng.tick(109.99) == []
    raised = only_alarms(eng.tick(110.0))
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


def test_unusable_readings_never_raise_or_clear_but_become_a_signal_quality_alarm() -> None:
    eng = engine(SPO2_LOW)
    assert feed(eng, [80] * 14, flags=("probe_off",)) == []
    assert feed(eng, [80] * 10, start=14, flags=("probe_off",)) == [(15.0, "signal_quality", "raised")]
    events = feed(eng, [85] * 12, start=100)
    assert events[0] == (100.0, "signal_quality", "cleared") and events[1:] == [(110.0, "spo2-low", "raised")]
    # probe off with a held value: the value is never judged, the alarm stays, and says it cannot be determined
    held = feed(eng, [99] * 20, start=112, flags=("probe_off",))
    assert [t for _, r, t in held if r == "spo2-low"] == ["indeterminate"]
    assert [a.rule for a in eng.active()] == ["spo2-low", "signal_quality"]


def test_a_flagged_but_usable_signal_still_raises_alarms_marked_with_the_flags() -> None:
    """Observation 1: SpO2 84 / pulse 40 with low_perfusion for ten minutes gave no alarm at all."""
    eng = AlarmEngine(EXAMPLE_KETAMINE_PROFILE)
    events: list[AlarmEvent] = []
    for t in range(600):
        now = float(t)
        out = eng.on_reading("3", "ox", {"spo2": 84, "pulse_rate": 40}, ("low_perfusion",), now) + eng.tick(now)
        events += [e for e in out if isinstance(e, AlarmEvent)]
    raised = {(e.rule, e.transition, e.priority) for e in events}
    assert ("spo2-low", "raised", "high") in raised  # the very-low tier raises it at high priority at once
    assert ("pulse-low", "raised", "medium") in raised
    assert all(e.quality == ("low_perfusion",) for e in events)
    assert {a.rule for a in eng.active()} == {"spo2-low", "pulse-low"}


def test_the_quality_policy_is_the_profiles() -> None:
    strict = AlarmEngine(AlarmProfile(rules=(SPO2_LOW,), quality=QualityPolicy(unusable=("low_perfusion",))))
    assert [r for _, r, _ in feed(strict, [80] * 30, flags=("low_perfusion",))] == ["signal_quality"]
    with pytest.raises(ValidationError, match="unknown quality flag"):
        QualityPolicy(unusable=("probe_of",))


def test_silence_after_a_borderline_value_raises_no_data_and_nothing_else() -> None:
    """Observation 2: SpO2 91 then silence raised spo2-low at 15 s and escalated it at 75 s from the held value."""
    eng = AlarmEngine(EXAMPLE_KETAMINE_PROFILE, stale_after={"3/ox": 5.0})
    events: list[EngineEvent] = list(eng.on_reading("3", "ox", {"spo2": 91}, (), 0.0))
    t = 0.0
    while t < 200:
        t += 0.25
        events += eng.tick(t)
        if t == 5.0:  # the session's watchdog: silent for the model's stale_after_s
            events += eng.on_status("3", "ox", DeviceState.NO_DATA, None, t)
    assert alarms(events) == [("no_data", "raised")]


def test_an_active_alarm_of_a_silent_device_is_indeterminate_never_escalated_then_judged_again() -> None:
    rule = SPO2_LOW.model_copy(update={"escalate_after_s": 30, "delay_s": 0})
    eng = AlarmEngine(AlarmProfile(rules=(rule,)), stale_after={"3/ox": 5.0})
    assert alarms(eng.on_reading("3", "ox", {"spo2": 88}, (), 0.0)) == [("spo2-low", "raised")]
    assert alarms(eng.tick(5.0)) == []
    stale = eng.tick(5.25)
    assert [(e.transition, e.indeterminate, e.active) for e in stale if isinstance(e, AlarmEvent)] == [
        ("indeterminate", True, True)
    ]
    assert alarms(eng.tick(100.0)) == []  # no escalation, no clear, from nothing
    back = eng.on_reading("3", "ox", {"spo2": 97}, (), 101.0)
    assert alarms(back) == [("spo2-low", "resumed")]
    assert alarms(eng.tick(106.0)) == [("spo2-low", "cleared")]  # judged on fresh data: clear delay 5 s


def test_escalation_raises_the_priority_of_one_alarm_not_a_second_alarm() -> None:
    """Observation 4: spo2-low escalated to high beside spo2-very-low, two high rows for one desaturation."""
    eng = AlarmEngine(EXAMPLE_KETAMINE_PROFILE)
    events = feed(eng, [90] * 20 + [85] * 100)
    assert [(r, t) for _, r, t in events] == [("spo2-low", "raised"), ("spo2-low", "escalated")]
    assert [(a.rule, a.priority, a.message) for a in eng.active()] == [("spo2-low", "high", "SpO2 very low")]
    assert events[1][0] == 20 + 10  # the very-low tier's own delay, not the 60 s time escalation


def test_a_tier_must_be_the_same_condition_stricter() -> None:
    base = ThresholdRule(id="lo", metric="spo2", below=92, priority="medium")
    with pytest.raises(ValidationError, match="stricter limit"):
        AlarmProfile(rules=(base, ThresholdRule(id="t", metric="spo2", below=95, priority="high", tier_of="lo")))
    with pytest.raises(ValidationError, match="same metric"):
        AlarmProfile(rules=(base, ThresholdRule(id="t", metric="pulse_rate", below=40, priority="high", tier_of="lo")))
    with pytest.raises(ValidationError, match="tier_of must name"):
        AlarmProfile(rules=(base, ThresholdRule(id="t", metric="spo2", below=80, priority="high", tier_of="x")))


def test_silent_device_raises_no_data_at_once_and_clears_on_data() -> None:
    eng = engine()
    assert alarms(eng.on_status("3", "ox", DeviceState.NO_DATA, None, 50.0)) == [("no_data", "raised")]
    events = eng.on_reading("3", "ox", {"spo2": 97}, (), 55.0)
    assert alarms(events) == [("no_data", "cleared")]


def test_probe_off_is_a_technical_alarm_after_its_delay() -> None:
    eng = engine(sensor=TechnicalRule(priority="medium", delay_s=15))
    assert eng.on_status("3", "ox", DeviceState.PROBE_OFF, 0x820, 0.0) == []
    assert eng.tick(14.9) == []
    raised = only_alarms(eng.tick(15.0))
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
    reading = eng.on_reading("3", "cuff", {"nibp_systolic": 120, "nibp_diastolic": 80}, (), 600.0)
    assert alarms(reading) == [("cuff_error", "cleared")]


def test_acknowledge_stops_escalation() -> None:
    rule = SPO2_LOW.model_copy(update={"escalate_after_s": 30, "delay_s": 0})
    eng = engine(rule)
    feed(eng, [90] * 30)
    escalated = only_alarms(eng.tick(30.0))
    assert [(e.transition, e.priority) for e in escalated] == [("escalated", "high")]
    eng2 = engine(rule)
    eng2.on_reading("3", "ox", {"spo2": 90}, (), 0.0)
    ack = eng2.acknowledge("3", "3/ox/spo2-low", "nurse", 0.5)
    assert [(e.transition, e.role) for e in ack] == [("acknowledged", "nurse")]
    assert feed(eng2, [90] * 100, start=1.0) == []
    with pytest.raises(ValueError, match="already acknowledged"):
        eng2.acknowledge("3", "3/ox/spo2-low", None, 6.0)
    with pytest.raises(ValueError, match="no such active alarm"):
        eng2.acknowledge("4", "3/ox/spo2-low", None, 6.0)


def test_latching_alarm_stays_until_acknowledged() -> None:
    rule = ThresholdRule(id="sys-high", metric="nibp_systolic", above=179, priority="high", latching=True)
    eng = engine(rule)
    assert alarms(eng.on_reading("3", "cuff", {"nibp_systolic": 185, "nibp_diastolic": 100}, (), 0.0)) == [
        ("sys-high", "raised")
    ]
    assert alarms(eng.on_reading("3", "cuff", {"nibp_systolic": 140, "nibp_diastolic": 90}, (), 600.0)) == []
    assert [a.rule for a in eng.active()] == ["sys-high"]
    ack = eng.acknowledge("3", "3/cuff/sys-high", "nurse", 700.0)
    assert [e.transition for e in ack] == ["acknowledged", "cleared"]
    assert eng.active() == []


def test_session_baseline_and_relative_rule() -> None:
    rule = ThresholdRule(id="sys-rise", metric="nibp_systolic", above_baseline_pct=25, priority="medium")
    eng = engine(rule)
    bp = {"nibp_systolic": 120.0, "nibp_diastolic": 80.0, "nibp_mean": 93.0}
    assert alarms(eng.on_reading("3", "cuff", {**bp, "nibp_systolic": 200}, (), 0.0)) == []  # no session yet
    assert [type(e).__name__ for e in eng.start_session("3", "s-1", 10.0)] == ["SessionEvent"]
    first = eng.on_reading("3", "cuff", bp, (), 20.0)
    baseline = [e for e in first if isinstance(e, SessionEvent)]
    assert baseline and baseline[0].baseline["nibp_systolic"] == 120.0
    assert alarms(eng.on_reading("3", "cuff", {**bp, "nibp_systolic": 150}, (), 620.0)) == []  # limit is 150
    raised = [
        e for e in eng.on_reading("3", "cuff", {**bp, "nibp_systolic": 151}, (), 1220.0) if isinstance(e, AlarmEvent)
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
    assert alarms(eng.on_reading("3", "cuff", {"nibp_systolic": 120, "nibp_diastolic": 80}, (), 970.0)) == [
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


def test_standby_suspends_a_rooms_alarms_shows_itself_and_expires() -> None:
    """Observation 5: an empty room raised high no_data alarms forever, with no way to say nobody is there."""
    eng = AlarmEngine(EXAMPLE_KETAMINE_PROFILE)
    assert alarms(eng.on_status("3", "ox", DeviceState.NO_DATA, None, 0.0)) == [("no_data", "raised")]
    eng.on_status("4", "ox", DeviceState.NO_DATA, None, 0.0)
    events = eng.standby("3", 3600, "nurse", 10.0)
    modes = [(e.room, e.mode, e.until) for e in events if isinstance(e, RoomModeEvent)]
    assert modes == [("3", "standby", 3610.0)]
    assert [(e.rule, e.transition, e.active) for e in events if isinstance(e, AlarmEvent)] == [
        ("no_data", "suspended", False)
    ]
    assert eng.in_standby("3")
    assert feed(eng, [80] * 100, start=20) == []  # nobody is monitored: nothing is judged
    assert eng.on_status("3", "ox", DeviceState.DISCONNECTED, None, 200.0) == []
    assert [a.room for a in eng.active()] == ["4"]  # other rooms untouched
    expired = eng.tick(3610.0)
    assert [(e.mode, e.reason) for e in expired if isinstance(e, RoomModeEvent)] == [("monitoring", "standby expired")]
    assert alarms(eng.tick(3612.0)) == [("device_disconnected", "raised")]  # the device's state counts again


def test_a_session_ends_standby_and_standby_is_refused_during_a_session() -> None:
    eng = AlarmEngine(EXAMPLE_KETAMINE_PROFILE)
    eng.standby("3", 600, None, 0.0)
    started = eng.start_session("3", "s-1", 5.0)
    assert [type(e).__name__ for e in started] == ["RoomModeEvent", "SessionEvent"]
    assert not eng.in_standby("3")
    with pytest.raises(ValueError, match="session running"):
        eng.standby("3", 600, None, 6.0)
    with pytest.raises(ValueError, match="not in standby"):
        eng.end_standby("3", None, 7.0)


def test_alarm_state_survives_a_restart_through_its_snapshot() -> None:
    """Observation 3: after a restart the engine did not know its alarms; ack was refused, latched ones forgotten."""
    latch = ThresholdRule(id="sys-high", metric="nibp_systolic", above=179, priority="high", latching=True)
    eng = AlarmEngine(AlarmProfile(rules=(SPO2_LOW, latch)))
    feed(eng, [85] * 12)
    eng.on_reading("3", "cuff", {"nibp_systolic": 190, "nibp_diastolic": 95}, (), 12.0)
    eng.on_reading("3", "cuff", {"nibp_systolic": 130, "nibp_diastolic": 80}, (), 13.0)  # gone, but latched
    eng.silence("3", "3/ox/spo2-low", 120, "nurse", 12.0)
    eng.standby("4", 600, None, 12.0)
    eng.start_session("5", "s-5", 12.0)
    snapshot = json.loads(json.dumps(eng.snapshot()))  # as stored: JSON

    again = AlarmEngine(AlarmProfile(rules=(SPO2_LOW, latch)))
    restored = again.restore(snapshot, {"3/ox", "3/cuff"}, 100.0)
    assert alarms(restored) == [("spo2-low", "indeterminate")]  # judged again only on fresh data
    assert {a.rule for a in again.active()} == {"spo2-low", "sys-high"}
    assert again.in_standby("4") and again.session("5") is not None
    assert [e.transition for e in again.acknowledge("3", "3/cuff/sys-high", "nurse", 101.0)] == [
        "acknowledged",
        "cleared",
    ]
    assert alarms(again.on_reading("3", "ox", {"spo2": 97}, (), 102.0)) == [("spo2-low", "resumed")]
    assert alarms(again.tick(107.0)) == [("spo2-low", "cleared")]
    gone = AlarmEngine(AlarmProfile(rules=(SPO2_LOW, latch))).restore(snapshot, {"3/cuff"}, 100.0)
    assert [(e.rule, e.transition) for e in gone if isinstance(e, AlarmEvent)] == [("spo2-low", "cleared")]


def test_clock_skew_beyond_the_limit_and_its_uncertainty() -> None:
    eng = engine()
    assert eng.on_clock("gw", 2.4, 0.5, "influxdb", 0.0) == []  # could be 1.9 s: not beyond the 2 s limit
    raised = eng.on_clock("gw", -10.0, 0.5, "influxdb", 1.0)
    assert [(e.rule, e.transition, e.value, e.room) for e in raised] == [("clock_skew", "raised", -10.0, "_gateway")]
    assert alarms(eng.on_clock("gw", 0.1, 0.5, "influxdb", 61.0)) == [("clock_skew", "cleared")]


@pytest.mark.parametrize("model_id", ["nonin-df8", "masimo-ascii1"])
def test_noise_on_a_checksumless_line_never_becomes_an_alarm(model_id: str) -> None:
    """Observation 6: 1 MB of noise gave nonin-df8 22,073 readings, 925 unflagged. Ten megabytes of noise, then
    1,000 fresh connections to noise (where a driver may read one record from the first bytes), through the driver,
    the session's staleness watchdog and the engine (example profile): the only alarm is the true one, no_data."""
    from devices.base import DeviceStatus, Reading
    from devices.registry import get_model

    rng = random.Random(20261202)
    stale = get_model(model_id).spec.stale_after_s
    eng = AlarmEngine(EXAMPLE_KETAMINE_PROFILE, stale_after={"3/ox": stale})
    events: list[EngineEvent] = []
    now = 0.0
    for connection in range(1001):
        driver = get_model(model_id).driver()
        data = rng.randbytes(10_000_000 if connection == 0 else 256)
        pos, last_data, silent = 0, now, False
        while pos < len(data):
            size = rng.randint(64, 4096)
            now += size / 960.0  # 9600 baud
            for event in driver.feed(data[pos : pos + size], now):
                if isinstance(event, Reading | DeviceStatus):
                    last_data, silent = now, False
                if isinstance(event, Reading):
                    events += eng.on_reading("3", "ox", dict(event.metrics), event.flags, now)
                elif isinstance(event, DeviceStatus):
                    events += eng.on_status("3", "ox", event.state, event.code, now)
            if not silent and now - last_data >= stale:  # the session's watchdog: decoded nothing for a while
                silent = True
                events += eng.on_status("3", "ox", DeviceState.NO_DATA, None, now)
            events += eng.tick(now)
            pos += size
        if not silent:  # the line then goes quiet: the watchdog fires at its limit
            now = max(now, last_data + stale)
            events += eng.on_status("3", "ox", DeviceState.NO_DATA, None, now)
        now += 30.0  # the next connection comes later
        events += eng.tick(now)
    assert {(e.rule, e.transition) for e in only_alarms(events)} <= {("no_data", "raised"), ("no_data", "cleared")}


def test_silence_cannot_be_renewed_forever() -> None:
    """Demonstration (issue 12): `silence` could be repeated forever."""
    eng = engine(SPO2_LOW.model_copy(update={"delay_s": 0}))
    feed(eng, [85])
    for i in range(3):  # the first silence and two renewals
        assert alarms(eng.silence("3", "3/ox/spo2-low", 120, "nurse", float(i), max_renewals=2)) == [
            ("spo2-low", "silenced")
        ]
    with pytest.raises(ValueError, match="silenced 3 times already: acknowledge it"):
        eng.silence("3", "3/ox/spo2-low", 120, "nurse", 4.0, max_renewals=2)
