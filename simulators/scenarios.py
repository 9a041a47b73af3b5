"""Scenarios as data: TOML keyframes that engineers write themselves, sampled into `Sample`s.

A scenario file (packaged ones live in simulators/scenarios/<name>.toml; any path works too):

    description = "Steady, then a desaturation to the mid 80s, then recovery"
    duration_s = 600            # optional: the scenario ends here; without it the keyframes loop
    start = 2025-01-06T08:00:00 # optional: the device clock at t = 0 (fixed, so bytes are reproducible)

    [[keyframes]]
    t = 0                       # scenario seconds; the first keyframe is at 0, then strictly increasing
    spo2 = 98                   # any canonical metric of devices.base.METRICS, within its range
    pulse_rate = 72
    perfusion_index = 3.5

    [[keyframes]]
    t = 30
    conditions = ["probe_off"]  # hold from this keyframe until the next one
    missing = ["spo2"]          # metrics the device shows as not available ("---") until the next keyframe

    [noise]                     # Gaussian standard deviation per metric (0 when absent)
    spo2 = 0.4

Each metric is interpolated linearly between the keyframes that set it and held before the first and after the
last, so a keyframe that only changes conditions need not repeat the values. Without `duration_s` the scenario
repeats with a period of the last keyframe's `t` (make the last keyframe equal the first for a seamless loop).
Noise comes from the caller's `random.Random`, so a seed fixes every value; values are clamped to the metric's
range because a real device cannot report outside it.
"""

from __future__ import annotations

import bisect
import math
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from devices.base import METRICS, QUALITY_FLAGS, DeviceState, Sample

# The device clock at t = 0 unless a file says otherwise: fixed, not "now", so a seed fixes every byte.
DEFAULT_START = datetime(2025, 1, 6, 8, 0, 0)

# Conditions a device itself can show (the gateway-side states such as no_data are not a device's to report).
_GATEWAY_STATES = {DeviceState.OK, DeviceState.CONNECTED, DeviceState.NO_DATA, DeviceState.DISCONNECTED}
KNOWN_CONDITIONS: frozenset[str] = QUALITY_FLAGS | {str(s) for s in DeviceState if s not in _GATEWAY_STATES}


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message names the file and the field."""


# --- the file format ----------------------------------------------------------------------------------------


def _metric_value() -> Any:
    return Field(default=None, allow_inf_nan=False)


def _sigma() -> Any:
    return Field(default=0.0, ge=0, allow_inf_nan=False)


class KeyframeFile(BaseModel):
    """One `[[keyframes]]` table. The metric fields mirror devices.base.METRICS (see `_in_range`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float = Field(ge=0, allow_inf_nan=False)
    conditions: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    spo2: float | None = _metric_value()
    pulse_rate: float | None = _metric_value()
    perfusion_index: float | None = _metric_value()
    nibp_systolic: float | None = _metric_value()
    nibp_diastolic: float | None = _metric_value()
    nibp_mean: float | None = _metric_value()
    nibp_pulse_rate: float | None = _metric_value()

    @field_validator(*METRICS)
    @classmethod
    def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        # The limits come from METRICS, the one source of truth. Naming every METRICS field here also makes
        # class creation fail if a metric is added to devices.base without a field above.
        spec = METRICS[str(info.field_name)]
        if value is not None and not spec.low <= value <= spec.high:
            limits = f"{spec.low:g}..{spec.high:g} {spec.unit}"
            raise ValueError(f"{value:g} is outside what a device can report ({limits})")
        return value

    @field_validator("conditions")
    @classmethod
    def _known_conditions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - KNOWN_CONDITIONS)
        if unknown:
            known = ", ".join(sorted(KNOWN_CONDITIONS))
            raise ValueError(f"unknown condition {', '.join(unknown)}; known: {known}")
        return value

    @field_validator("missing")
    @classmethod
    def _known_metrics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metric {', '.join(unknown)}; known: {', '.join(METRICS)}")
        return value

    def values(self) -> dict[str, float]:
        """The metrics this keyframe sets."""
        return {name: v for name in METRICS if (v := getattr(self, name)) is not None}


