"""The InfluxDB adapter: the HTTP writes to InfluxDB (the standard library's http.client, in threads).

Two write paths, chosen in config: the v2 API (InfluxDB 2.x/3.x, token: `POST /api/v2/write`) and the 1.x `/write`
API, both plain HTTP(S) through `HttpClient` below. Both send the same line protocol, rendered here from the typed
record (`to_line`), without influxdb-client's Point (a fifth of the gateway's CPU at 200 devices went to it).
influxdb-client itself is not imported: its import alone was 16 MiB of the gateway's resident memory, for one POST it
made; nor is aiohttp, about 10 MiB (its modules, and two SSL contexts with the system CA store built at its import)
for a few requests a second that http.client makes as well from a thread off the event loop.

Points are idempotent: a series (measurement + tags) and the gateway's receive time identify a point, so a replay
after a lost acknowledgement overwrites instead of duplicating. Metric fields are always floats, so a value that
happens to be whole never conflicts with the field's type.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.client
import logging
import math
import select
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

from gateway.config import InfluxSection, redact, resolve_secret
from gateway.envelope import (
    AlarmMessage,
    GatewayStatusRecord,
    ReadingMessage,
    Record,
    RoomModeMessage,
    SessionMessage,
    StatusMessage,
    parse_iso_ns,
)
from gateway.sinks import ACCEPTED, Outcome, SinkUnavailable, WriteResult

if TYPE_CHECKING:
    from gateway.outbox import Item

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 2.0
WATCH_S = 1.0  # how often an idle link is checked


# Line protocol escaping (docs.influxdata.com, "Line protocol": special characters), as influxdb-client's Point
# wrote it until it was replaced here (tests/gateway/test_influx_sink.py checks the two agree byte for byte):
# measurement, tag keys, tag values and field keys escape commas, equals signs (not measurements) and spaces, and
# write \n, \t and \r as escapes; a tag value ending in a backslash gets a space so it cannot escape the separator;
# string field values escape double quotes and backslashes.
_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})


def _string(value: str) -> str:
    return f'"{value.translate(_STRING)}"'


def _float(fields: dict[str, str], name: str, value: float) -> None:
    """A float field without a type suffix (whole numbers without ".0"); a value that is not finite is left out,
    as line protocol has no way to write it."""
    value = float(value)
    if math.isfinite(value):
        text = repr(value)
        fields[name] = text[:-2] if text.endswith(".0") else text


def _bool(value: bool) -> str:
    return "true" if value else "false"


@functools.lru_cache(maxsize=4096)  # a series per device and measurement (and alarm rule): the same few each time
def _series(measurement: str, tags: tuple[tuple[str, str], ...]) -> str:
    """Measurement and tags, tags sorted by key (InfluxDB's canonical order); empty ones left out."""
    parts = [measurement.translate(_MEASUREMENT)]
    for key, value in sorted(tags):
        tag = value.translate(_KEY)
        if tag.endswith("\\"):
            tag += " "
        if key and tag:
            parts.append(f"{_key(key)}={tag}")
    return ",".join(parts)


@functools.lru_cache(maxsize=1024)  # field names: metric names and the fixed ones
def _key(name: str) -> str:
    return name.translate(_KEY)


def to_line(record: Record) -> str | None:
    """The InfluxDB line of a record (docs/influx.md), rendered from its typed fields. None for record types that
    are not stored (waveforms). Fields are sorted by key; a later field of the same name wins (a metric named like
    a fixed field is overwritten by it, and the write fails on the type if they differ, as it did with Point)."""
    fields: dict[str, str] = {}
    tags = {"site": record.site, "room": record.room, "device": record.device, "model": record.model}
    if isinstance(record, ReadingMessage):
        measurement = "vitals"
        for name, value in record.metrics.items():
            _float(fields, name, value)
        fields["flags"] = _string(",".join(record.flags))
        fields["valid"] = _bool(record.valid)
        if record.device_time:
            fields["device_time"] = _string(record.device_time)
    elif isinstance(record, StatusMessage):
        measurement = "device_status"
        fields["state"] = _string(record.state)
        fields["conditions"] = _string(",".join(record.conditions))
        fields["detail"] = _string(record.detail)
        if record.code is not None:
            fields["code"] = f"{int(record.code)}i"
    elif isinstance(record, AlarmMessage):
        measurement = "alarms"
        tags["rule"], tags["alarm_kind"] = record.rule, record.alarm_kind
        for name, text in (
            ("alarm_id", record.alarm_id),
            ("priority", record.priority),
            ("transition", record.transition),
            ("message", record.message),
            ("profile", record.profile),
        ):
            fields[name] = _string(text)
        fields["active"] = _bool(record.active)
        fields["indeterminate"] = _bool(record.indeterminate)
        fields["quality"] = _string(",".join(record.quality))
        fields["role"] = _string(record.role or "")
        for name, number in (("value", record.value), ("limit", record.limit)):
            if number is not None:
                _float(fields, name, number)
        if record.metric:
            fields["metric"] = _string(record.metric)
    elif isinstance(record, GatewayStatusRecord):
        measurement = "gateway"
        fields["state"] = _string(record.state)
        counters = record.counters
        for name in counters.__struct_fields__:
            fields[name] = f"{int(getattr(counters, name))}i"
        down = sorted(k for k, v in record.links.items() if v not in ("up", "ok", "connected"))
        fields["links_down"] = _string(",".join(down))
    elif isinstance(record, SessionMessage):
        measurement = "sessions"
        fields["transition"] = _string(record.transition)
        fields["session_id"] = _string(record.session_id)
        for name, value in record.baseline.items():
            _float(fields, f"baseline_{name}", value)
    elif isinstance(record, RoomModeMessage):
        measurement = "room_mode"
        fields["mode"] = _string(record.mode)
        fields["standby"] = _bool(record.mode == "standby")
        fields["until"] = _string(record.until or "")
        fields["reason"] = _string(record.reason)
    else:
        return None
    fields["seq"] = f"{int(record.seq)}i"
    rendered = ",".join([f"{_key(name)}={value}" for name, value in sorted(fields.items())])
    return f"{_series(measurement, tuple(tags.items()))} {rendered} {parse_iso_ns(record.time)}"


def to_lines(batch: Sequence[Record]) -> list[str]:
    return [line for line in map(to_line, batch) if line is not None]


def render_body(batch: list[Record]) -> tuple[int, str]:
    """(points, request body) of a batch: module-level, so a process pool can run it for a backlog."""
    lines = to_lines(batch)
    return len(lines), "\n".join(lines)


def _classify(status: int, body: str) -> WriteResult:
    """4xx means the data or the request is wrong (retrying cannot help); 5xx and 429 mean try later."""
    if status < 400 or status == 429 or status >= 500:
        raise SinkUnavailable(f"InfluxDB answered {status}: {body[:200]}")
    if status in (401, 403):
        # Credentials are configuration, not data: keep the data and retry, loudly.
        raise SinkUnavailable(f"InfluxDB refused the credentials ({status}): check influx.token / password")
    if status == 404:
        raise SinkUnavailable(f"InfluxDB has no such database or bucket ({status}): {body[:200]}")
    return WriteResult(Outcome.REJECTED, f"InfluxDB answered {status}: {body[:500]}")


MAX_BODY = 1 << 20  # an answer's body read whole up to this (InfluxDB's are a line of JSON); longer: not kept alive
MAX_IDLE = 4  # kept-alive connections per client: the live and the backlog writes may overlap


class ConnectError(OSError):
    """The connection (TCP, or its TLS handshake) could not be made: the server was never reached. `os_error` is
    why (refused, no route, no such host, a certificate not trusted); a timeout stays a TimeoutError."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause) or type(cause).__name__)
        self.os_error = cause


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def text(self) -> str:
        try:
            return self.body.decode(self.headers.get_content_charset() or "utf-8", "replace")
        except LookupError:  # a charset Python does not know
            return self.body.decode("utf-8", "replace")


class _Call:
    """One request in a worker thread. Abandoned (cancelled, timed out, the client closed): its socket is shut down,
    which ends a blocked read or write in the thread, it sends nothing more, and it is closed, never reused."""

    __slots__ = ("abandoned", "conn", "future")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.abandoned = False
        self.future: Future[Answer] | None = None

    def abandon(self) -> None:
        self.abandoned = True
        sock = self.conn.sock
        if sock is not None:
            # The plain socket's shutdown, even for TLS: the thread reading it holds the TLS state.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if self.future is None:
            self.conn.close()
        else:  # closed by (or once) the thread that is using it has let go of it
            self.future.add_done_callback(lambda _: self.conn.close())


def _alive(conn: http.client.HTTPConnection) -> bool:
    """An idle kept-alive connection is usable if nothing can be read from it: readable means the server closed it
    (or sent what no request asked for)."""
    if conn.sock is None:
        return False
    poll = select.poll()
    poll.register(conn.sock, select.POLLIN)
    return not poll.poll(0)


class HttpClient:
    """HTTP(S) requests to one server (InfluxDB), made by http.client in worker threads so the event loop never
    blocks on the network. Connections are kept alive for the next request (up to MAX_IDLE idle ones) and dropped on
    any error, timeout or cancellation. Every request is bounded by its timeout twice: the socket's (each connect,
    send and read) and the whole request's, after which the call is abandoned (see _Call).

    `url` is the base (scheme://[user:password@]host[:port][/path]); requests append their path to it. Basic auth
    comes from the URL's userinfo, else from `basic`; an Authorization in `headers` (a v2 token) goes instead. TLS
    (https only) verifies the server against `ca_file`, or the system's CA store without one."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        basic: tuple[str, str] | None = None,
        ca_file: Path | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the InfluxDB URL must be http(s)://host[:port][/path]")
        self._host, self._port, self._path = parts.hostname, parts.port, parts.path  # port: ValueError if invalid
        self._ssl = (
            ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if parts.scheme == "https" else None
        )
        self.timeout_s = timeout_s
        self._headers = {"User-Agent": "infusion-gateway", "Accept": "*/*", **(headers or {})}
        if parts.username is not None or parts.password is not None:
            basic = (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))
        if basic is not None and not any(k.lower() == "authorization" for k in self._headers):
            pair = f"{basic[0]}:{basic[1]}"
            try:
                raw = pair.encode("latin-1")  # as aiohttp (and most clients) encoded it
            except UnicodeEncodeError:
                raw = pair.encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="influx-http")
        self._idle: list[http.client.HTTPConnection] = []
        self._busy: set[_Call] = set()
        self._closed = False

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection that is still open (True), else a new one (False), not connected yet."""
        while self._idle:
            conn = self._idle.pop()
            if _alive(conn):
                return conn, True
            conn.close()
        if self._ssl is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=self._ssl), False
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s), False

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Answer:
        """The server's answer (any status). Raises ConnectError (not reached), TimeoutError, OSError or
        http.client.HTTPException (the connection failed or the answer was not HTTP)."""
        if self._closed:
            raise ConnectionAbortedError("the HTTP client is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        target = self._path + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        conn, reused = self._connection()
        call = _Call(conn)
        self._busy.add(call)
        sent = {**self._headers, **(headers or {})}
        try:
            call.future = self._executor.submit(self._exchange, call, reused, method, target, body, sent, timeout)
            async with asyncio.timeout(timeout):
                answer = await asyncio.wrap_future(call.future)
        except BaseException:  # cancelled, timed out or failed: this connection is not used again
            call.abandon()
            raise
        finally:
            self._busy.discard(call)
        if conn.sock is not None and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    @staticmethod
    def _exchange(
        call: _Call, reused: bool, method: str, target: str, body: bytes | None, headers: dict[str, str], timeout: float
    ) -> Answer:
        """In a worker thread: one request and its whole answer. A kept-alive connection the server closed just as
        it was reused is retried once on a new one (a write is idempotent: the same points overwrite themselves)."""
        conn = call.conn
        try:
            conn.timeout = timeout
            while True:
                if conn.sock is None:
                    try:
                        conn.connect()
                    except TimeoutError:
                        raise
                    except OSError as exc:
                        raise ConnectError(exc) from exc
                else:
                    conn.sock.settimeout(timeout)
                if call.abandoned:
                    raise ConnectionAbortedError("request abandoned")
                try:
                    conn.request(method, target, body=body, headers=headers)
                    resp = conn.getresponse()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    if not reused or call.abandoned:
                        raise
                    conn.close()
                    reused = False
                    continue
                data = resp.read(MAX_BODY)
                if not resp.isclosed():  # more than we keep: the rest is never read, so the connection cannot go on
                    conn.close()
                return Answer(resp.status, resp.headers, data)
        except BaseException:  # re-raised: the connection is in an unknown state and is never used again
            conn.close()
            raise

    def close(self) -> None:
        """Closes the idle connections and abandons any request still under way."""
        self._closed = True
        for call in list(self._busy):
            call.abandon()
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        if self._own_executor:
            self._executor.shutdown(wait=False)


class InfluxSink:
    name = "influx"

    def __init__(self, cfg: InfluxSection) -> None:
        self.cfg = cfg
        self.where = redact(cfg.url)  # for messages and logs: never the URL's user:password
        self._v2 = False  # the v2 API (token) rather than 1.x
        self._http: HttpClient | None = None  # writes
        self._probe: HttpClient | None = None  # pings: a connection of its own, with a shorter timeout
        self._threads: ThreadPoolExecutor | None = None
        self._answered = 0.0  # monotonic time the server last answered (a ping or a write)
        self.written = 0

    async def __aenter__(self) -> Self:
        cfg = self.cfg
        basic = None
        headers: dict[str, str] = {}
        if cfg.api == "v2":
            token = resolve_secret(cfg.token, "influx.token")
            assert token is not None
            self._v2 = True
            headers["Authorization"] = f"Token {token.get_secret_value()}"
        elif cfg.username:
            password = resolve_secret(cfg.password, "influx.password")
            basic = (cfg.username, password.get_secret_value() if password else "")
        # Live and backlog writes may overlap, and a ping with them: a thread each, started as they are needed.
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="influx-http")
        self._http = HttpClient(
            cfg.url, timeout_s=cfg.timeout_s, headers=headers, basic=basic, ca_file=cfg.ca_file, executor=self._threads
        )
        self._probe = HttpClient(
            cfg.url, timeout_s=min(cfg.timeout_s, PING_TIMEOUT_S), ca_file=cfg.ca_file, executor=self._threads
        )
        try:
            problem = await self._ping()
        except BaseException:  # cancelled (the gateway stops) while pinging: the connections must not outlive it
            await self.__aexit__(None, None, None)
            raise
        if problem:  # up means the server answered, not that a client object exists: the backoff grows meanwhile
            await self.__aexit__(None, None, None)
            raise SinkUnavailable(problem)
        return self

    async def _ping(self) -> str:
        """ "" when the server answers GET /ping (InfluxDB 1.x and 2.x, no credentials needed), else why not."""
        assert self._probe is not None
        try:
            answer = await self._probe.request("GET", "/ping")
        except (http.client.HTTPException, TimeoutError, OSError) as exc:
            return redact(f"InfluxDB {self.where} unreachable: {exc!r}")
        if answer.status in (200, 204):
            self._answered = time.monotonic()
            return ""
        return f"InfluxDB {self.where} answered /ping with HTTP {answer.status}"

    async def wait_lost(self) -> str:
        """Returns (why) when the server stops answering, also while nothing is written: pinged once a second when
        no write has had an answer for that long, so /health and the backlog renderer know within about 2 s."""
        while True:
            await asyncio.sleep(WATCH_S)
            if time.monotonic() - self._answered < WATCH_S:
                continue
            problem = await self._ping()
            if problem:
                return problem

    async def __aexit__(self, *exc: object) -> None:
        for client in (self._probe, self._http):
            if client is not None:
                client.close()
        self._probe = self._http = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)  # a thread still in an abandoned request ends with its socket
            self._threads = None

    # A backlog's batches are rendered by this in a worker process (the sink worker's RenderedBacklog), then sent whole.
    render = staticmethod(render_body)

    async def write(self, batch: Sequence[Item]) -> WriteResult:
        records = [it.decoded() for it in batch]
        # Thousands of points take a while to render: off the event loop, so live data keeps flowing.
        points, body = render_body(records) if len(records) < 200 else await asyncio.to_thread(render_body, records)
        return await self.write_rendered((points, body))

    async def write_rendered(self, rendered: tuple[int, str]) -> WriteResult:
        points, body = rendered
        if not points:
            return ACCEPTED
        try:
            result = await (self._write_v2(body) if self._v2 else self._write_v1(body))
        except (http.client.HTTPException, TimeoutError, OSError) as exc:
            raise SinkUnavailable(redact(f"InfluxDB {self.where} unreachable: {exc!r}")) from exc
        self._answered = time.monotonic()
        if result.outcome is Outcome.ACCEPTED:
            self.written += points
        return result

    async def _write_v1(self, body: str) -> WriteResult:
        assert self._http is not None
        params = {"db": self.cfg.database or "", "precision": "ns"}
        if self.cfg.retention_policy:
            params["rp"] = self.cfg.retention_policy
        headers = {"Content-Type": "application/octet-stream"}
        answer = await self._http.request("POST", "/write", query=params, body=body.encode(), headers=headers)
        if answer.status == 204:
            return ACCEPTED
        return _classify(answer.status, answer.text())

    async def _write_v2(self, body: str) -> WriteResult:
        """`POST /api/v2/write` (InfluxDB 2.x and 3.x): org, bucket and precision in the query, the token in the
        client's Authorization header; 204 is success, a JSON error body otherwise."""
        assert self._http is not None
        params = {"org": self.cfg.org or "", "bucket": self.cfg.bucket or "", "precision": "ns"}
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        try:
            answer = await self._http.request(
                "POST", "/api/v2/write", query=params, body=body.encode(), headers=headers
            )
        except TimeoutError as exc:
            raise SinkUnavailable(f"InfluxDB {self.where} timed out") from exc
        if answer.status == 204:
            return ACCEPTED
        return _classify(answer.status, answer.text())
