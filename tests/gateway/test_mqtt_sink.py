"""The MQTT sink against a real Mosquitto: retained topics only ever move forward in time.

Live-first draining publishes new records before the backlog, so an alarm raised during a broker outage can reach
the sink after the live record that cleared it. The retained active-alarm topic must then stay empty (no ghost
alarm on the wall), while the event stream still carries both transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from devices.base import DeviceState, DeviceStatus, Reading
from devices.registry import get_model
from gateway.alarms import AlarmEvent, Transition
from gateway.config import MqttSection
from gateway.envelope import AlarmMessage, alarm_record, encode, origin_for, reading_record, status_record
from gateway.sinks.mqtt import MqttSink, subscribe
from tests.helpers import as_items, wait_for

ORIGIN = origin_for("site", "3", "oximeter", get_model("masimo-ascii1").spec)
ACTIVE = "infusion/site/3/alarms/active/oximeter/spo2-low"


def alarm(seq: int, at: float, transition: Transition, active: bool) -> AlarmMessage:
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


@contextlib.asynccontextmanager
async def collected(port: int, suffix: str) -> AsyncIterator[list[tuple[str, bytes]]]:
    """(topic, payload) of every message on a topic ending in `suffix`, from the broker's SUBACK on."""
    got: list[tuple[str, bytes]] = []
    subscribed = asyncio.Event()

    async def collect() -> None:
        async with subscribe(MqttSection(host="127.0.0.1", port=port), ["infusion/#"], "c") as messages:
            subscribed.set()
            async for topic, payload in messages:
                if topic.endswith(suffix):
                    got.append((topic, payload))

    collecting = asyncio.create_task(collect())
    try:
        async with asyncio.timeout(10):
            await subscribed.wait()  # the broker has acknowledged the subscription
        yield got
    finally:
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)


async def test_backlog_alarm_older_than_live_clear_does_not_come_back(mosquitto: Any) -> None:
    now = time.time()
    cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
    async with collected(mosquitto.port, "/events") as events, MqttSink(cfg, "site", "gw", live_window_s=5) as sink:
        await sink.write(as_items([alarm(2, now - 1, "cleared", False)]))  # live: drained first
        await sink.write(as_items([alarm(1, now - 30, "raised", True)]))  # backlog: older, drained after
        await wait_for(lambda: len(events) == 2, 5)
        assert await retained_now(mosquitto.port, ACTIVE) is None  # the clear removed it; the raise did not return
        await sink.write(as_items([alarm(3, now, "raised", True)]))  # a newer raise does show
        retained = await retained_now(mosquitto.port, ACTIVE)
        assert retained is not None and json.loads(retained)["seq"] == 3


async def test_older_device_status_does_not_replace_newer(mosquitto: Any) -> None:
    topic = "infusion/site/3/oximeter/status"
    now = time.time()
    async with MqttSink(MqttSection(host="127.0.0.1", port=mosquitto.port), "site", "gw", live_window_s=5) as sink:
        await sink.write(as_items([status_record(ORIGIN, 5, now, DeviceStatus(DeviceState.OK))]))
        await sink.write(as_items([status_record(ORIGIN, 4, now - 10, DeviceStatus(DeviceState.DISCONNECTED))]))
        retained = await retained_now(mosquitto.port, topic)
        assert retained is not None and json.loads(retained)["seq"] == 5


async def test_a_live_record_is_published_as_the_outbox_stored_it_a_late_one_marked_historical(mosquitto: Any) -> None:
    """The payload of a live record is its stored body, byte for byte; one sent after the live window is the same
    record marked historical; one sent before its commit (storage unusable) is marked durable: false."""
    now = time.time()
    live = reading_record(ORIGIN, 7, now, Reading({"spo2": 97.0}, ("low_perfusion",)))
    late = reading_record(ORIGIN, 6, now - 60, Reading({"spo2": 96.0}))
    unsaved = reading_record(ORIGIN, 8, now, Reading({"spo2": 95.0}))
    cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
    async with collected(mosquitto.port, "/reading") as got, MqttSink(cfg, "site", "gw", live_window_s=5) as sink:
        await sink.write(as_items([live, late]))
        await sink.write_undurable([unsaved])
        await wait_for(lambda: len(got) == 3, 5)
    assert got[0] == ("infusion/site/3/oximeter/reading", encode(live))
    assert json.loads(got[1][1]) == {**json.loads(encode(late)), "historical": True}
    assert json.loads(got[2][1]) == {**json.loads(encode(unsaved)), "durable": False}
