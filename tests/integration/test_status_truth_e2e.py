"""Statuses that tell the truth through outages (issue 15), with the real gateway CLI, mosquitto and influxd:

1. a broker restarted without persistence gets every device's retained status back, and so does one that was
   restarted while the gateway itself was down (the retained topics are the gateway's durable state, not a
   connection's memory);
2. an idle gateway (every device silent) notices a stopped broker, says degraded, raises `broker_lost`, and puts its
   retained state back when the broker returns;
3. while influxd is dead `/health` says degraded the whole time, never online.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devtools.localservices import find_free_port
from simulators.serve import serve
from tests.helpers import health, start_gateway, stop_gateway, wait_for, write_gateway_config

ROOMS = ("1", "2", "3")


def config(tmp_path: Path, mosquitto: Any, influxd: Any, db: str, health_port: int, extra: str = "") -> Path:
    devices = "".join(
        f'[[devices]]\nroom = "{room}"\nname = "oximeter"\nmodel = "masimo-ascii1"\nport = "{tmp_path / room}"\n'
        for room in ROOMS
    )
    return write_gateway_config(
        tmp_path, "gw-truth", mosquitto.port, influxd.url, db, devices + extra, health_port, "status_interval_s = 1"
    )


async def retained(port: int, pattern: str, settle_s: float = 1.5) -> dict[str, dict[str, Any]]:
    """What the broker holds retained under `pattern` now: a fresh subscriber's retained messages."""
    found: dict[str, dict[str, Any]] = {}
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"retained-{uuid.uuid4().hex[:6]}") as client:
            await client.subscribe(pattern, qos=1)
            async with asyncio.timeout(settle_s):
                async for message in client.messages:
                    if message.retain and isinstance(message.payload, bytes) and message.payload:
                        found[str(message.topic)] = json.loads(message.payload)
    except TimeoutError:
        pass
    except aiomqtt.MqttError:
        return {}
    return found


async def statuses_back(port: int) -> bool:
    held = await retained(port, "infusion/test-site/+/oximeter/status")
    return len(held) == len(ROOMS)


async def eventually(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.5)


@pytest.fixture
async def talking(tmp_path: Path) -> Any:
    tasks = [
        asyncio.create_task(serve("masimo-ascii1", "baseline", pty=True, link=tmp_path / room, speed=1.0, seed=i))
        for i, room in enumerate(ROOMS)
    ]
    await wait_for(lambda: all((tmp_path / room).exists() for room in ROOMS), 10)
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_every_retained_status_comes_back_after_broker_restarts(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str, talking: Any
) -> None:
    """Observation 1: 20 s after a broker restart, with devices talking, only the gateway status was retained."""
    health_port = find_free_port()
    cfg = config(tmp_path, mosquitto, influxd, influx_db, health_port)
    proc = start_gateway(cfg)
    try:
        await eventually(lambda: statuses_back(mosquitto.port), 30, "retained statuses at start")
        mosquitto.restart()  # no persistence: the broker forgets every retained message
        await eventually(lambda: statuses_back(mosquitto.port), 15, "every device's status back after a restart")
        # And across a gateway restart while the broker, too, was restarted: from the gateway's durable state.
        stop_gateway(proc)
        mosquitto.restart()
        proc = start_gateway(cfg)
        await eventually(lambda: statuses_back(mosquitto.port), 15, "statuses back after both restarted")
    finally:
        output = stop_gateway(proc)
    assert proc.returncode == 0, output


async def test_an_idle_gateway_notices_the_broker_going_says_degraded_and_raises_broker_lost(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    """Observation 2: with every device silent, the gateway did not notice a broker restart for 33-40 s."""
    health_port = find_free_port()
    proc = start_gateway(config(tmp_path, mosquitto, influxd, influx_db, health_port))  # no device ever talks
    try:
        await wait_for(lambda: health(health_port).get("links", {}).get("mqtt") == "up", 20)
        await asyncio.sleep(4)  # past the start-up's own publishes: from here on nothing is being sent
        mosquitto.stop()
        await wait_for(lambda: health(health_port).get("state") == "degraded", 5)
        await asyncio.sleep(12)  # longer than broker_lost's 10 s delay
        mosquitto.start()
        await wait_for(lambda: health(health_port).get("links", {}).get("mqtt") == "up", 15)

        def lost_alarm_stored() -> bool:  # InfluxDB stayed up: the alarm's record is there as soon as it is raised
            query = 'SELECT "transition" FROM "alarms" WHERE "rule" = \'broker_lost\''
            rows = influxd.query(influx_db, query)
            return bool(rows) and any(r[1] == "raised" for r in rows[0]["values"])

        async def statuses() -> bool:
            held = await retained(mosquitto.port, "infusion/test-site/#")
            gateway = [m for t, m in held.items() if t.endswith("/_gateway/gw-truth/status")]
            return bool(gateway) and sum(t.endswith("/oximeter/status") for t in held) == len(ROOMS)

        await wait_for(lost_alarm_stored, 20)
        await eventually(statuses, 20, "the gateway's and every device's status retained again")
    finally:
        output = stop_gateway(proc)
    assert "broker_lost raised" in output
    assert proc.returncode == 0, output


async def test_health_says_degraded_for_the_whole_influxdb_outage(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str, talking: Any
) -> None:
    """Observation 3: /health said online with influx up in 159 of 292 samples while influxd was dead."""
    health_port = find_free_port()
    proc = start_gateway(config(tmp_path, mosquitto, influxd, influx_db, health_port))
    try:
        await wait_for(lambda: health(health_port).get("state") == "online", 30)
        influxd.kill()
        await wait_for(lambda: health(health_port).get("links", {}).get("influx") == "down", 10)
        samples = []
        for _ in range(30):  # 15 s of the outage, sampled twice a second
            samples.append(health(health_port).get("links", {}).get("influx"))
            await asyncio.sleep(0.5)
        assert samples.count("down") == len(samples), f"influx said {samples} while influxd was dead"
        influxd.start()
        await wait_for(lambda: health(health_port).get("state") == "online", 30)
    finally:
        output = stop_gateway(proc)
    assert proc.returncode == 0, output
