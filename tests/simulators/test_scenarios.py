"""Scenario files: format and validation, interpolation and noise, and the packaged scenarios' shapes."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

import pytest

from devices.base import METRICS, DeviceState, DeviceStatus, Reading
from devices.registry import get_model
from simulators.scenarios import (
    KeyframeFile,
    NoiseFile,
    Scenario,
    ScenarioError,
    list_scenarios,
    load_scenario,
    parse_scenario,
)
from simulators.serve import DeviceSimulator

MODEL = get_model("masimo-ascii1")
STEADY = "[[keyframes]]\nt = 0\nspo2 = 98\npulse_rate = 72\n"


def frames(scenario: Scenario, seed: int, n: int) -> list[bytes]:
    sim = DeviceSimulator(MODEL, scenario, seed=seed)
    return [sim.step()[1] for _ in range(n)]


def test_packaged_scenarios_load() -> None:
    names = list_scenarios()
    assert {"baseline", "desaturation", "probe_off"} <= set(names)
    for name in names:
        scenario = load_scenario(name)
        assert scenario.name == name and scenario.description
        assert set(MODEL.spec.metrics) <= set(scenario.metrics)


def test_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('description = "mine"\n' + STEADY)
    for ref in (path, str(path)):
        scenario = load_scenario(ref)
        assert (scenario.name, scenario.description) == ("mine", "mine")
        assert scenario.metrics == ("spo2", "pulse_rate")


def test_unknown_name_lists_the_packaged_ones() -> None:
    with pytest.raises(ScenarioError, match=r"unknown scenario 'nope'.*baseline"):
        load_scenario("nope")


def test_file_fields_cover_every_metric() -> None:
    # A metric added to devices.base must be writable in a scenario; _in_range fails at import if not.
    assert set(METRICS) <= set(KeyframeFile.model_fields)
    assert set(NoiseFile.model_fields) == set(METRICS)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("durations = 3\n" + STEADY, "durations: Extra inputs are not permitted"),
        ("duration_s = -1\n" + STEADY, "duration_s: Input should be greater than 0"),
        ("[[keyframes]]\nt = 0\nspo2 = 120\n", "keyframes.0.spo2: 120 is outside"),
        ("[[keyframes]]\nt = 0\nspo2 = 'high'\n", "keyframes.0.spo2: Input should be a valid number"),
        ("[[keyframes]]\nt = 0\nspo3 = 98\n", "keyframes.0.spo3: Extra inputs are not permitted"),
        ("[[keyframes]]\nspo2 = 98\n", "keyframes.0.t: Field required"),
        (STEADY + "[[keyframes]]\nt = 5\nconditions = ['probe-off']\n", "keyframes.1.conditions: unknown"),
        (STEADY + "[[keyframes]]\nt = 5\nmissing = ['spo3']\n", "keyframes.1.missing: unknown metric spo3"),
        (STEADY + "[[keyframes]]\nt = 0\n", "keyframes: keyframes must be in increasing t"),
        ("[[keyframes]]\nt = 3\nspo2 = 98\n", "keyframes: the first keyframe must be at t = 0"),
        ("[[keyframes]]\nt = 0\nconditions = ['probe_off']\n", "keyframes: no keyframe sets any metric"),
        ('description = "x"\n', "keyframes: Field required"),
        ("keyframes = []\n", "keyframes: at least one keyframe is needed"),
        (STEADY + "[noise]\nspo2 = -1\n", "noise.spo2: Input should be greater than or equal to 0"),
        (STEADY + "[noise]\nspo3 = 1\n", "noise.spo3: Extra inputs are not permitted"),
        ("duration_s = 5\n" + STEADY + "[[keyframes]]\nt = 10\nspo2 = 90\n", "duration_s = 5 ends before"),
        ("[[keyframes]\n", "not valid TOML"),
    ],
)
def test_bad_file_names_the_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: ")
    assert field in str(info.value)


def test_unreadable_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(tmp_path / "absent.toml")


def test_linear_interpolation_per_metric_and_loop() -> None:
    scenario = parse_scenario(
        """
        [[keyframes]]
        t = 0
        spo2 = 90
        pulse_rate = 60
        [[keyframes]]
        t = 10
        pulse_rate = 80
        [[keyframes]]
        t = 20
        spo2 = 100
        """
    )
    assert scenario.period_s == 20
    assert scenario.value("spo2", 5) == pytest.approx(92.5)  # across the keyframe that does not set spo2
    assert scenario.value("pulse_rate", 5) == pytest.approx(70)
    assert scenario.value("pulse_rate", 15) == pytest.approx(80)  # held after its last keyframe
    assert scenario.value("spo2", 25) == pytest.approx(92.5)  # looped
    assert scenario.value("nibp_mean", 5) is None


def test_duration_holds_the_last_keyframe_instead_of_looping() -> None:
    text = "duration_s = 30\n[[keyframes]]\nt = 0\nspo2 = 90\n[[keyframes]]\nt = 10\nspo2 = 100\n"
    scenario = parse_scenario(text)
    assert scenario.period_s is None and scenario.duration_s == 30
    assert scenario.value("spo2", 25) == 100


def test_conditions_and_missing_hold_until_the_next_keyframe() -> None:
    scenario = parse_scenario(
        STEADY
        + "[[keyframes]]\nt = 10\nconditions = ['low_perfusion']\nmissing = ['spo2']\n"
        + "[[keyframes]]\nt = 20\n[[keyframes]]\nt = 30\n"
    )
    rng = random.Random(1)
    assert scenario.sample(9.9, rng).conditions == frozenset()
    held = scenario.sample(10, rng)
    assert held.conditions == {"low_perfusion"}
    assert held.metrics == {"spo2": None, "pulse_rate": 72}
    assert scenario.sample(19.9, rng).conditions == {"low_perfusion"}
    assert scenario.sample(20, rng).metrics == {"spo2": 98, "pulse_rate": 72}


def test_device_time_is_start_plus_t() -> None:
    scenario = parse_scenario("start = 2024-03-01T23:59:58\n" + STEADY)
    sample = scenario.sample(3, random.Random(1))
    assert sample.device_time == scenario.file.start + timedelta(seconds=3)
    assert MODEL.encode(sample).startswith(b"03/02/24 00:00:01 ")


def test_noise_is_clamped_to_what_a_device_can_report() -> None:
    scenario = parse_scenario(STEADY.replace("98", "100") + "[noise]\nspo2 = 3\n")
    values = [scenario.sample(t, random.Random(t)).metrics["spo2"] for t in range(200)]
    assert all(v is not None and v <= 100 for v in values)
    assert any(v is not None and v < 99 for v in values)


def test_negative_time_is_refused() -> None:
    with pytest.raises(ValueError, match="finite number >= 0"):
        load_scenario("baseline").sample(-1, random.Random(1))


@pytest.mark.parametrize("name", ["baseline", "desaturation", "probe_off"])
def test_same_seed_same_bytes_other_seed_other_bytes(name: str) -> None:
    scenario = load_scenario(name)
    first = frames(scenario, 7, 120)
    assert frames(load_scenario(name), 7, 120) == first
    assert frames(scenario, 8, 120) != first


def test_desaturation_falls_to_the_mid_80s_and_recovers() -> None:
    scenario = load_scenario("desaturation")
    rng = random.Random(3)
    samples = [scenario.sample(t, rng) for t in range(int(scenario.period_s or 0))]
    spo2 = [s.metrics["spo2"] or 0 for s in samples]
    pulse = [s.metrics["pulse_rate"] or 0 for s in samples]
    lowest = spo2.index(min(spo2))
    assert min(spo2) <= 88
    assert max(spo2[:lowest]) >= 95 and spo2[-1] >= 95  # steady before, recovered after
    assert max(spo2[lowest:]) >= 95
    assert 5 <= max(pulse) - pulse[0] <= 25  # the pulse rises a little


def test_probe_off_blanks_values_for_20_s_and_the_driver_sees_it() -> None:
    scenario = load_scenario("probe_off")
    rng = random.Random(1)
    samples = [scenario.sample(t, rng) for t in range(int(scenario.period_s or 0))]
    off = [i for i, s in enumerate(samples) if "probe_off" in s.conditions]
    assert off == list(range(30, 50))
    assert all(samples[i].metrics["spo2"] is None for i in off)
    assert samples[-1].conditions == frozenset() and samples[-1].metrics["spo2"] is not None

    events = MODEL.driver().feed(b"".join(MODEL.encode(s) for s in samples), 0.0)
    states = [e.state for e in events if isinstance(e, DeviceStatus)]
    assert states == [DeviceState.OK, DeviceState.PROBE_OFF, DeviceState.SEARCHING, DeviceState.OK]
    assert len([e for e in events if isinstance(e, Reading)]) == len(samples)
