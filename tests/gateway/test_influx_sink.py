"""The InfluxDB sink: the 1.x path against the real influxd, the v2 path against a stand-in.

The stand-in: no InfluxDB 2.x/3.x server can run on this machine (Debian ships 1.6.7, which has no /api/v2/write),
so the v2 tests run an aiohttp server that records the HTTP request influxdb-client makes and answers as the v2
API documents (204, 400 with a JSON error, 503). It checks what we send, not how a real 2.x server stores it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from devices.base import DeviceState, DeviceStatus, Reading
from devices.registry import get_model
from gateway.config import InfluxSection, SecretRef
from gateway.envelope import origin_for, reading_record, status_record
from gateway.sinks import Outcome, SinkUnavailable
from gateway.sinks.influx import InfluxSink, to_lines

ORIGIN = origin_for("clinic-a", "3", "oximeter", get_model("masimo-ascii1").spec)


def _records(n: int, start: float) -> list[dict[str, Any]]:
    out = [status_record(ORIGIN, 1, start, DeviceStatus(DeviceState.OK, code=0x800))]
    for i in range(n):
        reading = Reading({"spo2": 90 + i % 10, "pulse_rate": 70 + i, "perfusion_index": 3.25}, ("low_perfusion",))
        out.append(reading_record(ORIGIN, i + 2, start + 1 + i, reading))
    return out


async def test_v1_write_lands_in_real_influxd_and_replay_does_not_duplicate(influxd: Any, influx_db: str) -> None:
    cfg = InfluxSection(api="v1", url=influxd.url, database=influx_db)
    records = _records(20, time.time() - 60)
    async with InfluxSink(cfg) as sink:
        assert (await sink.write(records)).outcome is Outcome.ACCEPTED
        assert (await sink.write(records)).outcome is Outcome.ACCEPTED  # a replay after a lost acknowledgement
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
            await sink.write(_records(1, time.time()))


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


@pytest.fixture
async def stand_in(unused_tcp_port: int) -> AsyncIterator[tuple[StandInV2, str]]:
    server = StandInV2()
    app = web.Application()
    app.router.add_post("/api/v2/write", server.handle)
    app.router.add_get("/ping", _pong)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
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
        assert (await sink.write(records)).outcome is Outcome.ACCEPTED
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
        result = await sink.write(_records(1, time.time()))
        assert result.outcome is Outcome.REJECTED and "field type conflict" in result.reason
        server.status = 503
        with pytest.raises(SinkUnavailable):
            await sink.write(_records(1, time.time()))
