"""The raw limits on this machine, measured in the same run as the gateway: what the gateway's figures are
compared against. A bare aiomqtt QoS 1 publish loop, a bare line-protocol write loop to influxd (batched and one
point per request, the peer's way), a bare pty read loop through pyserial-asyncio-fast, and the bare relay latency
(pty read straight to a QoS 1 publish, no decoding, no durability) to a subscriber, the floor under the gateway's."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import tty
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import serial_asyncio_fast

from benchmarks.harness import percentiles, rig

LINE = (
    b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- "
    b"ALARM=0000 EXC=000800\r\n"
)


async def mqtt_publish(port: int, n: int = 5000) -> dict[str, float]:
    payload = b"x" * 450  # about a reading's JSON
    quiet = logging.getLogger("benchmarks.limits.mqtt")
    quiet.setLevel(logging.ERROR)  # aiomqtt warns on every publish beyond 10 in flight
    async with aiomqtt.Client("127.0.0.1", port, identifier="limit-publisher", logger=quiet) as client:
        start = time.perf_counter()
        for i in range(n // 2):  # one at a time, each waiting for its PUBACK
            await client.publish(f"limit/{i % 100}", payload, qos=1)
        sequential = (n // 2) / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, n // 2, 100):  # 100 in flight, as the gateway's batches
            await asyncio.gather(*(client.publish(f"limit/{j % 100}", payload, qos=1) for j in range(i, i + 100)))
        concurrent = (n // 2) / (time.perf_counter() - start)
    return {"mqtt_qos1_sequential_per_s": round(sequential), "mqtt_qos1_100_in_flight_per_s": round(concurrent)}


async def influx_write(url: str, db: str, n: int = 50_000) -> dict[str, float]:
    lines = [
        f"vitals,site=b,room={i % 100},device=ox spo2=97,pulse_rate=70,seq={i}i {1_700_000_000_000_000_000 + i}"
        for i in range(n)
    ]
    async with aiohttp.ClientSession() as http:
        start = time.perf_counter()
        for i in range(0, n, 5000):
            async with http.post(
                f"{url}/write", params={"db": db, "precision": "ns"}, data="\n".join(lines[i : i + 5000])
            ) as r:
                assert r.status == 204, await r.text()
        batched = n / (time.perf_counter() - start)
        start = time.perf_counter()
        single = 1000
        for line in lines[:single]:
            async with http.post(f"{url}/write", params={"db": db, "precision": "ns"}, data=line) as r:
                assert r.status == 204
        one = single / (time.perf_counter() - start)
    return {"influx_points_per_s_batched_5000": round(batched), "influx_points_per_s_one_per_request": round(one)}


async def pty_read(n: int = 20_000) -> dict[str, float]:
    master, slave = os.openpty()
    tty.setraw(slave)
    reader, writer = await serial_asyncio_fast.open_serial_connection(url=os.ttyname(slave), baudrate=9600)
    got = 0

    async def read() -> None:
        nonlocal got
        while got < n * len(LINE):
            got += len(await reader.read(4096))

    task = asyncio.create_task(read())
    start = time.perf_counter()
    os.set_blocking(master, False)
    data = memoryview(LINE * n)
    offset = 0
    while offset < len(data):
        try:
            offset += os.write(master, data[offset : offset + 4096])
        except BlockingIOError:
            await asyncio.sleep(0)
    await task
    elapsed = time.perf_counter() - start
    writer.close()
    os.close(master)
    os.close(slave)
    return {"pty_lines_per_s": round(n / elapsed)}


async def relay_latency(port: int, n: int = 300) -> dict[str, float]:
    """pty write -> pty read -> QoS 1 publish -> subscriber, one line every 10 ms: what any gateway must spend."""
    master, slave = os.openpty()
    tty.setraw(slave)
    reader, writer = await serial_asyncio_fast.open_serial_connection(url=os.ttyname(slave), baudrate=9600)
    quiet = logging.getLogger("benchmarks.limits.relay")
    quiet.setLevel(logging.ERROR)
    delays: list[float] = []
    async with (
        aiomqtt.Client("127.0.0.1", port, identifier="limit-relay", logger=quiet) as relay,
        aiomqtt.Client("127.0.0.1", port, identifier="limit-sub", logger=quiet) as sub,
    ):
        await sub.subscribe("limit/relay", qos=1)

        async def forward() -> None:
            while True:
                await relay.publish("limit/relay", await reader.read(4096), qos=1)

        async def receive() -> None:
            async for _message in sub.messages:
                delays.append(time.perf_counter() - sent[len(delays)])
                if len(delays) == n:
                    return

        sent: list[float] = []
        relaying = asyncio.create_task(forward())
        receiving = asyncio.create_task(receive())
        for _ in range(n):
            sent.append(time.perf_counter())
            os.write(master, LINE)
            await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            await receiving
        relaying.cancel()
        await asyncio.gather(relaying, return_exceptions=True)
    writer.close()
    os.close(master)
    os.close(slave)
    p = percentiles(delays)
    return {"relay_latency_p50_ms": p["p50_ms"], "relay_latency_p99_ms": p["p99_ms"]}


async def measure(workdir: Path) -> dict[str, Any]:
    with rig(workdir) as r:
        out: dict[str, Any] = {}
        out.update(await mqtt_publish(r.broker.port))
        out.update(await relay_latency(r.broker.port))
        out.update(await influx_write(r.influx.url, r.database))
    out.update(await pty_read())
    return out
