"""The InfluxDB sink: the 1.x path against the real influxd, the v2 path against a stand-in.

The stand-in: no InfluxDB 2.x/3.x server can run on this machine (Debian ships 1.6.7, which has no /api/v2/write),
so the v2 tests run an aiohttp server that records the HTTP request influxdb-client makes and answers as the v2
API documents (204, 400 with a JSON error, 503). It checks what we send, not how a real 2.x server stores it.

The lines are rendered from the typed records without influxdb-client's Point; `_point` below is the Point-based
rendering they replaced, kept as the oracle: every kind of record, and hostile strings in every tag and field, must
come out byte for byte as Point wrote them (the dashboards' queries depend on the field and tag set).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from influxdb_client.client.write import point as influx_point
from influxdb_client.domain.write_precision import WritePrecision
from msgspec.structs import asdict

from devices.base import DeviceState, DeviceStatus, Reading, Waveform
from devices.registry import get_model
from gateway.alarms import AlarmEvent, RoomModeEvent, SessionEvent
from gateway.config import InfluxSection, SecretRef
from gateway.envelope import (
    GatewayCounters,
    GatewayStatusMessage,
    Origin,
    Record,
    alarm_record,
    gateway_origin,
    gateway_status_record,
    origin_for,
    parse_iso_ns,
    reading_record,
    record_type,
    room_mode_record,
    room_origin,
    session_record,
    status_record,
    waveform_record,
)
from gateway.sinks import Outcome, SinkUnavailable
from gateway.sinks.influx import InfluxSink, to_lines
from tests.helpers import as_items

ORIGIN = origin_for("clinic-a", "3", "oximeter", get_model("masimo-ascii1").spec)


def _records(n: int, start: float) -> list[Record]:
    out: list[Record] = [status_record(ORIGIN, 1, start, DeviceStatus(DeviceState.OK, code=0x800))]
    for i in range(n):
        reading = Reading({"spo2": 90 + i % 10, "pulse_rate": 70 + i, "perfusion_index": 3.25}, ("low_perfusion",))
        out.append(reading_record(ORIGIN, i + 2, start + 1 + i, reading))
    return out


Point: Any = influx_point.Point  # influxdb-client is untyped


def _point(record: Record) -> Any:
    """The record as the InfluxDB sink wrote it with influxdb-client's Point (the oracle: see the module docstring)."""
    r = asdict(record)
    kind = record_type(record)
    if kind == "reading":
        point = Point("vitals")
        for name, value in r["metrics"].items():
            point.field(name, float(value))
        point.field("flags", ",".join(r["flags"]))
        point.field("valid", bool(r["valid"]))
        if r.get("device_time"):
            point.field("device_time", r["device_time"])
    elif kind == "status":
        point = Point("device_status")
        point.field("state", r["state"])
        point.field("conditions", ",".join(r["conditions"]))
        point.field("detail", r["detail"])
        if r.get("code") is not None:
            point.field("code", int(r["code"]))
    elif kind == "alarm":
        point = Point("alarms")
        point.tag("rule", r["rule"])
        point.tag("alarm_kind", r["alarm_kind"])
        for name in ("alarm_id", "priority", "transition", "message", "profile"):
            point.field(name, r[name])
        point.field("active", bool(r["active"]))
        point.field("indeterminate", bool(r.get("indeterminate", False)))
        point.field("quality", ",".join(r.get("quality", [])))
        point.field("role", r["role"] or "")
        for name in ("value", "limit"):
            if r.get(name) is not None:
                point.field(name, float(r[name]))
        if r.get("metric"):
            point.field("metric", r["metric"])
    elif kind == "gateway_status":
        point = Point("gateway")
        point.field("state", r["state"])
        for name, value in asdict(r["counters"]).items():
            point.field(name, int(value))
        down = sorted(k for k, v in r["links"].items() if v not in ("up", "ok", "connected"))
        point.field("links_down", ",".join(down))
    elif kind == "session":
        point = Point("sessions")
        point.field("transition", r["transition"])
        point.field("session_id", r["session_id"])
        for name, value in r["baseline"].items():
            point.field(f"baseline_{name}", float(value))
    elif kind == "room_mode":
        point = Point("room_mode")
        point.field("mode", r["mode"])
        point.field("standby", r["mode"] == "standby")
        point.field("until", r["until"] or "")
        point.field("reason", r["reason"])
    else:
        return None
    for tag in ("site", "room", "device", "model"):
        point.tag(tag, r[tag])
    point.field("seq", int(r["seq"]))
    point.time(parse_iso_ns(r["time"]), WritePrecision.NS)
    return point


