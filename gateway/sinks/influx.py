"""The InfluxDB adapter: the HTTP writes to InfluxDB (aiohttp).

Two write paths, chosen in config: the v2 API (InfluxDB 2.x/3.x, token: `POST /api/v2/write`) and the 1.x `/write`
API, both plain HTTP through aiohttp. Both send the same line protocol, rendered here from the typed record
(`to_line`), without influxdb-client's Point (a fifth of the gateway's CPU at 200 devices went to it). influxdb-client
itself is not imported: its import alone was 16 MiB of the gateway's resident memory, for one POST it made.

Points are idempotent: a series (measurement + tags) and the gateway's receive time identify a point, so a replay
after a lost acknowledgement overwrites instead of duplicating. Metric fields are always floats, so a value that
happens to be whole never conflicts with the field's type.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

import aiohttp

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


class InfluxSink:
    name = "influx"

    def __init__(self, cfg: InfluxSection) -> None:
        self.cfg = cfg
        self.where = redact(cfg.url)  # for messages and logs: never the URL's user:password
        self._v2 = False  # the v2 API (token) rather than 1.x
        self._http: aiohttp.ClientSession | None = None
        self._probe: aiohttp.ClientSession | None = None
        self._answered = 0.0  # monotonic time the server last answered (a ping or a write)
        self.written = 0

    async def __aenter__(self) -> Self:
        cfg = self.cfg
        auth = None
        headers: dict[str, str] = {}
        if cfg.api == "v2":
            token = resolve_secret(cfg.token, "influx.token")
            assert token is not None
            self._v2 = True
            headers["Authorization"] = f"Token {token.get_secret_value()}"
        elif cfg.username:
            password = resolve_secret(cfg.password, "influx.password")
            auth = aiohttp.BasicAuth(cfg.username, password.get_secret_value() if password else "")
        ssl_ctx = ssl.create_default_context(cafile=str(cfg.ca_file)) if cfg.ca_file else None
        self._http = aiohttp.ClientSession(
            auth=auth,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx else None,
        )
        self._probe = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=min(cfg.timeout_s, PING_TIMEOUT_S)),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx else None,
        )
        try:
            problem = await self._ping()
        except BaseException:  # cancelled (the gateway stops) while pinging: the sessions must not outlive it
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
            async with self._probe.get(f"{self.cfg.url}/ping") as resp:
                if resp.status in (200, 204):
                    self._answered = time.monotonic()
                    return ""
                return f"InfluxDB {self.where} answered /ping with HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return redact(f"InfluxDB {self.where} unreachable: {exc!r}")

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
        if self._probe is not None:
            await self._probe.close()
            self._probe = None
        if self._http is not None:
            await self._http.close()
            self._http = None

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
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
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
        async with self._http.post(f"{self.cfg.url}/write", params=params, data=body.encode()) as resp:
            if resp.status == 204:
                return ACCEPTED
            return _classify(resp.status, await resp.text())

    async def _write_v2(self, body: str) -> WriteResult:
        """`POST /api/v2/write` (InfluxDB 2.x and 3.x): org, bucket and precision in the query, the token in the
        session's Authorization header; 204 is success, a JSON error body otherwise."""
        assert self._http is not None
        params = {"org": self.cfg.org or "", "bucket": self.cfg.bucket or "", "precision": "ns"}
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        url = f"{self.cfg.url}/api/v2/write"
        try:
            async with self._http.post(url, params=params, data=body.encode(), headers=headers) as resp:
                if resp.status == 204:
                    return ACCEPTED
                return _classify(resp.status, await resp.text())
        except TimeoutError as exc:
            raise SinkUnavailable(f"InfluxDB {self.where} timed out") from exc
