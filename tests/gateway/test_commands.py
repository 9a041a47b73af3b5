"""MQTT commands: bounded, validated, fresh, by an allowed role, once; every one gets a reply with a reason in our
own words; nothing in a message stops the handler or reaches a log or reply as free text."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.commands import CommandLedger, CommandRouter, command_payload
from gateway.config import CommandsSection, DeviceConfig
from gateway.envelope import iso_utc
from gateway.session import DeviceSession

NOW = 1_800_000_000.0


class Rooms:
    """The room actions, recording what was carried out (the real engine is wired in test_room_commands)."""

    def __init__(self) -> None:
        self.done: list[tuple[str, ...]] = []

    def acknowledge(self, room: str, alarm_id: str, role: str | None) -> None:
        self.done.append(("acknowledge", room, alarm_id))

    def silence(self, room: str, alarm_id: str, seconds: float, role: str | None) -> None:
        self.done.append(("silence", room, alarm_id))

    def start_session(self, room: str, role: str | None) -> str:
        self.done.append(("start_session", room))
        return f"{room}-s"

    def stop_session(self, room: str, role: str | None) -> None:
        self.done.append(("stop_session", room))

    def standby(self, room: str, seconds: float, role: str | None) -> None:
        self.done.append(("standby", room))

    def end_standby(self, room: str, role: str | None) -> None:
        self.done.append(("end_standby", room))


@pytest.fixture
def rooms() -> Rooms:
    return Rooms()


@pytest.fixture
def router(rooms: Rooms) -> CommandRouter:
    ox = DeviceSession(DeviceConfig(room="1", name="ox", model="masimo-ascii1", port="/dev/null"), lambda *a: None)
    return CommandRouter("infusion", "clinic", {ox.key: ox}, rooms, CommandsSection(), clock=lambda: NOW)


def send(router: CommandRouter, topic: str, payload: Any) -> dict[str, Any]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply = router.handle(topic, raw)
    assert reply is not None
    out: dict[str, Any] = json.loads(reply)
    return out


def fresh(**fields: Any) -> dict[str, Any]:
    return {"issued_at": iso_utc(NOW - 1), "operator_role": "nurse", **fields}


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("infusion/clinic/1/ox/command", b"{not json", "payload is not JSON"),
        ("infusion/clinic/1/ox/command", fresh(id="a1", action="inflate_to_300"), "action: Input should be"),
        ("infusion/clinic/1/ox/command", fresh(id="a2", action="start_measurement", patient="Jane Doe"), "unknown"),
        ("infusion/clinic/1/ox/command", fresh(action="start_measurement"), "id: Field required"),
        ("infusion/clinic/9/ox/command", fresh(id="a3", action="start_measurement"), "no such device"),
        ("infusion/other-site/1/ox/command", fresh(id="a4", action="start_measurement"), "not a command topic"),
        ("infusion/clinic/1/ox/command", fresh(id="a5", action="start_measurement"), "does not take measurements"),
        ("infusion/clinic/1/ox/command", b"x" * 5000, "payload over 4096 bytes"),
        ("infusion/clinic/1/command", b"[" * 2000, "nested deeper than 2"),
        ("infusion/clinic/1/command", b'{"id": "\xff"}', "not UTF-8"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(
    router: CommandRouter, topic: str, payload: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    reply = send(router, topic, payload)
    assert reply["ok"] is False
    assert reason in reply["reason"]
    assert "rejected" in caplog.text
    assert "Jane Doe" not in caplog.text + json.dumps(reply)  # values from the payload are never logged or echoed


def test_nested_brackets_no_longer_escape_the_handler(router: CommandRouter) -> None:
    """Demonstration 3: 2,000 bytes of `[` raised RecursionError out of handle() and killed the listener."""
    for payload in (b"[" * 2000, b'{"a":' * 1000, b"[" * 4096):
        assert send(router, "infusion/clinic/1/command", payload)["ok"] is False
    assert send(router, "infusion/clinic/1/command", fresh(id="after", action="start_session"))["ok"] is True


def test_a_command_is_carried_out_once_a_repeat_is_answered_not_run(router: CommandRouter, rooms: Rooms) -> None:
    """Demonstration 2: the same command id was accepted three times."""
    command = fresh(id="s-1", action="start_session")
    first = send(router, "infusion/clinic/1/command", command)
    assert first["ok"] is True and first["repeat"] is False
    for _ in range(2):
        again = send(router, "infusion/clinic/1/command", command)
        assert again == {**again, "ok": True, "repeat": True, "id": "s-1"}
    assert rooms.done == [("start_session", "1")]


def test_the_ledger_survives_a_restart_through_its_snapshot(router: CommandRouter, rooms: Rooms) -> None:
    send(router, "infusion/clinic/1/command", fresh(id="s-1", action="start_session"))
    restored = CommandLedger(30.0)
    restored.restore(json.loads(json.dumps(router.ledger.snapshot())), NOW + 5)
    router.ledger = restored
    assert send(router, "infusion/clinic/1/command", fresh(id="s-1", action="start_session"))["repeat"] is True
    assert rooms.done == [("start_session", "1")]


@pytest.mark.parametrize(
    ("issued", "reason"), [(NOW - 31, "stale: issued 31 s ago"), (NOW + 60, "in the future"), (None, "issued_at")]
)
def test_only_fresh_commands_are_acted_on(
    router: CommandRouter, rooms: Rooms, issued: float | None, reason: str
) -> None:
    """Demonstration 1: an acknowledge published 36 s before the alarm existed acknowledged it later."""
    command = fresh(id="late", action="start_session")
    if issued is None:
        del command["issued_at"]
    else:
        command["issued_at"] = iso_utc(issued)
    reply = send(router, "infusion/clinic/1/command", command)
    assert reply["ok"] is False and reason in reply["reason"]
    assert rooms.done == []


@pytest.mark.parametrize(
    ("role", "action", "reason"),
    [
        ("janitor", "start_session", "not a role of this gateway"),
        ("Nurse Jane Doe", "start_session", "operator_role: String should match pattern"),
        (None, "start_session", "operator_role: Field required"),
        ("technician", "standby", "role technician may not standby"),
    ],
)
def test_roles_and_their_actions_are_the_configs(
    router: CommandRouter, rooms: Rooms, role: str | None, action: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Demonstration 2: `operator_role` was free text ("janitor" and "Nurse Jane Doe" accepted, logged, stored)."""
    caplog.set_level(logging.INFO)
    command = fresh(id="r-1", action=action)
    if role is None:
        del command["operator_role"]
    else:
        command["operator_role"] = role
    reply = send(router, "infusion/clinic/1/command", command)
    assert reply["ok"] is False and reason in reply["reason"]
    assert rooms.done == []
    assert "Jane" not in caplog.text + json.dumps(reply)