class NoiseFile(BaseModel):
    """The `[noise]` table: a standard deviation per metric, in the metric's unit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spo2: float = _sigma()
    pulse_rate: float = _sigma()
    perfusion_index: float = _sigma()
    nibp_systolic: float = _sigma()
    nibp_diastolic: float = _sigma()
    nibp_mean: float = _sigma()
    nibp_pulse_rate: float = _sigma()


class FaultFile(BaseModel):
    """A `[[faults]]` entry: something goes wrong between the device and the gateway for a while.

    - unplug: the pty closes (the gateway's read fails at once) and a new one appears at the same link when
      the fault ends, as when a USB adapter is pulled and plugged back;
    - silence: the device stops sending but the port stays open (a dead serial device server looks like this);
    - noise: the line is bad: `garbage` is the chance per frame of random bytes before it, `drop` the chance per
      byte of losing it, `corrupt` the chance per byte of a flipped bit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float = Field(ge=0, allow_inf_nan=False)
    duration_s: float = Field(gt=0, allow_inf_nan=False)
    kind: Literal["unplug", "silence", "noise"]
    garbage: float = Field(default=0.0, ge=0, le=1)
    drop: float = Field(default=0.0, ge=0, le=1)
    corrupt: float = Field(default=0.0, ge=0, le=1)
    devices: tuple[Literal["pulse_oximeter", "nibp"], ...] = ("pulse_oximeter", "nibp")

    def active(self, t_s: float) -> bool:
        return self.t <= t_s < self.t + self.duration_s


class ScenarioFile(BaseModel):
    """A whole scenario file, validated strictly so a typo is an error, not a silently ignored line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    start: datetime = DEFAULT_START
    keyframes: tuple[KeyframeFile, ...]
    noise: NoiseFile = NoiseFile()
    faults: tuple[FaultFile, ...] = ()

    @field_validator("keyframes")
    @classmethod
    def _ordered(cls, value: tuple[KeyframeFile, ...]) -> tuple[KeyframeFile, ...]:
        if not value:
            raise ValueError("at least one keyframe is needed")
        if value[0].t != 0:
            raise ValueError(f"the first keyframe must be at t = 0, not {value[0].t:g}")
        for i in range(1, len(value)):
            if value[i].t <= value[i - 1].t:
                raise ValueError(
                    f"keyframes must be in increasing t: keyframes.{i}.t = {value[i].t:g} "
                    f"is not after keyframes.{i - 1}.t = {value[i - 1].t:g}"
                )
        if not any(k.values() for k in value):
            raise ValueError("no keyframe sets any metric")
        return value

    @model_validator(mode="after")
    def _duration_covers_keyframes(self) -> ScenarioFile:
        last = self.keyframes[-1].t
        if self.duration_s is not None and self.duration_s < last:
            raise ValueError(f"duration_s = {self.duration_s:g} ends before the last keyframe (t = {last:g})")
        return self


# --- the sampled scenario -----------------------------------------------------------------------------------


def _interpolate(track: tuple[tuple[float, float], ...], t: float) -> float:
    times = [p[0] for p in track]
    i = bisect.bisect_right(times, t)
    if i == 0:
        return track[0][1]
    if i == len(track):
        return track[-1][1]
    (t0, v0), (t1, v1) = track[i - 1], track[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


@dataclass(frozen=True, eq=False)
class Scenario:
    """A validated scenario, ready to sample. Build it with `load_scenario` or `Scenario.from_file`."""

    name: str
    source: str
    file: ScenarioFile
    metrics: tuple[str, ...] = field(init=False)  # in METRICS order: the ones some keyframe sets
    _times: tuple[float, ...] = field(init=False, repr=False)
    _tracks: Mapping[str, tuple[tuple[float, float], ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tracks = {
            name: tuple((k.t, v) for k in self.file.keyframes if (v := getattr(k, name)) is not None)
            for name in METRICS
        }
        object.__setattr__(self, "_tracks", {name: track for name, track in tracks.items() if track})
        object.__setattr__(self, "metrics", tuple(self._tracks))
        object.__setattr__(self, "_times", tuple(k.t for k in self.file.keyframes))

    @classmethod
    def from_file(cls, file: ScenarioFile, name: str = "scenario", source: str = "<memory>") -> Scenario:
        return cls(name=name, source=source, file=file)

    @property
    def description(self) -> str:
        return self.file.description

    @property
    def duration_s(self) -> float | None:
        """Scenario seconds after which the device stops sending; None = runs (and loops) for ever."""
        return self.file.duration_s

    @property
    def period_s(self) -> float | None:
        """The loop period, or None when the scenario does not loop (it has a duration, or one keyframe)."""
        last = self._times[-1]
        return None if self.file.duration_s is not None or last == 0 else last

    def scenario_time(self, t_s: float) -> float:
        """Where in the keyframes scenario time `t_s` falls, after looping."""
        if t_s < 0 or not math.isfinite(t_s):
            raise ValueError(f"scenario time must be a finite number >= 0, not {t_s}")
        period = self.period_s
        return t_s % period if period else t_s

    def value(self, metric: str, t_s: float) -> float | None:
        """The noise-free value of `metric` at `t_s` (None if never set); `missing` does not blank it."""
        track = self._tracks.get(metric)
        return None if track is None else _interpolate(track, self.scenario_time(t_s))

    def faults_at(self, t_s: float, kind: str) -> tuple[FaultFile, ...]:
        """Faults active at scenario time `t_s` for a device of `kind` (they repeat with the loop)."""
        u = self.scenario_time(t_s)
        return tuple(f for f in self.file.faults if kind in f.devices and f.active(u))

    def sample(self, t_s: float, rng: random.Random) -> Sample:
        """What the device shows at scenario time `t_s` (seconds since the scenario started).

        One Gaussian draw per noisy metric per call, whether or not the metric is missing, so the random
        stream (and so the bytes for a seed) does not depend on which conditions happen to be active.
        """
        u = self.scenario_time(t_s)
        keyframe = self.file.keyframes[bisect.bisect_right(self._times, u) - 1]
        metrics: dict[str, float | None] = {}
        for name, track in self._tracks.items():
            value = _interpolate(track, u)
            sigma: float = getattr(self.file.noise, name)
            if sigma > 0:
                value += rng.gauss(0.0, sigma)
            spec = METRICS[name]
            metrics[name] = None if name in keyframe.missing else min(max(value, spec.low), spec.high)
        return Sample(
            metrics=metrics,
            conditions=frozenset(keyframe.conditions),
            device_time=self.file.start + timedelta(seconds=t_s),
        )


# --- loading ------------------------------------------------------------------------------------------------


def _packaged() -> Traversable:
    return resources.files("simulators") / "scenarios"


def list_scenarios() -> list[str]:
    """Names of the packaged scenarios, for `--scenario NAME`."""
    return sorted(p.name.removesuffix(".toml") for p in _packaged().iterdir() if p.name.endswith(".toml"))


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_scenario(text: str, name: str = "scenario", source: str = "<memory>") -> Scenario:
    """A scenario from TOML text; errors are ScenarioError naming `source` and the field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    try:
        file = ScenarioFile.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_format_errors(source, exc)) from None
    return Scenario.from_file(file, name=name, source=source)


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A packaged scenario by name ("desaturation") or any TOML file by path."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or text.endswith(".toml")
    if looks_like_path:
        path = Path(name_or_path)
        try:
            content = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"{path}: cannot read scenario: {exc.strerror or exc}") from None
        return parse_scenario(content, name=path.stem, source=str(path))
    resource = _packaged() / f"{text}.toml"
    if not resource.is_file():
        known = ", ".join(list_scenarios())
        raise ScenarioError(f"unknown scenario {text!r}; packaged: {known} (or the path of a .toml file)")
    source = f"simulators/scenarios/{text}.toml"
    return parse_scenario(resource.read_text(encoding="utf-8"), name=text, source=source)
