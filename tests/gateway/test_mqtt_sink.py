"""The MQTT sink against a real Mosquitto: retained topics only ever move forward in time.

Live-first draining publishes new records before the backlog, so an alarm raised during a broker outage can reach
the sink after the live record that cleared it. The retained active-alarm topic must then stay empty (no ghost
alarm on the wall), while the event stream still carries both transitions.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from devices.base import DeviceState, DeviceStatus
from devices.registry import get_model
from gateway.alarms import AlarmEvent, Transition
from gateway.config import MqttSection
from gateway.envelope import alarm_record, origin_for, status_record
from gateway.sinks.mqtt import MqttSink, subscribe
from tests.helpers import wait_for

ORIGIN = origin_for("site", "3", "oximeter", get_model("masimo-ascii1").spec)
ACTIVE = "infusion/site/3/alarms/active/oximeter/spo2-low"


def alarm(seq: int, at: float, transition: Transition, active: bool) -> dict[str, Any]:
    event = AlarmEvent(
        alarm_id="3/oximeter/spo2-low", room="3", device="oximeter", rule="spo2-low", kind="physiological",
        priority="high", transition=transition, active=active, time=at, metric="spo2", value=85, limit=90,
    )  # fmt: skip
    return alarm_record(ORIGIN, seq, event, "test", True)


async def retained_now(port: int, topic: str) -> bytes | None:
    """What a fresh subscriber gets for a retained topic (None: nothing retained)."""
    got: list[bytes] = []

    async def read() -> None:
        async with subscribe(MqttSection(host="127.0.0.1", port=port), [topic], "probe") as messages:
            async for _topic, payload in messages:
                got.append(payload)
                return

    try:
        async with asyncio.timeout(2.0):  # a retained message follows the SUBACK at once
            await read()
    except TimeoutError:
        return None
    return got[0]


async def test_backlog_alarm_older_than_live_clear_does_not_come_back(mosquitto: Any) -> None:
    events: list[bytes] = []

    subscribed = asyncio.Event()

    async def collect() -> None:
        async with subscribe(MqttSection(host="127.0.0.1", port=mosquitto.port), ["infusion/#"], "c") as messages:
            subscribed.set()
            async for topic, payload in messages:
                if topic.endswith("/events"):
                    events.append(payload)

    collecting = asyncio.create_task(collect())
    async with asyncio.timeout(10):
        await subscribed.wait()  # the broker has acknowledged the subscription
    now = time.time()
    async with MqttSink(MqttSection(host="127.0.0.1", port=mosquitto.port), "site", "gw", live_window_s=5) as sink:
        await sink.write([alarm(2, now - 1, "cleared", False)])  # live: drained first
        await sink.write([alarm(1, now - 30, "raised", True)])  # backlog: older, drained after
        await wait_for(lambda: len(events) == 2, 5)
        assert await retained_now(mosquitto.port, ACTIVE) is None  # the clear removed it; the raise did not return
        await sink.write([alarm(3, now, "raised", True)])  # a newer raise does show
        retained = await retained_now(mosquitto.port, ACTIVE)
        assert retained is not None and b'"seq": 3' in retained
    collecting.cancel()
    await asyncio.gather(collecting, return_exceptions=True)


async def test_older_device_status_does_not_replace_newer(mosquitto: Any) -> None:
    topic = "infusion/site/3/oximeter/status"
    now = time.time()
    async with MqttSink(MqttSection(host="127.0.0.1", port=mosquitto.port), "site", "gw", live_window_s=5) as sink:
        await sink.write([status_record(ORIGIN, 5, now, DeviceStatus(DeviceState.OK))])
        await sink.write([status_record(ORIGIN, 4, now - 10, DeviceStatus(DeviceState.DISCONNECTED))])
        retained = await retained_now(mosquitto.port, topic)
        assert retained is not None and b'"seq": 5' in retained