def _by_point(records: Sequence[Record]) -> list[str]:
    return [p.to_line_protocol() for p in map(_point, records) if p is not None]


def _every_kind(origin: Origin, text: str = "", number: float = 85.0) -> list[Record]:
    """One record of every kind (a waveform too: it is not stored), with `text` in every free string."""
    t = 1_700_000_000.25
    room, gateway = room_origin(origin["site"], origin["room"]), gateway_origin(origin["site"], "gw-1")
    alarm = AlarmEvent(
        alarm_id=f"{origin['room']}/{origin['device']}/spo2-low", room=origin["room"], device=origin["device"],
        rule="spo2-low" + text, kind="physiological", priority="high", transition="raised", active=True, time=t,
        metric="spo2", value=number, limit=90, message="SpO2 low" + text, role="nurse" + text, quality=("a", text),
        since=t - 5,
    )  # fmt: skip
    status = GatewayStatusMessage(
        site=origin["site"], gateway="gw-1", state="degraded", time="2026-01-01T00:00:00.000000Z",
        counters=GatewayCounters(received=7, backlog_influx=3), links={"mqtt": "up", "influx": "down", "a" + text: "x"},
    )  # fmt: skip
    return [
        reading_record(origin, 1, t, Reading({"spo2": number, "pulse_rate": 72}, ("probe_off", text), "10:00" + text)),
        status_record(origin, 2, t, DeviceStatus(DeviceState.NO_DATA, (text,), code=3, detail="silent" + text)),
        status_record(origin, 3, t, DeviceStatus(DeviceState.OK)),
        waveform_record(origin, 4, t, Waveform("pleth", (1, 2, 3), 75.0)),
        alarm_record(origin, 5, alarm, "profile" + text, True),
        alarm_record(
            origin,
            6,
            dataclasses.replace(alarm, transition="cleared", active=False, value=None, metric=None),
            "p",
            False,
        ),
        gateway_status_record(gateway, 1, t, status),
        session_record(room, 1, SessionEvent(origin["room"], "baseline", t, "s-1" + text, t - 60, {"bp_sys": number})),
        room_mode_record(room, 2, RoomModeEvent(origin["room"], "standby", t, t + 3600, "nurse", text)),
        room_mode_record(room, 3, RoomModeEvent(origin["room"], "monitoring", t, reason="session started")),
    ]


def test_lines_are_what_point_wrote_for_every_kind_of_record() -> None:
    records = _every_kind(ORIGIN)
    lines = to_lines(records)
    assert lines == _by_point(records)
    assert len(lines) == len(records) - 1  # the waveform is not stored
    assert lines[0] == (
        "vitals,device=oximeter,model=masimo-ascii1,room=3,site=clinic-a "
        'device_time="10:00",flags="probe_off,",pulse_rate=72,seq=1i,spo2=85,valid=false 1700000000250000000'
    )


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
_NAME = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    site=_NAME, room=_NAME, device=_NAME, model=_NAME, text=_TEXT,
    number=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**53), 2**53).map(float),
)  # fmt: skip
def test_escaping_and_numbers_match_point_for_any_text(
    site: str, room: str, device: str, model: str, text: str, number: float
) -> None:
    """Commas, spaces, equals signs, quotes, backslashes, newlines in any tag, key or string field; whole, huge,
    tiny and non-finite numbers (left out, as Point left them out)."""
    origin: Origin = {"site": site, "room": room, "device": device, "model": model, "kind": "pulse_oximeter"}
    records = _every_kind(origin, text, number)
    assert to_lines(records) == _by_point(records)
    if not math.isfinite(number):
        assert all("spo2=" not in line for line in to_lines(records))


