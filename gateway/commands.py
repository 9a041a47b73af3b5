"""MQTT commands: validated, carried out or rejected with a reason, answered on `<topic>/reply`, logged.

A bad command must never crash anything or do half a thing: it is parsed against CommandMessage (unknown keys,
unknown actions and oversized fields are refused) before any device is touched. Logs name the room, device,
action and reason only; the raw payload is never logged, in case someone put personal data in it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

from pydantic import ValidationError

from gateway.records import CommandMessage, CommandReply, iso_utc
from gateway.session import CommandRejected, DeviceSession

log = logging.getLogger(__name__)
MAX_PAYLOAD = 4096


def _reply(command_id: str | None, ok: bool, reason: str = "") -> bytes:
    return CommandReply(id=command_id, ok=ok, reason=reason, time=iso_utc(time.time())).model_dump_json().encode()


def handle_command(prefix: str, site: str, sessions: Mapping[str, DeviceSession], topic: str, payload: bytes) -> bytes:
    """Carry out one command; returns the reply payload (always: a silent refusal helps no one)."""
    parts = topic.split("/")
    base = prefix.split("/")
    if parts[: len(base)] != base or len(parts) != len(base) + 4 or parts[len(base)] != site or parts[-1] != "command":
        return _reject(None, topic, f"not a command topic: {topic}")
    room, device = parts[len(base) + 1], parts[len(base) + 2]
    if len(payload) > MAX_PAYLOAD:
        return _reject(None, topic, f"payload over {MAX_PAYLOAD} bytes")
    try:
        raw = json.loads(payload)
    except ValueError:
        return _reject(None, topic, "payload is not JSON")
    command_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
    try:
        command = CommandMessage.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in exc.errors())
        return _reject(command_id, topic, f"invalid command: {problems}")
    session = sessions.get(f"{room}/{device}")
    if session is None:
        return _reject(command.id, topic, f"no device {device!r} in room {room!r} on this gateway")
    try:
        if command.action == "start_measurement":
            session.start_measurement()
    except CommandRejected as exc:
        return _reject(command.id, topic, str(exc))
    log.info(
        "command %s %s on %s/%s accepted (role %s)",
        command.id,
        command.action,
        room,
        device,
        command.operator_role or "-",
    )
    return _reply(command.id, True)


def _reject(command_id: str | None, topic: str, reason: str) -> bytes:
    log.warning("command rejected on %s: %s", topic, reason)
    return _reply(command_id, False, reason)
