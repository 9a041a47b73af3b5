"""The clock check: the real influxd (same machine, so the skew is 0) and stand-ins for skewed servers.

The stand-in: influxd's clock cannot be shifted without shifting this machine's, so the skewed servers are aiohttp
servers on free loopback ports answering /ping with a Date header shifted by a known amount, truncated to the second
as InfluxDB's Go HTTP server does. Real HTTP over real sockets; only the server's clock is pretend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

from devtools.localservices import find_free_port
from gateway.clock import ClockCheck, ClockReading, exceeds
from gateway.config import InfluxSection, SecretRef

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def standin(handler: Handler) -> AsyncIterator[str]:
    """A STAND-IN HTTP server on a free loopback port serving `handler` at /ping; yields its base URL."""
    app = web.Application()
    app.router.add_get("/ping", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def shifted_ping(server_ahead_s: float) -> Handler:
    """/ping as InfluxDB answers it (204, Date truncated to the second), from a clock `server_ahead_s` ahead of ours."""

    async def ping(request: web.Request) -> web.Response:
        server_now = time.time() + server_ahead_s
        return web.Response(status=204, headers={"Date": formatdate(math.floor(server_now), usegmt=True)})

    return ping


def v1(url: str, **kw: Any) -> InfluxSection:
    return InfluxSection(api="v1", url=url, database="telemetry", **kw)


async def test_real_influxd_on_the_same_clock_shows_no_skew(influxd: Any) -> None:
    check = ClockCheck(v1(influxd.url))
    reading = await check.measure()
    assert reading is not None, "influxd's /ping gave no usable Date header"
    assert reading.server == influxd.url
    assert abs(reading.skew_s) <= reading.uncertainty_s + 1e-3, reading  # the truth (0) is inside the window
    assert reading.uncertainty_s < 1.0, reading
    assert not exceeds(reading, 2.0)


@pytest.mark.parametrize(
    "server_ahead_s",
    [
        pytest.param(120.0, id="date+120s"),  # server ahead: the gateway is 120 s behind
        pytest.param(-10.0, id="date-10s"),  # server behind: the gateway is 10 s ahead
        pytest.param(-120.0, id="gateway-120s-ahead"),  # issue 11: a silent device's SpO2 stays "live" for 120 s
        pytest.param(10.0, id="gateway-10s-behind"),  # issue 11: every tile NO DATA
    ],
)
async def test_standin_with_shifted_date_is_measured_and_alarms(server_ahead_s: float) -> None:
    async with standin(shifted_ping(server_ahead_s)) as url:
        reading = await ClockCheck(v1(url)).measure()
    assert reading is not None
    expected = -server_ahead_s  # skew is the gateway's clock minus the server's
    assert abs(reading.skew_s - expected) <= reading.uncertainty_s + 1e-3, reading
    assert reading.uncertainty_s < 0.5, reading
    assert exceeds(reading, 2.0), reading


async def test_samples_narrow_a_fractional_skew_well_below_dates_resolution() -> None:
    """A shift that is not whole seconds puts the server's second boundary between ours: one sample would give
    ± 0.5 s; the timed samples must prove far better and still contain the truth."""
    async with standin(shifted_ping(-2.7)) as url:
        reading = await ClockCheck(v1(url)).measure()
    assert reading is not None
    assert abs(reading.skew_s - 2.7) <= reading.uncertainty_s + 1e-3, reading
    assert reading.uncertainty_s < 0.25, reading
    assert exceeds(reading, 2.0) and not exceeds(reading, 3.0), reading


async def test_unreachable_server_gives_none_quickly_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    check = ClockCheck(v1(f"http://127.0.0.1:{find_free_port()}"))  # nothing listens there
    with caplog.at_level(logging.DEBUG, logger="gateway.clock"):
        assert await check.measure() is None
        assert await check.measure() is None
    levels = [r.levelno for r in caplog.records if "skew unknown" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG], "warn once per outage, not every minute"


async def test_server_that_never_answers_is_bounded_by_the_budget() -> None:
    """Accepts the connection and says nothing: the measurement gives up within its budget, not the 10 s timeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        # The request timeout is 60 s: only the measurement's own budget (2.5 s) can end it within the 30 s here.
        check = ClockCheck(v1(f"http://127.0.0.1:{port}", timeout_s=60))
        try:
            reading = await asyncio.wait_for(check.measure(), timeout=30)
        except TimeoutError:
            raise AssertionError("a silent server held the measurement past its budget") from None
    assert reading is None


@pytest.mark.parametrize(
    "date", [None, "yesterday", "Sun, 06 Nov 1994 08:49:37 -0000"], ids=["none", "garbage", "no-zone"]
)
async def test_missing_or_invalid_date_gives_none(date: str | None, caplog: pytest.LogCaptureFixture) -> None:
    """A raw HTTP server (aiohttp's would add a Date of its own), the headers written by hand."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = "HTTP/1.1 204 No Content\r\n" + (f"Date: {date}\r\n" if date is not None else "") + "\r\n"
        writer.write(head.encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="gateway.clock"):
            assert await ClockCheck(v1(f"http://127.0.0.1:{port}")).measure() is None
    assert "without a valid Date header" in caplog.text


async def test_token_is_sent_but_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-token-value"
    monkeypatch.setenv("TEST_CLOCK_TOKEN", secret)
    seen: list[str | None] = []

    async def no_date(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=204, headers={"Date": "not a date"})

    async with standin(no_date) as url:
        cfg = InfluxSection(api="v2", url=url, org="o", bucket="b", token=SecretRef(env="TEST_CLOCK_TOKEN"))
        with caplog.at_level(logging.DEBUG, logger="gateway.clock"):
            assert await ClockCheck(cfg).measure() is None
    assert seen == [f"Token {secret}"]
    assert caplog.records, "expected a warning about the Date header"
    assert secret not in caplog.text


def test_server_name_carries_no_credentials() -> None:
    check = ClockCheck(v1("https://user:pw@db.clinic.example:8086/influx/"))
    assert check.server == "https://db.clinic.example:8086"


@pytest.mark.parametrize(
    ("skew", "uncertainty", "alarm"),
    [
        (0.9, 0.6, False),  # a 1 s Date window alone
        (2.4, 0.5, False),  # could be 1.9 s: not proven over 2 s
        (2.6, 0.5, True),
        (-2.6, 0.5, True),  # behind counts as much as ahead
        (-120.0, 0.05, True),
        (2.0, 0.0, False),  # at the limit is not above it
    ],
)
def test_exceeds_only_when_proven_over_the_limit(skew: float, uncertainty: float, alarm: bool) -> None:
    assert exceeds(ClockReading(skew, uncertainty, "http://db:8086"), 2.0) is alarm


def test_describe_says_which_way() -> None:
    ahead = ClockReading(120.0, 0.04, "http://db:8086").describe()
    behind = ClockReading(-10.0, 0.04, "http://db:8086").describe()
    assert "120.00 s" in ahead and "ahead of http://db:8086" in ahead
    assert "10.00 s" in behind and "behind http://db:8086" in behind
