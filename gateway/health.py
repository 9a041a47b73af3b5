"""HTTP health endpoint, for docker compose's healthcheck and for monitoring: GET /health.

200 while the gateway runs, with its counters and the state of each link (a broker or database outage makes the
gateway "degraded", not unhealthy: it is doing its job by keeping readings in the outbox, and a restart would not
help). 503 while it is starting or stopping.

It must never hurt the gateway it reports on (issue 12: 1,100 idle connections under `ulimit -n 1024` used up the
process's file descriptors and a sink task died of EMFILE). So this is a small HTTP/1.1 server of its own, one
request per connection, with:
- at most MAX_CONNECTIONS connections: one more evicts the oldest that has not sent a whole request (a real client
  sends its request at once, so it wins a slot against any number of idle ones);
- HEADER_TIMEOUT_S to send the request, MAX_REQUEST_BYTES at most; then the connection is closed;
- the answer rendered from memory (the gateway's counters) and reused for CACHE_S, so a flood of requests costs the
  event loop little; an accept error (EMFILE) is asyncio's to retry, it never ends the gateway.
Bind it to 127.0.0.1 (the default, GatewaySection.health_host) unless a container's health check needs 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
HEADER_TIMEOUT_S = 2.0
MAX_REQUEST_BYTES = 8192
CACHE_S = 0.25
LISTEN_BACKLOG = 64
REPORT_EVERY_S = 60.0  # connections closed for the limits: one warning a minute at most, with the counts

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}
_REASONS |= {500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class HealthStats:
    answered: int = 0
    evicted: int = 0  # idle connections closed to make room under the cap
    timed_out: int = 0  # closed because the request did not arrive within HEADER_TIMEOUT_S
    refused: int = 0  # bad, oversized or unknown requests


def _response(code: int, body: bytes, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)


class _Connection(asyncio.Protocol):
    def __init__(self, server: HealthServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answering = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(self.server.header_timeout_s, self._timed_out)
        self.server._admit(self)

    def _timed_out(self) -> None:
        if not self.answering:
            self.server.stats.timed_out += 1
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.answering:
            return  # one request per connection; anything after it is ignored
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            end = self.buffer.find(b"\n\n")
        if end < 0:
            if len(self.buffer) > MAX_REQUEST_BYTES:
                self._finish(431, b'{"error": "request too large"}')
            return
        parts = bytes(self.buffer[: self.buffer.find(b"\n")]).split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._finish(400, b'{"error": "bad request"}')
        elif parts[0] not in (b"GET", b"HEAD"):
            self._finish(405, b'{"error": "GET /health only"}')
        elif parts[1].split(b"?", 1)[0] != b"/health":
            self._finish(404, b'{"error": "GET /health only"}')
        else:
            self.answering = True
            self.task = asyncio.get_running_loop().create_task(self._answer(head_only=parts[0] == b"HEAD"))

    async def _answer(self, head_only: bool) -> None:
        code, body = await self.server._render()
        if self.transport is not None and not self.transport.is_closing():
            self.server.stats.answered += 1
            self.transport.write(_response(code, body, head_only))
            self.transport.close()

    def _finish(self, code: int, body: bytes) -> None:
        self.answering = True
        self.server.stats.refused += 1
        if self.transport is not None:
            self.transport.write(_response(code, body))
            self.transport.close()

    def eof_received(self) -> bool:
        return self.answering  # half-closed after its request: still answer; before it: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.transport = None
        self.server._connections.pop(self, None)


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        status: Callable[[], Awaitable[dict[str, Any]]],
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.port = port
        self.status = status
        self.ready = False
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.stats = HealthStats()
        self._connections: dict[_Connection, None] = {}  # insertion order: the oldest first
        self._server: asyncio.Server | None = None
        self._cached: tuple[float, int, bytes] | None = None
        self._reported = HealthStats()
        self._last_report = 0.0

    def _admit(self, conn: _Connection) -> None:
        """Keep at most max_connections: evict the oldest connection still waiting for its request; if every one is
        being answered, this one waits its turn by being closed (the client retries)."""
        self._connections[conn] = None
        if len(self._connections) > self.max_connections:
            victim = next((c for c in self._connections if not c.answering and c is not conn), conn)
            self.stats.evicted += 1
            victim.abort()
            self._connections.pop(victim, None)
        self._report()

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_report < REPORT_EVERY_S:
            return
        evicted = self.stats.evicted - self._reported.evicted
        timed_out = self.stats.timed_out - self._reported.timed_out
        if evicted or timed_out:
            log.warning(
                "health endpoint: %d idle connection(s) closed at the cap of %d, %d after no request within %g s",
                evicted,
                self.max_connections,
                timed_out,
                self.header_timeout_s,
            )
            self._last_report = now
            self._reported = HealthStats(**vars(self.stats))

    async def _render(self) -> tuple[int, bytes]:
        if not self.ready:
            return 503, b'{"state": "starting or stopping"}'
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < CACHE_S:
            return self._cached[1], self._cached[2]
        try:
            body = json.dumps(await self.status()).encode()
        except Exception as exc:
            log.error("health endpoint: the status could not be rendered: %r", exc)
            return 500, b'{"error": "status unavailable"}'
        self._cached = (now, 200, body)
        return 200, body

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when 0 was asked for
        log.info("health endpoint on http://%s:%d/health", self.host, self.port)

    async def stop(self) -> None:
        self.ready = False
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections):
                conn.abort()
            self._connections.clear()
            await self._server.wait_closed()
            self._server = None