async def test_v1_write_lands_in_real_influxd_and_replay_does_not_duplicate(influxd: Any, influx_db: str) -> None:
    cfg = InfluxSection(api="v1", url=influxd.url, database=influx_db)
    records = _records(20, time.time() - 60)
    async with InfluxSink(cfg) as sink:
        assert (await sink.write(as_items(records))).outcome is Outcome.ACCEPTED
        assert (
            await sink.write(as_items(records))
        ).outcome is Outcome.ACCEPTED  # a replay after a lost acknowledgement
    rows = influxd.query(influx_db, "SELECT spo2, pulse_rate, perfusion_index, flags, valid, seq FROM vitals")
    values = rows[0]["values"]
    assert len(values) == 20
    assert values[0][1:] == [90, 70, 3.25, "low_perfusion", False, 2]
    status = influxd.query(influx_db, "SELECT state, code FROM device_status")
    assert status[0]["values"][0][1:] == ["ok", 0x800]


async def test_v1_unknown_database_is_retried_not_dropped(influxd: Any) -> None:
    cfg = InfluxSection(api="v1", url=influxd.url, database="does_not_exist")
    async with InfluxSink(cfg) as sink:
        with pytest.raises(SinkUnavailable, match="no such database"):
            await sink.write(as_items(_records(1, time.time())))


async def test_v1_unreachable_server_is_unavailable() -> None:
    cfg = InfluxSection(api="v1", url="http://127.0.0.1:9", database="x", timeout_s=2)
    with pytest.raises(SinkUnavailable, match="unreachable"):  # up only once the server has answered
        async with InfluxSink(cfg):
            pass


