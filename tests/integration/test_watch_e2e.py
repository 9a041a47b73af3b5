"""`watch` against a real mosquitto that goes away and comes back: the wall, then a full-screen CONNECTION LOST
banner (never the last frame as if live), then the wall again, rebuilt from what the broker says after the restart
(an alarm that was retained before the outage and is gone after it is not shown)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

from rich.console import Console, RenderableType

from clients.watch import run_watch
from devtools.localservices import Mosquitto
from gateway.backoff import Backoff
from gateway.config import MqttSection
from gateway.envelope import iso_utc
from gateway.sinks.mqtt import make_client
from tests.helpers import wait_for

OX = {"v": 1, "site": "e2e", "room": "4", "device": "ox", "model": "masimo-ascii1", "kind": "pulse_oximeter"}
BANNER = "CONNECTION LOST — data not live"


async def publish(mqtt: MqttSection, *messages: tuple[str, dict[str, Any], bool]) -> None:
    async with make_client(mqtt, f"watch-e2e-pub-{time.monotonic_ns()}") as client:
        for topic, body, retain in messages:
            await client.publish(topic, json.dumps(body).encode(), qos=1, retain=retain)


def status(state: str) -> tuple[str, dict[str, Any], bool]:
    return "infusion/e2e/4/ox/status", {**OX, "type": "status", "state": state, "time": iso_utc(time.time())}, True


def reading(spo2: float) -> tuple[str, dict[str, Any], bool]:
    body = {
        **OX,
        "type": "reading",
        "time": iso_utc(time.time()),
        "metrics": {"spo2": spo2},
        "flags": [],
        "valid": True,
    }
    return "infusion/e2e/4/ox/reading", body, False


async def test_watch_shows_the_banner_while_the_broker_is_away_and_the_wall_when_it_is_back(
    mosquitto: Mosquitto,
) -> None:
    mqtt = MqttSection(host=mosquitto.host, port=mosquitto.port)
    broker = f"{mosquitto.host}:{mosquitto.port}"
    frames: list[str] = []

    def capture(frame: RenderableType) -> None:
        console = Console(record=True, width=120, height=30, file=io.StringIO())
        console.print(frame)
        frames.append(console.export_text())

    def latest() -> str:
        return frames[-1] if frames else ""

    screen = Console(file=io.StringIO(), width=120, height=30)  # what a terminal would get; not asserted on
    watching = asyncio.create_task(
        run_watch(mqtt, "e2e", None, screen, on_frame=capture, backoff=Backoff(base=0.2, cap=1.0))
    )
    try:
        await wait_for(lambda: "waiting for data" in latest(), 10)  # subscribed: readings are not retained
        alarm = {
            **OX,
            "type": "alarm",
            "rule": "spo2-low",
            "priority": "high",
            "message": "SpO2 low",
            "value": 87,
            "transition": "raised",
            "active": True,
            "indeterminate": False,
            "time": iso_utc(time.time()),
        }
        await publish(mqtt, status("ok"), ("infusion/e2e/4/alarms/active/ox/spo2-low", alarm, True), reading(87))
        await wait_for(lambda: "room 4" in latest() and "87 %" in latest() and "HIGH SpO2 low (87)" in latest(), 10)

        await asyncio.to_thread(mosquitto.stop)
        lost_at = time.monotonic()
        await wait_for(lambda: BANNER in latest(), 10)
        banner_after = time.monotonic() - lost_at
        text = latest()
        assert f"MQTT broker {broker} unreachable since" in text
        assert "room 4" not in text and "87 %" not in text  # the old wall is not left showing
        await asyncio.sleep(1.5)  # several failed retries: still the banner, still no wall
        assert BANNER in latest() and "room 4" not in latest()

        await asyncio.to_thread(mosquitto.restart)  # no persistence: the retained alarm is gone with the broker
        restarted_at = time.monotonic()
        await wait_for(lambda: BANNER not in latest(), 10)
        back_after = time.monotonic() - restarted_at
        await publish(mqtt, status("probe_off"), reading(97))  # the gateway republishes its retained status
        await wait_for(lambda: "PROBE_OFF" in latest(), 10)
        text = latest()
        assert BANNER not in text and "ALARM" not in text and "97" not in text, text
    finally:
        watching.cancel()
        done, _ = await asyncio.wait({watching}, timeout=5)
        assert done, "run_watch did not stop within 5 s of being cancelled"
    print(f"banner {banner_after:.2f} s after the broker stopped; wall {back_after:.2f} s after it restarted")
