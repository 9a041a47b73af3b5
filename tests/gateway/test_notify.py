"""The Notifier (gateway/notify/policy.py) driven through time: routing, the escalation chain, rate limits, standby, stale
marking, retries and its durable state. Records are built by the gateway's own alarm_record from AlarmEvents."""

from __future__ import annotations

import random
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from devices.base import DeviceState, DeviceStatus, Reading
from devices.registry import get_model
from gateway.alarms import AlarmEvent, RoomModeEvent
from gateway.config import NotifySection
from gateway.envelope import (
    AlarmMessage,
    Origin,
    Record,
    alarm_record,
    decode,
    encode,
    origin_for,
    reading_record,
    room_mode_record,
    room_origin,
    status_record,
)
from gateway.notify.policy import Notifier, Outgoing

T0 = 1_800_000_000.0
URL = {"env": "UNUSED_IN_THESE_TESTS"}


def section(
    routes: list[dict[str, Any]], targets: tuple[str, ...] = ("phones", "station", "charge", "it"), **kw: Any
) -> NotifySection:
    limits = kw.pop("limits", {})
    return NotifySection.model_validate(
        {"targets": {t: {"url": URL, **limits.get(t, {})} for t in targets}, "routes": routes, **kw}
    )


class Feed:
    """Alarm and room-mode records as the gateway builds them, numbered per key like the outbox does."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.seq: dict[str, int] = {}
        self.source = 0
        self.records: list[tuple[int, Record]] = []

    def _put(self, key: str, build: Callable[[int], Record], now: float) -> Record:
        self.seq[key] = self.seq.get(key, 0) + 1
        self.source += 1
        record = build(self.seq[key])
        self.records.append((self.source, record))
        self.notifier.on_record(self.source, record, now)
        return record

    def alarm(
        self,
        transition: str,
        t: float,
        room: str = "7",
        device: str = "oximeter",
        rule: str = "spo2-low",
        priority: str = "high",
        kind: str = "physiological",
        since: float | None = T0,
        role: str | None = None,
    ) -> Record:
        event = AlarmEvent(
            alarm_id=f"{room}/{device}/{rule}",
            room=room,
            device=device,
            rule=rule,
            kind=kind,  # type: ignore[arg-type]
            priority=priority,  # type: ignore[arg-type]
            transition=transition,  # type: ignore[arg-type]
            active=transition not in ("cleared", "suspended"),
            time=t,
            metric="spo2" if kind == "physiological" else None,
            value=85.0 if kind == "physiological" else None,
            limit=90.0 if kind == "physiological" else None,
            message="SpO2 low" if kind == "physiological" else rule.replace("_", " "),
            role=role,
            since=since,
        )
        origin: Origin = {
            "site": "clinic-a",
            "room": room,
            "device": device,
            "model": "masimo-ascii1",
            "kind": "pulse_oximeter",
        }

        def build(seq: int) -> AlarmMessage:
            return alarm_record(origin, seq, event, "test-profile", False)

        return self._put(f"{room}/{device}", build, now=t)

    def mode(self, mode: str, t: float, room: str = "7") -> None:
        event = RoomModeEvent(room, mode, t, T0 + 7200 if mode == "standby" else None, "nurse")  # type: ignore[arg-type]
        self._put(f"{room}/_room", lambda seq: room_mode_record(room_origin("clinic-a", room), seq, event), now=t)


def waiting(n: Notifier, target: str | None = None) -> list[str]:
    return [p.ref for p in n.queue if target is None or p.target == target]


def send_all(n: Notifier, target: str, now: float) -> list[Outgoing]:
    """Everything due to `target` now, each accepted by it."""
    sent = n.due(target, now).send
    for out in sent:
        n.sent(out, now)
    return sent


ESCALATING: list[dict[str, Any]] = [
    {
        "priorities": ["high"],
        "kinds": ["physiological"],
        "targets": ["phones"],
        "escalate_to": ["charge", "station"],
        "escalate_after_s": 60,
        "repeat_every_s": 120,
    }
]


def test_routes_by_priority_and_kind_and_never_readings() -> None:
    n = Notifier(
        section(
            [
                {"priorities": ["high"], "kinds": ["physiological"], "targets": ["phones"]},
                {"priorities": ["medium"], "targets": ["station"]},
                {"kinds": ["technical"], "targets": ["it"]},
            ]
        )
    )
    feed = Feed(n)
    origin = origin_for("clinic-a", "7", "oximeter", get_model("masimo-ascii1").spec)
    assert not n.on_record(99, reading_record(origin, 1, T0, Reading({"spo2": 80.0})), T0)
    assert not n.on_record(98, status_record(origin, 2, T0, DeviceStatus(DeviceState.NO_DATA)), T0)
    assert n.queue == []
    feed.alarm("raised", T0)
    feed.alarm("raised", T0, rule="pulse-high", priority="medium")
    feed.alarm("raised", T0, rule="no_data", priority="high", kind="technical")
    feed.alarm("raised", T0, room="_gateway", device="gw-1", rule="storage", priority="high", kind="technical")
    by_target = {t: [ref.split(">")[0] for ref in waiting(n, t)] for t in ("phones", "station", "charge", "it")}
    assert by_target == {
        "phones": ["7/oximeter/1"],
        "station": ["7/oximeter/2"],
        "charge": [],
        "it": ["7/oximeter/3", "_gateway/gw-1/1"],
    }


def test_escalation_chain_then_reminders_until_acknowledged() -> None:
    n = Notifier(section(ESCALATING))
    feed = Feed(n)
    feed.alarm("raised", T0)
    assert waiting(n) == ["7/oximeter/1>phones"]
    send_all(n, "phones", T0)
    assert not n.tick(T0 + 59.9)
    assert n.tick(T0 + 60)
    step1 = n.queue[-1]
    assert (step1.target, step1.step) == ("charge", 1)
    text = n.render(Outgoing(step1.ref, "charge", (step1.ref,)), T0 + 60)
    assert text is not None and "ESCALATION 1: not acknowledged for 1 min 0 s" in text.body
    assert not n.tick(T0 + 179)
    assert n.tick(T0 + 180)
    assert (n.queue[-1].target, n.queue[-1].step) == ("station", 2)
    assert n.tick(T0 + 300)  # the chain is through: a reminder to everyone told
    reminders = [p for p in n.queue if p.step == 3]
    assert sorted(p.target for p in reminders) == ["charge", "phones", "station"]
    reminder = n.render(Outgoing(reminders[0].ref, reminders[0].target, (reminders[0].ref,)), T0 + 300)
    assert reminder is not None and "REMINDER: not acknowledged for 5 min 0 s" in reminder.body
    feed.alarm("acknowledged", T0 + 310, role="nurse")
    assert not [p for p in n.queue if p.step], "an acknowledgement cancels the steps not yet sent"
    acks = [p for p in n.queue if p.alarm.transition == "acknowledged"]
    assert sorted(p.target for p in acks) == ["charge", "phones", "station"]
    ack_text = n.render(Outgoing(acks[0].ref, acks[0].target, (acks[0].ref,)), T0 + 310)
    assert ack_text is not None and "acknowledged by nurse" in ack_text.title
    assert not n.tick(T0 + 10_000)


def test_a_cleared_alarm_cancels_its_pending_escalations() -> None:
    n = Notifier(section(ESCALATING))
    feed = Feed(n)
    feed.alarm("raised", T0)
    send_all(n, "phones", T0)
    for _ in range(6):  # the charge nurse's pager is down: step 1 will wait (16 s or more)
        n.failed("charge", "connection refused", T0 + 59)
    assert n.tick(T0 + 60)
    assert [p.step for p in n.queue if p.target == "charge"] == [1]
    assert n.due("charge", T0 + 60.1).send == []  # still in its retry wait
    feed.alarm("cleared", T0 + 70)
    assert [(p.target, p.step, p.alarm.transition) for p in n.queue] == [
        ("phones", 0, "cleared"),
        ("charge", 0, "cleared"),
    ]
    assert not n.tick(T0 + 1000)
    assert n.next_step_at() is None


def test_silence_pauses_the_chain_for_the_longest_silence() -> None:
    n = Notifier(section(ESCALATING), silence_s=120)
    feed = Feed(n)
    feed.alarm("raised", T0)
    feed.alarm("silenced", T0 + 30, role="nurse")
    assert not n.tick(T0 + 149)
    assert n.tick(T0 + 150)
    assert n.queue[-1].step == 1


def test_the_engines_escalation_reroutes_and_restarts_the_chain() -> None:
    routes: list[dict[str, Any]] = [{"priorities": ["medium"], "targets": ["station"]}, *ESCALATING]
    n = Notifier(section(routes))
    feed = Feed(n)
    feed.alarm("raised", T0, priority="medium")
    assert waiting(n) == ["7/oximeter/1>station"]
    assert not n.tick(T0 + 100)  # medium: no chain
    feed.alarm("escalated", T0 + 120, priority="high")
    assert waiting(n)[1:] == ["7/oximeter/2>phones", "7/oximeter/2>station"]  # the new route and who was told
    assert not n.tick(T0 + 179)
    assert n.tick(T0 + 180)  # 60 s after the escalation, not after the raise
    assert n.queue[-1].target == "charge"


def test_acknowledged_and_endings_of_an_unknown_alarm_tell_nobody() -> None:
    n = Notifier(section(ESCALATING))
    feed = Feed(n)
    feed.alarm("acknowledged", T0)
    feed.alarm("cleared", T0 + 1)
    feed.alarm("raised", T0 + 2, priority="low")  # no route for low
    feed.alarm("cleared", T0 + 3, priority="low")
    assert n.queue == []


def test_a_storm_becomes_one_summary_per_rate_window() -> None:
    n = Notifier(
        section(
            [{"targets": ["phones"]}],
            limits={"phones": {"max_messages": 3, "per_s": 60}},
        )
    )
    feed = Feed(n)
    for i in range(40):
        feed.alarm("raised", T0 + i * 0.1, device=f"dev{i}", rule="no_data", priority="high", kind="technical")
    first = send_all(n, "phones", T0 + 4)
    assert len(first) == 3 and all(len(o.covers) == 1 for o in first)
    assert n.due("phones", T0 + 5).send == []  # the rest is held
    assert n.wake_at("phones", T0 + 5) == T0 + 64
    assert n.due("phones", T0 + 63.9).send == []
    plan = n.due("phones", T0 + 64)
    assert len(plan.send) == 1 and len(plan.send[0].covers) == 37
    text = n.render(plan.send[0], T0 + 64)
    assert text is not None
    assert "37 alarm notifications in one (at most 3 per 60 s)" in text.title
    assert "... and 12 more" in text.body and text.body.count("\n- HIGH") + text.body.startswith("- HIGH") == 25
    n.sent(plan.send[0], T0 + 64)
    assert n.queue == []
    feed.alarm("cleared", T0 + 70, device="dev0", rule="no_data", priority="high", kind="technical")
    assert len(send_all(n, "phones", T0 + 70)) == 1  # after the storm: one at a time again


def test_a_standby_room_is_quiet_but_its_endings_reach_who_was_told() -> None:
    n = Notifier(section(ESCALATING))
    feed = Feed(n)
    feed.alarm("raised", T0)
    send_all(n, "phones", T0)
    feed.mode("standby", T0 + 10)
    assert not n.tick(T0 + 1000), "no escalation for a room in standby"
    feed.alarm("suspended", T0 + 10)
    ending = n.queue[-1]
    assert (ending.target, ending.alarm.transition) == ("phones", "suspended")
    text = n.render(Outgoing(ending.ref, "phones", (ending.ref,)), T0 + 10)
    assert text is not None and "standby" in text.body and text.severity == "success"
    send_all(n, "phones", T0 + 10)
    feed.alarm("raised", T0 + 20, rule="pulse-low")  # were one to come while in standby: nothing sent
    assert n.queue == []
    feed.mode("monitoring", T0 + 30)
    feed.alarm("raised", T0 + 40, rule="pulse-high")
    assert waiting(n) == ["7/oximeter/4>phones"]


def test_a_late_message_says_how_late_and_a_timely_one_does_not() -> None:
    n = Notifier(section([{"targets": ["phones"]}], stale_after_s=60))
    Feed(n).alarm("raised", T0)
    ref = n.queue[0].ref
    timely = n.render(Outgoing(ref, "phones", (ref,)), T0 + 1)
    late = n.render(Outgoing(ref, "phones", (ref,)), T0 + 300)
    assert timely is not None and late is not None
    assert "LATE" not in timely.title + timely.body
    assert late.title.startswith("LATE 5 min 0 s: ")
    assert "5 min 0 s ago (delivered late" in late.body


def test_the_text_says_where_what_value_limit_priority_since_and_how_to_acknowledge() -> None:
    n = Notifier(section([{"targets": ["phones"]}]))
    # A field no message may show cannot reach the notifier: a record has none, and a stored body carrying one is
    # not a record (the outbox reads it as undecodable, the sinks reject it, the notify worker skips it).
    raised = Feed(n).alarm("raised", T0)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        decode(encode(raised)[:-1] + b',"patient_name":"Jane Example","mrn":"123456"}')
    ref = n.queue[0].ref
    text = n.render(Outgoing(ref, "phones", (ref,)), T0 + 5)
    assert text is not None
    assert text.title == "[clinic-a] HIGH room 7 oximeter: SpO2 low - ALARM"
    body = text.body
    for expected in (
        "Where: room 7 oximeter (site clinic-a)",
        "Value: spo2 85 %, limit 90 %",
        "Priority: HIGH",
        "(5 s ago)",
        "infusion-telemetry ack --room 7 --alarm 7/oximeter/spo2-low --role nurse",
        "Ref: 7/oximeter/1>phones",
    ):
        assert expected in body, (expected, body)
    assert text.severity == "failure"


def test_retries_back_off_and_a_message_undelivered_too_long_is_given_up_with_the_reason() -> None:
    n = Notifier(section([{"targets": ["phones"]}], retry_max_s=30, give_up_after_s=3600), rng=random.Random(1))
    Feed(n).alarm("raised", T0)
    waits = [n.failed("phones", "the service answered 500", T0) for _ in range(8)]
    assert all(w > 0 for w in waits) and max(waits) <= 30 and waits[-1] >= 15  # doubling, capped, jittered
    assert n.due("phones", T0).send == []
    retry_at = n.targets["phones"].retry_at
    assert len(n.due("phones", retry_at).send) == 1
    plan = n.due("phones", T0 + 3601)
    assert [p.ref for p in plan.expired] == ["7/oximeter/1>phones"]
    assert plan.reason == "undelivered to phones for over 1 h 0 min: the service answered 500"
    assert n.queue == []


def test_a_refused_message_leaves_the_queue_for_the_rejected_pile() -> None:
    n = Notifier(section([{"targets": ["phones"]}]))
    Feed(n).alarm("raised", T0)
    out = n.due("phones", T0).send[0]
    assert [p.ref for p in n.refused(out)] == [out.ref]
    assert n.queue == []


def test_state_survives_a_restart_with_its_timers_and_records_are_not_taken_twice() -> None:
    cfg = section(ESCALATING)
    n = Notifier(cfg)
    feed = Feed(n)
    feed.alarm("raised", T0)
    n.failed("phones", "down", T0)
    snapshot = n.snapshot()
    again = Notifier(cfg)
    assert again.restore(snapshot, T0 + 30) == []
    for source, record in feed.records:  # the cursor had not been saved: the same record comes again
        assert not again.on_record(source, record, T0 + 30)
    assert waiting(again) == ["7/oximeter/1>phones"]
    assert not again.tick(T0 + 59)
    assert again.tick(T0 + 60) and again.queue[-1].target == "charge"
    # A target removed from the config: its messages are dropped, saying so.
    smaller = Notifier(section(ESCALATING, targets=("phones", "station", "charge")))
    assert smaller.restore({**snapshot, "queue": [*snapshot["queue"], {**snapshot["queue"][0], "target": "it"}]}, T0)
    assert waiting(smaller) == ["7/oximeter/1>phones"]


def test_the_commented_example_in_examples_gateway_toml_is_a_valid_notify_section() -> None:
    text = (Path(__file__).parents[2] / "examples" / "gateway.toml").read_text()
    block = text[text.index("# [notify]\n") :]
    data = tomllib.loads("\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines()))
    cfg = NotifySection.model_validate(data["notify"])
    assert sorted(cfg.targets) == ["charge-nurse", "it", "nurse-phones", "station"]
    n = Notifier(cfg)
    Feed(n).alarm("raised", T0, priority="high")
    assert waiting(n) == ["7/oximeter/1>nurse-phones", "7/oximeter/1>station"]