class StandInV2:
    """Records requests to /api/v2/write and answers with a status chosen by the test (see module docstring)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, str], str]] = []
        self.status = 204

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.requests.append((dict(request.query), dict(request.headers), body))
        if self.status == 400:
            return web.json_response({"code": "invalid", "message": "partial write: field type conflict"}, status=400)
        return web.Response(status=self.status)


async def _pong(request: web.Request) -> web.Response:
    return web.Response(status=204)  # as InfluxDB 2.x answers /ping


async def _serve(server: StandInV2, write_path: str, port: int, context: ssl.SSLContext | None = None) -> web.AppRunner:
    """The stand-in on 127.0.0.1:port: `write_path` and /ping; the caller cleans the runner up."""
    app = web.Application()
    app.router.add_post(write_path, server.handle)
    app.router.add_get("/ping", _pong)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner


@pytest.fixture
async def stand_in(unused_tcp_port: int) -> AsyncIterator[tuple[StandInV2, str]]:
    server = StandInV2()
    runner = await _serve(server, "/api/v2/write", unused_tcp_port)
    yield server, f"http://127.0.0.1:{unused_tcp_port}"
    await runner.cleanup()


async def test_v2_write_sends_token_org_bucket_and_line_protocol(
    stand_in: tuple[StandInV2, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = stand_in
    monkeypatch.setenv("TEST_INFLUX_TOKEN", "tok-123")
    cfg = InfluxSection(api="v2", url=url, org="clinic", bucket="infusion", token=SecretRef(env="TEST_INFLUX_TOKEN"))
    records = _records(3, 1_700_000_000.0)
    async with InfluxSink(cfg) as sink:
        assert (await sink.write(as_items(records))).outcome is Outcome.ACCEPTED
    query, headers, body = server.requests[0]
    assert query["org"] == "clinic" and query["bucket"] == "infusion" and query["precision"] == "ns"
    assert headers["Authorization"] == "Token tok-123"
    assert body.splitlines() == to_lines(records)
    assert body.splitlines()[1].startswith("vitals,device=oximeter,model=masimo-ascii1,room=3,site=clinic-a ")
    assert body.splitlines()[1].endswith(" 1700000001000000000")


async def test_v2_answers_map_to_rejected_and_retry(
    stand_in: tuple[StandInV2, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = stand_in
    monkeypatch.setenv("TEST_INFLUX_TOKEN", "tok")
    cfg = InfluxSection(api="v2", url=url, org="o", bucket="b", token=SecretRef(env="TEST_INFLUX_TOKEN"))
    async with InfluxSink(cfg) as sink:
        server.status = 400
        result = await sink.write(as_items(_records(1, time.time())))
        assert result.outcome is Outcome.REJECTED and "field type conflict" in result.reason
        server.status = 503
        with pytest.raises(SinkUnavailable):
            await sink.write(as_items(_records(1, time.time())))


async def test_a_connect_cancelled_during_its_ping_closes_its_http_sessions() -> None:
    """A gateway stopping while the sink pings a server that accepts and never answers: the sink's HTTP sessions are
    closed on the way out, not left for the garbage collector ("Unclosed client session")."""
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # never answers; returns when the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = InfluxSink(InfluxSection(api="v1", url=f"http://127.0.0.1:{port}", database="x", timeout_s=30))
    try:
        entering = asyncio.create_task(sink.__aenter__())
        async with asyncio.timeout(10):
            await accepted.wait()  # the ping is under way
        entering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await entering
        assert sink._http is None and sink._probe is None, "the sessions of a cancelled connect are still open"
    finally:
        server.close()
        await server.wait_closed()


class RawHttp:
    """A STAND-IN HTTP/1.1 server written by hand (aiohttp's would hide its connections): it numbers each TCP
    connection, records every request as (connection, method, target, headers, body), answers `status` with keep-alive
    (or holds the request unanswered while `hold` is set, or closes the connection after each answer with
    `close_after`), and records which connections the client closed."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, str, str, dict[str, str], bytes]] = []
        self.closed_by_client: list[int] = []
        self.status = 204
        self.body = b""
        self.hold = False
        self.close_after = False
        self.got = asyncio.Event()  # set at each request
        self._closed = asyncio.Event()  # set as the client closes a connection
        self.url = ""
        self._connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def __aenter__(self) -> RawHttp:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._handlers.values():
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client.append(number)
                    self._closed.set()
                    return
                method, target, _ = head.decode().split("\r\n")[0].split(" ", 2)
                headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if line)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                self.requests.append((number, method, target, headers, body))
                self.got.set()
                if self.hold and target.split("?")[0] != "/ping":
                    if not await reader.read():  # held until the client goes away
                        self.closed_by_client.append(number)
                        self._closed.set()
                    return
                length = f"Content-Length: {len(self.body)}\r\n" if self.status != 204 else ""
                writer.write(f"HTTP/1.1 {self.status} X\r\n{length}\r\n".encode() + self.body)
                await writer.drain()
                if self.close_after:
                    return
        finally:
            writer.close()

    async def closed_by_the_client(self, number: int) -> None:
        async with asyncio.timeout(10):
            while number not in self.closed_by_client:
                self._closed.clear()
                await self._closed.wait()

    def connections(self, method: str = "POST") -> list[int]:
        return [number for number, m, *_ in self.requests if m == method]


async def test_writes_share_a_kept_alive_connection_and_a_cancelled_write_drops_it() -> None:
    """A persistent connection for the writes (the ping has its own); a write cancelled while the server holds it
    closes its connection, and the next write goes out on a new one, never on the half-used one."""
    async with RawHttp() as server, InfluxSink(InfluxSection(api="v1", url=server.url, database="db")) as sink:
        for start in (1.0, 2.0):
            assert (await sink.write(as_items(_records(1, start)))).outcome is Outcome.ACCEPTED
        first = server.connections()
        assert len(first) == 2 and first[0] == first[1], "the second write did not reuse the connection"
        assert server.connections("GET") != first[:1], "the ping and the writes share a connection"
        server.hold, server.got = True, asyncio.Event()
        held = asyncio.create_task(sink.write(as_items(_records(1, 3.0))))
        async with asyncio.timeout(10):
            await server.got.wait()
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        await server.closed_by_the_client(first[0])  # else: the cancelled write's connection stays open
        server.hold = False
        assert (await sink.write(as_items(_records(1, 4.0)))).outcome is Outcome.ACCEPTED
        assert server.connections()[-1] not in (first[0],), "a write reused the cancelled write's connection"


