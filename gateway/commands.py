"""MQTT commands: acted on once, only while fresh, only by a role allowed to; every other message is refused with
a reason, and nothing in a message can stop the listener.

Every network input is hostile: the broker is shared by many clients. A command is bounded (size, nesting depth,
UTF-8) before it is parsed, parsed against its model (unknown keys, unknown actions and anything that is not a strict
pattern are refused), checked against its `issued_at` window and the role's allowed actions, and remembered by id
for the window (durably, through the outbox) so a repeat is answered as a repeat and never run twice. Retained
command messages are never executed (the MQTT sink clears them). Logs and replies carry our own words and
pattern-checked fields only, never text from the payload or an unknown topic level.

Topics: `{prefix}/{site}/{room}/{device}/command` (DeviceCommand: start_measurement) and
`{prefix}/{site}/{room}/command` (RoomCommand: acknowledge, silence, start_session, stop_session, standby,
end_standby).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from gateway.config import CommandsSection
from gateway.envelope import COMMAND_ID, CommandReply, DeviceCommand, RoomCommand, encode, iso_utc
from gateway.session import CommandRejected, DeviceSession

log = logging.getLogger(__name__)
MAX_PAYLOAD = 4096  # bytes; a command is a few hundred
MAX_DEPTH = 2  # commands are flat objects; deeper nesting is refused before the JSON parser sees it
MAX_REMEMBERED = 10_000  # command ids kept for the window; beyond that the oldest go first
_COMMAND_ID = re.compile(COMMAND_ID)


class RoomActions(Protocol):
    """What room commands do; each raises ValueError with the reason when it cannot be done."""

    def acknowledge(self, room: str, alarm_id: str, role: str | None) -> None: ...

    def silence(self, room: str, alarm_id: str, seconds: float, role: str | None) -> None: ...

    def start_session(self, room: str, role: str | None) -> str: ...

    def stop_session(self, room: str, role: str | None) -> None: ...

    def standby(self, room: str, seconds: float, role: str | None) -> None: ...

    def end_standby(self, room: str, role: str | None) -> None: ...


def _reply(command_id: str | None, ok: bool, reason: str = "", repeat: bool = False) -> bytes:
    return encode(CommandReply(id=command_id, ok=ok, reason=reason, repeat=repeat, time=iso_utc(time.time())))


def depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit` (strings skipped), without parsing it: a payload
    of 2,000 `[` made the parser raise RecursionError."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


class CommandLedger:
    """Command ids handled within the window, with the reply they got: a repeat gets the same answer, marked as a
    repeat. Snapshotted into the outbox so a restart does not forget them."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()

    def _expire(self, now: float) -> None:
        while self._seen:
            first = next(iter(self._seen.values()))
            if first[0] > now and len(self._seen) <= MAX_REMEMBERED:
                break
            self._seen.popitem(last=False)

    def get(self, command_id: str, now: float) -> dict[str, Any] | None:
        self._expire(now)
        entry = self._seen.get(command_id)
        return None if entry is None else entry[1]

    def remember(self, command_id: str, reply: dict[str, Any], now: float) -> None:
        # Kept for twice the window: a command issued at the window's far edge stays recognisable until it is stale.
        self._seen[command_id] = (now + 2 * self.window_s, reply)
        self._expire(now)

    def snapshot(self) -> dict[str, Any]:
        return {"v": 1, "seen": [[i, until, reply] for i, (until, reply) in self._seen.items()]}

    def restore(self, snapshot: dict[str, Any], now: float) -> None:
        if snapshot.get("v") != 1:
            raise ValueError(f"unknown command ledger version {snapshot.get('v')!r}")
        for command_id, until, reply in snapshot.get("seen", []):
            if isinstance(command_id, str) and _COMMAND_ID.match(command_id) and isinstance(reply, dict):
                self._seen[command_id] = (float(until), reply)
        self._expire(now)


