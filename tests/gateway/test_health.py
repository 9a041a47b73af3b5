"""The health endpoint cannot hurt the gateway (issue 12, observation 5): a bounded number of connections, a silent or
slow client is closed, and the answer comes from memory, never from a query queued behind the outbox's threads."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.localservices import find_free_port
from gateway.app import Gateway
from gateway.config import Config, GatewaySection, InfluxSection
from gateway.health import HEADER_TIMEOUT_S, MAX_CONNECTIONS, HealthServer
from tests.helpers import record_for


async def _status() -> dict[str, Any]:
    return {"state": "online", "counters": {"received": 1}}


@pytest.fixture
async def health() -> AsyncIterator[HealthServer]:
    server = HealthServer("127.0.0.1", find_free_port(), _status)
    await server.start()
    server.ready = True
    try:
        yield server
    finally:
        await server.stop()


async def _get(port: int, path: str = "/health", method: str = "GET") -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection: (status code, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server closed the connection (end of file or reset); fails after `within`."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept a silent connection open for {within:g} s") from None
    return time.monotonic() - t0


def test_health_listens_on_loopback_by_default() -> None:
    assert GatewaySection().health_host == "127.0.0.1"


async def test_health_answers_from_memory_with_json(health: HealthServer) -> None:
    code, body = await _get(health.port)
    assert code == 200 and json.loads(body)["state"] == "online"
    assert (await _get(health.port, "/other"))[0] == 404
    assert (await _get(health.port, method="POST"))[0] == 405


async def test_half_open_connections_are_capped_and_health_still_answers(health: HealthServer) -> None:
    """300 connections that never send a byte: the server holds at most its cap of them (each is a file
    descriptor), and a real request among them is still answered at once."""
    before = _open_fds()
    held = [await asyncio.open_connection("127.0.0.1", health.port) for _ in range(300)]
    try:
        await asyncio.sleep(0.5)  # let the server accept what it will
        server_side = _open_fds() - before - len(held)
        assert server_side <= MAX_CONNECTIONS + 4, f"the server holds {server_side} connections"
        code, body = await _get(health.port)  # answered while all 300 are held (the global timeout bounds it)
        assert code == 200 and json.loads(body)["state"] == "online"
    finally:
        for _, writer in held:
            writer.close()


async def test_a_connection_that_never_finishes_its_headers_is_closed(health: HealthServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
        await writer.drain()
        took = await _closed_by_server(reader, HEADER_TIMEOUT_S + 3)
        assert took >= HEADER_TIMEOUT_S - 0.5
    finally:
        writer.close()


async def test_an_oversized_request_is_refused_and_closed(health: HealthServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nX-Filler: " + b"a" * 65536)
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.split(b" ", 2)[1] in (b"400", b"431")
    finally:
        writer.close()


def _blocked(pool: Any) -> Callable[[], None]:
    """Occupy a one-thread pool (the outbox's writer or reader) until the returned function is called."""
    release = threading.Event()
    pool.submit(release.wait, 30)
    return release.set


async def test_status_is_served_from_memory_while_the_outbox_threads_are_busy(tmp_path: Path) -> None:
    """Each request used to run count(*) on the outbox's reader thread, the queue a backlog drain uses: with the
    threads busy (a long read, a slow disk) the health answer waited behind them."""
    cfg = Config(
        gateway=GatewaySection(data_dir=tmp_path),
        influx=InfluxSection(api="v1", url="http://127.0.0.1:9", database="x"),
    )
    gw = Gateway(cfg)
    await gw.outbox.open()
    for i in range(5):
        gw.outbox.put("1/ox", gw.outbox.next_seq("1/ox"), record_for("1/ox", i + 1))
    await gw.outbox.flush()
    releases = [_blocked(gw.outbox._pool), _blocked(gw.outbox._read_pool)]
    try:
        body = await gw.status()  # answered while both threads are still blocked: it does not queue behind them
        assert body["counters"]["backlog_mqtt"] == 5 and body["counters"]["backlog_influx"] == 5
    finally:
        for release in releases:
            release()
        await gw.outbox.close()