async def test_a_write_the_server_never_answers_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_INFLUX_TOKEN", "tok")
    async with RawHttp() as server:
        cfg = InfluxSection(
            api="v2", url=server.url, org="o", bucket="b", token=SecretRef(env="TEST_INFLUX_TOKEN"), timeout_s=0.5
        )
        async with InfluxSink(cfg) as sink:
            server.hold = True
            with pytest.raises(SinkUnavailable, match="timed out"):
                await sink.write(as_items(_records(1, 1.0)))
        await server.closed_by_the_client(server.connections()[-1])  # the timed-out write's connection


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with RawHttp() as server, InfluxSink(InfluxSection(api="v1", url=server.url, database="db")) as sink:
        server.close_after = True  # as a server's idle timeout would, without saying so
        for start in (1.0, 2.0, 3.0):
            assert (await sink.write(as_items(_records(1, start)))).outcome is Outcome.ACCEPTED
            await asyncio.sleep(0.05)
        assert len(set(server.connections())) == 3


async def test_v1_credentials_go_as_basic_auth_on_writes_and_answers_are_classified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The password from the config (or the URL's userinfo, which wins, as it did); never in a reason; a 400's body
    in the rejection; 401, 404, 429 and 5xx are retried."""
    monkeypatch.setenv("TEST_INFLUX_PASSWORD", "pa:ss")
    async with RawHttp() as server:
        cfg = InfluxSection(
            api="v1", url=server.url, database="d b", retention_policy="rp", username="gw",
            password=SecretRef(env="TEST_INFLUX_PASSWORD"),
        )  # fmt: skip
        async with InfluxSink(cfg) as sink:
            assert (await sink.write(as_items(_records(1, 1.0)))).outcome is Outcome.ACCEPTED
            server.status, server.body = 400, b'{"error":"partial write: field type conflict"}'
            result = await sink.write(as_items(_records(1, 2.0)))
            assert result.outcome is Outcome.REJECTED and "field type conflict" in result.reason
            for status, words in ((401, "credentials"), (404, "no such database"), (429, "429"), (503, "503")):
                server.status = status
                with pytest.raises(SinkUnavailable, match=words) as raised:
                    await sink.write(as_items(_records(1, 3.0)))
                assert "pa:ss" not in str(raised.value)
        url = server.url.replace("http://", "http://other:secret%40@")
        server.status = 204
        async with InfluxSink(InfluxSection(api="v1", url=url, database="d")) as sink:
            assert (await sink.write(as_items(_records(1, 4.0)))).outcome is Outcome.ACCEPTED
    ping, write = server.requests[0], server.requests[1]
    assert ping[1:3] == ("GET", "/ping") and "Authorization" not in ping[3]
    assert write[1:3] == ("POST", "/write?db=d+b&precision=ns&rp=rp")
    assert write[3]["Authorization"] == "Basic " + base64.b64encode(b"gw:pa:ss").decode()
    assert write[4].decode().splitlines() == to_lines(_records(1, 1.0))
    assert server.requests[-1][3]["Authorization"] == "Basic " + base64.b64encode(b"other:secret@").decode()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, made by openssl."""
    folder = tmp_path_factory.mktemp("influx-tls")
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=influxdb", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "2",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_server_against_the_configured_ca(
    certificate: tuple[Path, Path], unused_tcp_port: int
) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = StandInV2()
    runner = await _serve(server, "/write", unused_tcp_port, context)
    url = f"https://127.0.0.1:{unused_tcp_port}"
    try:
        async with InfluxSink(InfluxSection(api="v1", url=url, database="d", ca_file=cert)) as sink:
            assert (await sink.write(as_items(_records(2, 1.0)))).outcome is Outcome.ACCEPTED
        assert server.requests[0][2].splitlines() == to_lines(_records(2, 1.0))
        with pytest.raises(SinkUnavailable, match=r"unreachable.*CERTIFICATE_VERIFY_FAILED"):
            async with InfluxSink(InfluxSection(api="v1", url=url, database="d")):  # the system's CAs only
                pass
    finally:
        await runner.cleanup()