class CommandRouter:
    def __init__(
        self,
        prefix: str,
        site: str,
        sessions: Mapping[str, DeviceSession],
        rooms: RoomActions | None = None,
        policy: CommandsSection | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`on_change` receives the ledger's snapshot after every handled command (the gateway stores it)."""
        self.base = [*prefix.split("/"), site]
        self.sessions = sessions
        self.rooms = rooms
        self.policy = policy or CommandsSection()
        self.ledger = CommandLedger(self.policy.window_s)
        self.on_change = on_change
        self.clock = clock
        self._rooms = {s.cfg.room for s in sessions.values()}

    @property
    def subscriptions(self) -> list[str]:
        base = "/".join(self.base)
        return [f"{base}/+/command", f"{base}/+/+/command"]

    def where(self, topic: str) -> str:
        """A topic as it may be logged: only room and device names this gateway knows (a topic level is free text)."""
        parts = topic.split("/")
        n = len(self.base)
        room = parts[n] if len(parts) > n else ""
        if room not in self._rooms:
            return "an unknown room"
        device = parts[n + 1] if len(parts) == n + 3 else None
        if device is not None and f"{room}/{device}" not in self.sessions:
            return f"room {room}, an unknown device"
        return f"room {room}" + (f" device {device}" if device is not None else "")

    def handle(self, topic: str, payload: bytes) -> bytes | None:
        """Carry out one command; the reply payload (None for an empty message: how a retained one is cleared).
        Never raises: whatever a message does to the handler is answered and logged, and the listener goes on."""
        try:
            return self._handle(topic, payload)
        except Exception as exc:
            log.error("command in %s could not be handled: %s", self.where(topic), type(exc).__name__)
            return _reply(None, False, "internal error: the command was not carried out")

    def _reject(self, command_id: str | None, topic: str, reason: str) -> bytes:
        log.warning("command %s in %s rejected: %s", command_id or "-", self.where(topic), reason)
        return _reply(command_id, False, reason)

    def _handle(self, topic: str, payload: bytes) -> bytes | None:
        parts = topic.split("/")
        n = len(self.base)
        if parts[:n] != self.base or parts[-1] != "command" or len(parts) not in (n + 2, n + 3):
            return self._reject(None, topic, "not a command topic")
        if not payload:
            return None
        if len(payload) > MAX_PAYLOAD:
            return self._reject(None, topic, f"payload over {MAX_PAYLOAD} bytes")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return self._reject(None, topic, "payload is not UTF-8")
        if depth_exceeds(text, MAX_DEPTH):
            return self._reject(None, topic, f"payload nested deeper than {MAX_DEPTH}")
        try:
            raw = json.loads(text)
        except ValueError:
            return self._reject(None, topic, "payload is not JSON")
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        command_id = raw_id if isinstance(raw_id, str) and _COMMAND_ID.match(raw_id) else None
        model: type[DeviceCommand | RoomCommand] = RoomCommand if len(parts) == n + 2 else DeviceCommand
        try:
            command = model.model_validate(raw)
        except ValidationError as exc:
            return self._reject(command_id, topic, f"invalid command: {_problems(exc, model)}")
        now = self.clock()
        refusal = self._refusal(command, now)
        if refusal:
            return self._reject(command.id, topic, refusal)
        seen = self.ledger.get(command.id, now)
        if seen is not None:
            log.warning("command %s in %s is a repeat: answered, not carried out again", command.id, self.where(topic))
            return _reply(command.id, bool(seen.get("ok")), str(seen.get("reason", "")), repeat=True)
        room = parts[n]
        try:
            if isinstance(command, DeviceCommand):
                detail = self._device(room, parts[n + 1])
            else:
                detail = self._room(room, command)
            ok, reason = True, detail
            log.info(
                "command %s %s in %s accepted (role %s)",
                command.id,
                command.action,
                self.where(topic),
                command.operator_role,
            )
        except (CommandRejected, ValueError) as exc:
            ok, reason = False, str(exc)
            log.warning("command %s in %s rejected: %s", command.id, self.where(topic), reason)
        self.ledger.remember(command.id, {"ok": ok, "reason": reason}, now)
        if self.on_change is not None:
            self.on_change(self.ledger.snapshot())
        return _reply(command.id, ok, reason)

    def _refusal(self, command: DeviceCommand | RoomCommand, now: float) -> str:
        """Why a well-formed command must not be carried out now ("" when it may)."""
        issued = datetime.fromisoformat(command.issued_at).timestamp()
        window = self.policy.window_s
        if now - issued > window:
            return f"stale: issued {now - issued:.0f} s ago, commands are valid for {window:g} s"
        if issued - now > window:
            return f"issued {issued - now:.0f} s in the future: check the sender's clock"
        allowed = self.policy.roles.get(command.operator_role)
        if allowed is None:
            return "operator_role is not a role of this gateway"
        if command.action not in allowed:
            return f"role {command.operator_role} may not {command.action}"
        silence = isinstance(command, RoomCommand) and command.action == "silence"
        if silence and isinstance(command, RoomCommand) and command.silence_s > self.policy.silence_max_s:
            return f"silence_s over the maximum of {self.policy.silence_max_s:g} s"
        return ""

    def _device(self, room: str, device: str) -> str:
        session = self.sessions.get(f"{room}/{device}")
        if session is None:
            raise ValueError("no such device in this room on this gateway")
        session.start_measurement()
        return ""

    def _room(self, room: str, command: RoomCommand) -> str:
        if room not in self._rooms:
            raise ValueError("no such room on this gateway")
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


def _problems(exc: ValidationError, model: type[BaseModel]) -> str:
    """The validation errors in our words: a field is named only if it is one of the model's (an unknown key is
    free text), and the offending value is never quoted."""
    parts: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        first = err["loc"][0] if err["loc"] else None
        where = str(first) if isinstance(first, str) and first in model.model_fields else "payload"
        message = "unknown field" if err["type"] == "extra_forbidden" else str(err["msg"])
        parts.append(f"{where}: {message.removeprefix('Value error, ')}")
    return "; ".join(sorted(set(parts)))


def command_payload(**fields: Any) -> bytes:
    """A command as JSON, for the CLI and tests; `issued_at` is now unless given."""
    return json.dumps({"issued_at": iso_utc(time.time()), **fields}).encode()
