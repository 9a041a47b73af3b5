"""A sink that keeps up is handed each commit's records by the outbox's listener (sink_worker.Pushed: MQTT), and its
cursor follows the broker's PUBACKs. Against a real Mosquitto: every record arrives once and in order, the cursor
ends at the head, and a record the sink cannot route still goes to the rejected pile while the others go on."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MqttSection
from gateway.envelope import Record
from gateway.outbox import Outbox
from gateway.sink_worker import SinkWorker
from gateway.sinks.mqtt import MqttSink
from tests.gateway.test_mqtt_sink import collected
from tests.helpers import record_for, wait_for

POISON_SEQ = 13


class PickySink(MqttSink):
    """An MQTT sink that cannot route one record (a record's fault: what a malformed record would raise)."""

    def _route(self, record: Record, payload: bytes, live_since: str) -> list[tuple[str, bytes, bool]]:
        if record.seq == POISON_SEQ:
            raise ValueError(f"no topic for record {record.seq}")
        return super()._route(record, payload, live_since)


def _seqs(messages: list[tuple[str, bytes]]) -> list[int]:
    """Sequence numbers of the readings collected, in arrival order."""
    return [json.loads(payload)["seq"] for _topic, payload in messages]


@pytest.fixture
async def arrived(mosquitto: Any) -> AsyncIterator[list[tuple[str, bytes]]]:
    """The readings on the broker (test_mqtt_sink's collector: subscribed before the test goes on)."""
    async with collected(mosquitto.port, "/reading") as messages:
        yield messages


async def _run(box: Outbox, sink: type[MqttSink], port: int, n: int) -> SinkWorker:
    cfg = MqttSection(host="127.0.0.1", port=port)
    worker = SinkWorker(box, lambda: sink(cfg, "s", "gw", 10.0), "mqtt", batch_size=20)
    working = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: box.listening("mqtt"), 10)  # connected and caught up: pushed from now on
        for seq in range(1, n + 1):
            box.put("1/ox", seq, record_for("1/ox", seq, at=time.time()))
            if seq % 3:  # some commits of one record, some of two
                await box.flush()
        await box.flush()
        await wait_for(lambda: box.cursor("mqtt") == box.head(), 10)
    finally:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
    return worker


async def test_caught_up_records_are_pushed_at_commit_and_the_cursor_follows_the_pubacks(
    tmp_path: Path, mosquitto: Any, arrived: list[tuple[str, bytes]]
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("mqtt",))
    await box.open()
    try:
        worker = await _run(box, MqttSink, mosquitto.port, 60)
        await wait_for(lambda: len(arrived) == 60, 5)
        assert _seqs(arrived) == list(range(1, 61))  # each once, in commit order
        assert worker.delivered == 60 and await box.backlog() == {"mqtt": 0}
    finally:
        await box.close()


async def test_a_record_the_sink_cannot_route_is_set_aside_and_the_rest_go_on(
    tmp_path: Path, mosquitto: Any, arrived: list[tuple[str, bytes]]
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("mqtt",))
    await box.open()
    try:
        worker = await _run(box, PickySink, mosquitto.port, 40)
        await wait_for(lambda: len(arrived) == 39, 5)
        assert sorted(_seqs(arrived)) == [s for s in range(1, 41) if s != POISON_SEQ] and len(set(_seqs(arrived))) == 39
        assert worker.rejected == 1 and await box.rejected_count() == 1
        assert await box.backlog() == {"mqtt": 0}
    finally:
        await box.close()


async def test_a_commit_of_state_alone_while_pushing_is_no_records(
    tmp_path: Path, mosquitto: Any, arrived: list[tuple[str, bytes]]
) -> None:
    """The alarm engine's state is committed on its own at times: no records for the listener, and no failure."""
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("mqtt",))
    await box.open()
    cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
    worker = SinkWorker(box, lambda: MqttSink(cfg, "s", "gw", 10.0), "mqtt", batch_size=20)
    working = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: box.listening("mqtt"), 10)
        box.put_state("alarms", {"v": 1})
        await box.flush()
        box.put("1/ox", 1, record_for("1/ox", 1, at=time.time()))
        await box.flush()
        await wait_for(lambda: _seqs(arrived) == [1], 5)
        assert not working.done(), "the worker ended"
    finally:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
        await box.close()
