"""MQTT commands are validated before anything happens, and every one gets a reply with a reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.commands import CommandRouter
from gateway.config import DeviceConfig
from gateway.session import DeviceSession


@pytest.fixture
def sessions() -> dict[str, DeviceSession]:
    ox = DeviceSession(DeviceConfig(room="1", name="ox", model="masimo-ascii1", port="/dev/null"), lambda *a: None)
    return {ox.key: ox}


def send(sessions: dict[str, DeviceSession], topic: str, payload: Any) -> dict[str, Any]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply: dict[str, Any] = json.loads(CommandRouter("infusion", "clinic", sessions).handle(topic, raw))
    return reply


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("infusion/clinic/1/ox/command", b"{not json", "payload is not JSON"),
        ("infusion/clinic/1/ox/command", {"id": "a1", "action": "inflate_to_300"}, "action: Input should be"),
        (
            "infusion/clinic/1/ox/command",
            {"id": "a2", "action": "start_measurement", "patient": "Jane Doe"},
            "patient: Extra",
        ),
        ("infusion/clinic/1/ox/command", {"action": "start_measurement"}, "id: Field required"),
        ("infusion/clinic/9/ox/command", {"id": "a3", "action": "start_measurement"}, "no device 'ox' in room '9'"),
        ("infusion/other-site/1/ox/command", {"id": "a4", "action": "start_measurement"}, "not a command topic"),
        ("infusion/clinic/1/ox/command", {"id": "a5", "action": "start_measurement"}, "does not take measurements"),
        ("infusion/clinic/1/ox/command", b"x" * 5000, "payload over 4096 bytes"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(
    sessions: dict[str, DeviceSession], topic: str, payload: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    reply = send(sessions, topic, payload)
    assert reply["ok"] is False
    assert reason in reply["reason"]
    assert "command rejected" in caplog.text
    assert "Jane Doe" not in caplog.text + json.dumps(reply)  # values from the payload are never logged or echoed


def test_reply_echoes_the_id() -> None:
    reply = send({}, "infusion/clinic/1/ox/command", {"id": "req-42", "action": "start_measurement"})
    assert reply["id"] == "req-42" and reply["ok"] is False
