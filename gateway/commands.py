"""MQTT commands: validated, carried out or rejected with a reason, answered on `<topic>/reply`, logged.

A bad command must never crash anything or do half a thing: it is parsed against its model (unknown keys, unknown
actions and oversized fields are refused) before anything is touched. Logs name the room, device, action and
reason only; the raw payload is never logged or echoed, in case someone put personal data in it.

Topics: `{prefix}/{site}/{room}/{device}/command` (DeviceCommand: start_measurement) and
`{prefix}/{site}/{room}/command` (RoomCommand: acknowledge, silence, start_session, stop_session, standby,
end_standby).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from gateway.records import CommandReply, DeviceCommand, RoomCommand, iso_utc
from gateway.session import CommandRejected, DeviceSession

log = logging.getLogger(__name__)
MAX_PAYLOAD = 4096


class RoomActions(Protocol):
    """What room commands do; each raises ValueError with the reason when it cannot be done."""

    def acknowledge(self, room: str, alarm_id: str, role: str | None) -> None: ...

    def silence(self, room: str, alarm_id: str, seconds: float, role: str | None) -> None: ...

    def start_session(self, room: str, role: str | None) -> str: ...

    def stop_session(self, room: str, role: str | None) -> None: ...

    def standby(self, room: str, seconds: float, role: str | None) -> None: ...

    def end_standby(self, room: str, role: str | None) -> None: ...


def _reply(command_id: str | None, ok: bool, reason: str = "") -> bytes:
    return CommandReply(id=command_id, ok=ok, reason=reason, time=iso_utc(time.time())).model_dump_json().encode()


def _reject(command_id: str | None, topic: str, reason: str) -> bytes:
    log.warning("command rejected on %s: %s", topic, reason)
    return _reply(command_id, False, reason)


class CommandRouter:
    def __init__(
        self, prefix: str, site: str, sessions: Mapping[str, DeviceSession], rooms: RoomActions | None = None
    ) -> None:
        self.base = [*prefix.split("/"), site]
        self.sessions = sessions
        self.rooms = rooms

    @property
    def subscriptions(self) -> list[str]:
        base = "/".join(self.base)
        return [f"{base}/+/command", f"{base}/+/+/command"]

    def handle(self, topic: str, payload: bytes) -> bytes:
        """Carry out one command; returns the reply payload (always: a silent refusal helps no one)."""
        parts = topic.split("/")
        n = len(self.base)
        if parts[:n] != self.base or parts[-1] != "command" or len(parts) not in (n + 2, n + 3):
            return _reject(None, topic, f"not a command topic: {topic}")
        if len(payload) > MAX_PAYLOAD:
            return _reject(None, topic, f"payload over {MAX_PAYLOAD} bytes")
        try:
            raw = json.loads(payload)
        except ValueError:
            return _reject(None, topic, "payload is not JSON")
        command_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
        room = parts[n]
        model: type[BaseModel] = RoomCommand if len(parts) == n + 2 else DeviceCommand
        try:
            command = model.model_validate(raw)
        except ValidationError as exc:
            return _reject(command_id, topic, f"invalid command: {_problems(exc)}")
        try:
            if isinstance(command, DeviceCommand):
                detail = self._device(room, parts[n + 1], command)
            else:
                assert isinstance(command, RoomCommand)
                detail = self._room(room, command)
        except (CommandRejected, ValueError) as exc:
            return _reject(command_id, topic, str(exc))
        log.info(
            "command %s %s on %s accepted (role %s)", command_id, raw["action"], topic, raw.get("operator_role") or "-"
        )
        return _reply(command_id, True, detail)

    def _device(self, room: str, device: str, command: DeviceCommand) -> str:
        session = self.sessions.get(f"{room}/{device}")
        if session is None:
            raise ValueError(f"no device {device!r} in room {room!r} on this gateway")
        session.start_measurement()
        return ""

    def _room(self, room: str, command: RoomCommand) -> str:
        if not any(s.cfg.room == room for s in self.sessions.values()):
            raise ValueError(f"no room {room!r} on this gateway")
        if self.rooms is None:
            raise ValueError("this gateway runs no alarm engine")
        role = command.operator_role
        if command.action == "acknowledge":
            assert command.alarm_id is not None
            self.rooms.acknowledge(room, command.alarm_id, role)
        elif command.action == "silence":
            assert command.alarm_id is not None
            self.rooms.silence(room, command.alarm_id, command.silence_s, role)
        elif command.action == "start_session":
            return f"session {self.rooms.start_session(room, role)} started"
        elif command.action == "stop_session":
            self.rooms.stop_session(room, role)
        elif command.action == "standby":
            self.rooms.standby(room, command.standby_s, role)
            return f"room {room} in standby for {command.standby_s:g} s"
        else:
            self.rooms.end_standby(room, role)
        return ""


def _problems(exc: ValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors():
        where = ".".join(map(str, err["loc"])) or "payload"
        parts.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def command_payload(**fields: Any) -> bytes:
    """A command as JSON, for the CLI and tests."""
    return json.dumps(fields).encode()
