"""Disk full is a state, not a crash: a real tmpfs holds the outbox, is filled to the last byte while InfluxDB is
down (so the outbox must grow), and is then freed.

While it is full the gateway keeps running, raises the high `storage` alarm, says `degraded` with storage down, and
keeps publishing live readings on MQTT marked `durable: false`; once space returns it commits what waited in memory
in order, clears the alarm, and every reading the device sent is in InfluxDB exactly once and on MQTT (durable) at
least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devtools.localservices import find_free_port
from tests.helpers import fill, health, stop_gateway, wait_for
from tests.integration.test_gateway_e2e import write_config
from tests.integration.test_reliability import (
    Device,
    Mqtt,
    assert_every_reading_delivered,
    start_gateway_logged,
    wait_connected,
)

pytestmark = pytest.mark.integration


class GatewayAlarms:
    def __init__(self, port: int) -> None:
        self.port = port
        self.events: list[dict[str, Any]] = []
        self.undurable = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="disk-full-observer") as client:
            await client.subscribe("infusion/test-site/_gateway/alarms/events", qos=1)
            await client.subscribe("infusion/test-site/+/+/reading", qos=1)
            async for msg in client.messages:
                assert isinstance(msg.payload, bytes)
                body = json.loads(msg.payload)
                if body.get("type") == "alarm":
                    self.events.append(body)
                elif body.get("durable") is False:
                    self.undurable += 1

    def storage(self) -> list[str]:
        return [e["transition"] for e in self.events if e["rule"] == "storage"]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def send_until(device: Device, stop: asyncio.Event) -> None:
    """A second of readings at a time until `stop` is set, then one more second (sent while the disk is full)."""
    while not stop.is_set():
        await device.send(1)
    await device.send(1)


async def test_a_full_disk_is_a_state_nothing_is_lost_and_live_data_keeps_flowing(
    tmp_path: Path, small_fs: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    health_port = find_free_port()
    config = write_config(tmp_path, mosquitto.port, influxd.url, influx_db, tmp_path / "ox", health_port=health_port)
    device = Device(tmp_path / "ox")
    mqtt = Mqtt(mosquitto.port)
    observer = GatewayAlarms(mosquitto.port)
    proc = start_gateway_logged(config)
    filler: Path | None = None
    sending: asyncio.Task[None] | None = None
    try:
        await wait_connected(mqtt, 1)
        await device.send(3)
        influxd.stop()  # the outbox must now keep (and grow with) everything
        await device.send(2)
        filler = fill(small_fs)
        full = asyncio.Event()
        sending = asyncio.create_task(send_until(device, full))  # the device talks for as long as the checks take
        await wait_for(lambda: "raised" in observer.storage(), 20)
        await wait_for(lambda: health(health_port).get("links", {}).get("storage") == "down", 10)
        assert health(health_port)["state"] == "degraded"
        await wait_for(lambda: observer.undurable >= 10, 15)  # live readings still reach the wall, undurable
        full.set()
        await sending
        assert proc.poll() is None, "the gateway ended on a full disk"
        filler.unlink()
        filler = None
        await device.send(3)
        await wait_for(lambda: observer.storage()[-1:] == ["cleared"], 20)
        influxd.start()
        await assert_every_reading_delivered(device, mqtt, influxd, influx_db)
        durable = {m["device_time"] for _, m in mqtt.readings if m.get("durable", True)}
        assert set(device.sent) <= durable, "every reading was published again once durable"
    finally:
        if sending is not None:
            sending.cancel()
        if filler is not None:
            with contextlib.suppress(OSError):
                filler.unlink()
        output = stop_gateway(proc)
        await mqtt.close()
        await observer.close()
        device.endpoint.close()
    log = (tmp_path / "gateway.log").read_text()
    assert "cannot be written" in log and "usable again" in log
    assert proc.returncode == 0, output + log[-3000:]
