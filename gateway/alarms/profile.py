"""A site's alarm policy: threshold and technical rules, the quality policy, and the EXAMPLE ketamine profile.

Validated by pydantic when the config is loaded; the engine (engine.py) applies it. docs/alarms.md says why.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from devices.base import METRICS, QUALITY_FLAGS, DeviceState

Priority = Literal["low", "medium", "high"]
PRIORITIES: tuple[Priority, ...] = ("low", "medium", "high")
NAME = r"^[a-z0-9][a-z0-9_-]{0,47}$"
BP_METRICS = ("nibp_systolic", "nibp_diastolic", "nibp_mean")
# Metrics a device reports continuously: a value is current only while the device keeps reporting it. A blood
# pressure is a measurement that stands until the next one (its overdue check is `nibp_overdue`).
CONTINUOUS_METRICS = frozenset({"spo2", "pulse_rate", "perfusion_index"})
SENSOR_STATES = frozenset(
    {DeviceState.PROBE_OFF, DeviceState.NO_SENSOR, DeviceState.SENSOR_FAULT, DeviceState.SEARCHING}
)
UNREACHABLE_STATES = frozenset({DeviceState.NO_DATA, DeviceState.DISCONNECTED})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThresholdRule(_Strict):
    """One limit on one metric. Exactly one of below, above, above_baseline_pct."""

    id: Annotated[str, Field(pattern=NAME)]
    metric: Literal[
        "spo2", "pulse_rate", "perfusion_index", "nibp_systolic", "nibp_diastolic", "nibp_mean", "nibp_pulse_rate"
    ]
    below: float | None = None
    above: float | None = None
    above_baseline_pct: Annotated[float, Field(gt=0, le=200)] | None = None  # vs the infusion session's baseline
    priority: Priority
    delay_s: Annotated[float, Field(ge=0, le=3600)] = 0.0  # the condition must hold this long
    clear_delay_s: Annotated[float, Field(ge=0, le=3600)] = 0.0  # and be gone this long to clear
    hysteresis: Annotated[float, Field(ge=0)] = 0.0  # in the metric's unit: clears only past limit +- this
    latching: bool = False  # stays until acknowledged, even when the condition is gone
    escalate_after_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    rooms: tuple[str, ...] = ()  # empty: every room
    devices: tuple[str, ...] = ()  # empty: every device
    message: str = ""
    # A stricter limit of the same condition: when it holds, the alarm of rule `tier_of` is raised (or escalated)
    # at this rule's priority, one alarm on every screen instead of two.
    tier_of: Annotated[str, Field(pattern=NAME)] | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> ThresholdRule:
        given = [n for n in ("below", "above", "above_baseline_pct") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of below, above or above_baseline_pct")
        if self.above_baseline_pct is not None and self.metric not in BP_METRICS:
            raise ValueError(f"above_baseline_pct applies to {', '.join(BP_METRICS)} (the session baseline)")
        spec = METRICS[self.metric]
        limit = self.below if self.below is not None else self.above
        if limit is not None and not spec.low <= limit <= spec.high:
            raise ValueError(f"limit {limit:g} is outside what a device reports ({spec.low:g}..{spec.high:g})")
        if self.tier_of is not None and (self.latching or self.escalate_after_s is not None):
            raise ValueError("a tier raises another rule's alarm: latching and escalate_after_s belong to that rule")
        return self

    @property
    def direction(self) -> str:
        return "below" if self.below is not None else "above"

    def applies(self, room: str, device: str) -> bool:
        return (not self.rooms or room in self.rooms) and (not self.devices or device in self.devices)


class TechnicalRule(_Strict):
    priority: Priority
    delay_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    enabled: bool = True


class TechnicalRules(_Strict):
    """Technical alarms. Delays add to the detection time (no_data already waits the model's stale_after_s)."""

    no_data: TechnicalRule = TechnicalRule(priority="high")
    device_disconnected: TechnicalRule = TechnicalRule(priority="high", delay_s=2)
    sensor: TechnicalRule = TechnicalRule(priority="medium", delay_s=15)  # probe off, no sensor, fault, search
    signal_quality: TechnicalRule = TechnicalRule(priority="medium", delay_s=15)  # readings flagged unusable
    cuff_error: TechnicalRule = TechnicalRule(priority="low")
    nibp_overdue: TechnicalRule = TechnicalRule(priority="medium")
    outbox_filling: TechnicalRule = TechnicalRule(priority="medium")
    broker_lost: TechnicalRule = TechnicalRule(priority="high", delay_s=10)
    clock_skew: TechnicalRule = TechnicalRule(priority="medium")
    storage: TechnicalRule = TechnicalRule(priority="high")  # the outbox cannot be written: nothing is durable
    outbox_fill_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.8
    clock_skew_limit_s: Annotated[float, Field(gt=0, le=3600)] = 2.0


DEFAULT_UNUSABLE = ("probe_off", "no_sensor", "sensor_fault", "searching")


class QualityPolicy(_Strict):
    """Which device quality flags make values unusable for physiological rules. Every other quality flag (low
    perfusion, low signal IQ, artifact, interference, out of track, ambient light) leaves the values evaluated
    and marked: those are what a deteriorating patient produces, so they must not switch alarms off."""

    unusable: tuple[str, ...] = DEFAULT_UNUSABLE

    @model_validator(mode="after")
    def _known(self) -> QualityPolicy:
        unknown = sorted(set(self.unusable) - QUALITY_FLAGS)
        if unknown:
            raise ValueError(
                f"unknown quality flag(s) {', '.join(unknown)}: known are {', '.join(sorted(QUALITY_FLAGS))}"
            )
        return self


class AlarmProfile(_Strict):
    name: str = "site"
    example: bool = False  # an example profile must say so wherever it is shown
    rules: tuple[ThresholdRule, ...] = ()
    technical: TechnicalRules = TechnicalRules()
    quality: QualityPolicy = QualityPolicy()

    @model_validator(mode="after")
    def _unique(self) -> AlarmProfile:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rule ids must be unique: {', '.join(dupes)}")
        by_id = {r.id: r for r in self.rules}
        for rule in self.rules:
            if rule.tier_of is None:
                continue
            base = by_id.get(rule.tier_of)
            if base is None or base.tier_of is not None or base.above_baseline_pct is not None:
                raise ValueError(f"rule {rule.id}: tier_of must name a below/above rule that is not a tier itself")
            if (base.metric, base.direction) != (rule.metric, rule.direction):
                raise ValueError(
                    f"rule {rule.id}: a tier must limit the same metric in the same direction as {base.id}"
                )
            stricter = (
                rule.below < base.below
                if rule.below is not None and base.below is not None
                else (rule.above is not None and base.above is not None and rule.above > base.above)
            )
            if not stricter or PRIORITIES.index(rule.priority) <= PRIORITIES.index(base.priority):
                raise ValueError(f"rule {rule.id}: a tier needs a stricter limit and a higher priority than {base.id}")
            if (rule.rooms, rule.devices) != (base.rooms, base.devices):
                raise ValueError(f"rule {rule.id}: a tier must apply to the same rooms and devices as {base.id}")
        return self


EXAMPLE_KETAMINE_PROFILE = AlarmProfile(
    name="example-ketamine-infusion",
    example=True,
    rules=(
        ThresholdRule(
            id="spo2-low",
            metric="spo2",
            below=92,
            priority="medium",
            delay_s=15,
            hysteresis=1,
            clear_delay_s=10,
            escalate_after_s=60,
            message="SpO2 low",
        ),
        ThresholdRule(
            id="spo2-very-low",
            metric="spo2",
            below=88,
            priority="high",
            delay_s=10,
            hysteresis=1,
            clear_delay_s=10,
            message="SpO2 very low",
            tier_of="spo2-low",  # the same desaturation, one alarm: it raises spo2-low to high
        ),
        ThresholdRule(
            id="pulse-low",
            metric="pulse_rate",
            below=45,
            priority="medium",
            delay_s=15,
            hysteresis=2,
            clear_delay_s=10,
            message="pulse rate low",
        ),
        ThresholdRule(
            id="pulse-high",
            metric="pulse_rate",
            above=130,
            priority="medium",
            delay_s=15,
            hysteresis=3,
            clear_delay_s=10,
            message="pulse rate high",
        ),
        ThresholdRule(
            id="sys-severe-high",
            metric="nibp_systolic",
            above=179,
            priority="high",
            latching=True,
            hysteresis=5,
            message="severe hypertension: systolic 180 or above",
        ),
        ThresholdRule(
            id="dia-severe-high",
            metric="nibp_diastolic",
            above=109,
            priority="high",
            latching=True,
            hysteresis=5,
            message="severe hypertension: diastolic 110 or above",
        ),
        ThresholdRule(
            id="sys-rise-baseline",
            metric="nibp_systolic",
            above_baseline_pct=25,
            priority="medium",
            message="systolic more than 25% above the session baseline",
        ),
    ),
)
"""An EXAMPLE of a site policy for ketamine infusion rooms, to show the rule language. Not clinical advice:
every site sets its own limits with its clinicians."""
