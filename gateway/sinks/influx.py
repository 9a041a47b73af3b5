"""The InfluxDB adapter: the only module that imports influxdb_client (and aiohttp, which it brings).

Two write paths, chosen in config: the v2 API (InfluxDB 2.x/3.x, token; through influxdb-client's async client)
and the 1.x `/write` API (plain HTTP). Both send the same line protocol, built by influxdb-client's Point.

Points are idempotent: a series (measurement + tags) and the gateway's receive time identify a point, so a replay
after a lost acknowledgement overwrites instead of duplicating. Metric fields are always floats, so a value that
happens to be whole never conflicts with the field's type.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Self

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from gateway.config import InfluxSection, redact, resolve_secret
from gateway.envelope import parse_iso_ns
from gateway.sinks import ACCEPTED, Outcome, SinkUnavailable, WriteResult

log = logging.getLogger(__name__)

TAGS = ("site", "room", "device", "model")
PING_TIMEOUT_S = 2.0
WATCH_S = 1.0  # how often an idle link is checked


def to_point(record: dict[str, Any]) -> Point | None:
    """The InfluxDB point of a record (docs/influx.md). None for record types that are not stored."""
    kind = record["type"]
    if kind == "reading":
        point = Point("vitals")
        for name, value in record["metrics"].items():
            point.field(name, float(value))
        point.field("flags", ",".join(record["flags"]))
        point.field("valid", bool(record["valid"]))
        if record.get("device_time"):
            point.field("device_time", record["device_time"])
    elif kind == "status":
        point = Point("device_status")
        point.field("state", record["state"])
        point.field("conditions", ",".join(record["conditions"]))
        point.field("detail", record["detail"])
        if record.get("code") is not None:
            point.field("code", int(record["code"]))
    elif kind == "alarm":
        point = Point("alarms")
        point.tag("rule", record["rule"])
        point.tag("alarm_kind", record["alarm_kind"])
        for name in ("alarm_id", "priority", "transition", "message", "profile"):
            point.field(name, record[name])
        point.field("active", bool(record["active"]))
        point.field("indeterminate", bool(record.get("indeterminate", False)))
        point.field("quality", ",".join(record.get("quality", [])))
        point.field("role", record["role"] or "")
        for name in ("value", "limit"):
            if record.get(name) is not None:
                point.field(name, float(record[name]))
        if record.get("metric"):
            point.field("metric", record["metric"])
    elif kind == "gateway_status":
        point = Point("gateway")
        point.field("state", record["state"])
        for name, value in record["counters"].items():
            point.field(name, int(value))
        down = sorted(k for k, v in record["links"].items() if v not in ("up", "ok", "connected"))
        point.field("links_down", ",".join(down))
    elif kind == "session":
        point = Point("sessions")
        point.field("transition", record["transition"])
        point.field("session_id", record["session_id"])
        for name, value in record["baseline"].items():
            point.field(f"baseline_{name}", float(value))
    elif kind == "room_mode":
        point = Point("room_mode")
        point.field("mode", record["mode"])
        point.field("standby", record["mode"] == "standby")
        point.field("until", record["until"] or "")
        point.field("reason", record["reason"])
    else:
        return None
    for tag in TAGS:
        point.tag(tag, record[tag])
    point.field("seq", int(record["seq"]))
    point.time(parse_iso_ns(record["time"]), WritePrecision.NS)
    return point


def to_lines(batch: list[dict[str, Any]]) -> list[str]:
    return [p.to_line_protocol() for p in map(to_point, batch) if p is not None]


def render_body(batch: list[dict[str, Any]]) -> tuple[int, str]:
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
        self._v2: InfluxDBClientAsync | None = None
        self._http: aiohttp.ClientSession | None = None
        self._probe: aiohttp.ClientSession | None = None
        self._answered = 0.0  # monotonic time the server last answered (a ping or a write)
        self.written = 0

    async def __aenter__(self) -> Self:
        cfg = self.cfg
        if cfg.api == "v2":
            token = resolve_secret(cfg.token, "influx.token")
            assert token is not None
            self._v2 = InfluxDBClientAsync(
                url=cfg.url,
                token=token.get_secret_value(),
                org=cfg.org or "",
                timeout=int(cfg.timeout_s * 1000),
                ssl_ca_cert=str(cfg.ca_file) if cfg.ca_file else None,
            )
        else:
            auth = None
            if cfg.username:
                password = resolve_secret(cfg.password, "influx.password")
                auth = aiohttp.BasicAuth(cfg.username, password.get_secret_value() if password else "")
            ssl_ctx = ssl.create_default_context(cafile=str(cfg.ca_file)) if cfg.ca_file else None
            self._http = aiohttp.ClientSession(
                auth=auth,
                timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
                connector=aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx else None,
            )
        ssl_ctx = ssl.create_default_context(cafile=str(cfg.ca_file)) if cfg.ca_file else None
        self._probe = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=min(cfg.timeout_s, PING_TIMEOUT_S)),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx else None,
        )
        problem = await self._ping()
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
        if self._v2 is not None:
            await self._v2.close()
            self._v2 = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    # A backlog's batches are rendered by this in a worker process (SinkWorker, offload=True), then sent whole.
    render = staticmethod(render_body)

    async def write(self, batch: list[dict[str, Any]]) -> WriteResult:
        # Thousands of points take a while to render: off the event loop, so live data keeps flowing.
        points, body = render_body(batch) if len(batch) < 200 else await asyncio.to_thread(render_body, batch)
        return await self.write_rendered((points, body))

    async def write_rendered(self, rendered: tuple[int, str]) -> WriteResult:
        points, body = rendered
        if not points:
            return ACCEPTED
        try:
            result = await (self._write_v2(body) if self._v2 is not None else self._write_v1(body))
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
        assert self._v2 is not None
        try:
            await self._v2.write_api().write(bucket=self.cfg.bucket or "", org=self.cfg.org or "", record=body)
        except ApiException as exc:
            return _classify(int(exc.status or 0), str(exc.body or exc.reason))
        except TimeoutError as exc:
            raise SinkUnavailable(f"InfluxDB {self.where} timed out") from exc
        return ACCEPTED