def test_free_text_never_reaches_a_reply_or_a_log(router: CommandRouter, caplog: pytest.LogCaptureFixture) -> None:
    """Demonstration 7: a command id with a newline forged a log line; an alarm id with a name was echoed."""
    caplog.set_level(logging.INFO)
    forged = send(router, "infusion/clinic/1/command", fresh(id="x\nERROR forged", action="start_session"))
    named = send(router, "infusion/clinic/1/command", fresh(id="a-1", action="acknowledge", alarm_id="Jane Doe"))
    other = send(router, "infusion/clinic/Jane Doe/command", fresh(id="a-2", action="start_session"))
    assert all(r["ok"] is False for r in (forged, named, other))
    text = caplog.text + json.dumps([forged, named, other])
    assert "forged" not in text and "Jane" not in text and forged["id"] is None


def test_silence_is_capped(router: CommandRouter) -> None:
    reply = send(router, "infusion/clinic/1/command", fresh(id="q", action="silence", alarm_id="1/ox/x", silence_s=600))
    assert reply["ok"] is False and "over the maximum" in reply["reason"]


def test_an_empty_message_is_not_a_command(router: CommandRouter) -> None:
    assert router.handle("infusion/clinic/1/command", b"") is None  # how a retained command is cleared


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=6000) | st.text(max_size=2000).map(str.encode))
def test_any_bytes_yield_at_most_one_reply_and_the_router_goes_on(payload: bytes) -> None:
    rooms = Rooms()
    ox = DeviceSession(DeviceConfig(room="1", name="ox", model="masimo-ascii1", port="/dev/null"), lambda *a: None)
    router = CommandRouter("infusion", "clinic", {ox.key: ox}, rooms, CommandsSection(), clock=lambda: NOW)
    reply = router.handle("infusion/clinic/1/command", payload)
    assert reply is None or json.loads(reply)["type"] == "command_reply"
    after = router.handle(
        "infusion/clinic/1/command",
        command_payload(id="ok-after", action="start_session", operator_role="nurse", issued_at=iso_utc(NOW)),
    )
    assert after is not None and json.loads(after)["ok"] is True
