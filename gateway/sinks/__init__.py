"""Sinks: one module per outside system, the only place its library is imported.

A sink is an async context manager (connect on enter, close on exit) with `write(batch) -> WriteResult`; a batch is
committed outbox items, each a typed record (gateway/envelope.py) with the JSON body it was stored as.
It turns its library's errors into ours: SinkUnavailable (retry later, reconnect) or a rejected result (poison).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.envelope import Record
    from gateway.outbox import Item


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # the target refused the data itself: retrying will never help
    RETRY = "retry"  # the target is unavailable or overloaded: try again later


@dataclass(frozen=True, slots=True)
class WriteResult:
    outcome: Outcome
    reason: str = ""
    rejected: tuple[int, ...] = field(default=())  # indexes into the batch; empty with REJECTED = all


ACCEPTED = WriteResult(Outcome.ACCEPTED)


class SinkUnavailable(GatewayError):
    """The connection is gone or cannot be made; the worker backs off and reconnects."""


class Sink(Protocol):
    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def write(self, batch: Sequence[Item]) -> WriteResult: ...


@runtime_checkable
class LinkWatched(Protocol):
    """A sink whose link can be lost while nothing is being written (MQTT: its command listener, keepalives):
    `wait_lost` returns the reason when it is, so the worker reconnects instead of waiting for the next record."""

    async def wait_lost(self) -> str: ...


@runtime_checkable
class Prerenderable(Protocol):
    """A sink whose request body can be rendered elsewhere: `render` (a module-level function, so a process pool can
    run it) turns a batch into what `write_rendered` sends. A backlog of thousands of records is then decoded and
    rendered outside the gateway's interpreter, and live readings do not queue for its GIL."""

    render: Callable[[list[Record]], Any]

    async def write_rendered(self, rendered: Any) -> WriteResult: ...
