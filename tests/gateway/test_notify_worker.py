"""The notify sink with its real parts below the gateway: a real outbox file, the NotifyWorker, the Apprise adapter,
and a real HTTP receiver on loopback standing in for a phone/chat service (tests/notify_receiver.py). Also: a sink
added to an existing outbox starts at its head (no history replayed as notifications), and a removed one is owed
nothing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from devices.base import Reading
from gateway.alarms import AlarmEvent
from gateway.config import ConfigError, NotifySection
from gateway.envelope import AlarmMessage, Origin, ReadingMessage, Record, alarm_record, reading_record
from gateway.notify.worker import NotifyWorker
from gateway.outbox import Outbox
from tests.helpers import wait_for
from tests.notify_receiver import Receiver

ORIGIN: Origin = {
    "site": "clinic-a", "room": "7", "device": "oximeter", "model": "masimo-ascii1", "kind": "pulse_oximeter"
}  # fmt: skip


def _reading(seq: int) -> ReadingMessage:
    return reading_record(ORIGIN, seq, 1_800_000_000.0 + seq, Reading({"spo2": 97.0}))


def _alarm(seq: int, transition: str, now: float, rule: str = "spo2-low") -> AlarmMessage:
    event = AlarmEvent(
        f"7/oximeter/{rule}", "7", "oximeter", rule, "physiological", "high", transition,  # type: ignore[arg-type]
        transition != "cleared", now, "spo2", 85.0, 90.0, "SpO2 low", since=now,
    )  # fmt: skip
    return alarm_record(ORIGIN, seq, event, "test", False)


def _put(box: Outbox, record_for: Callable[[int], Record]) -> None:
    seq = box.next_seq("7/oximeter")
    box.put("7/oximeter", seq, record_for(seq))


@contextlib.asynccontextmanager
async def running(box: Outbox, worker: NotifyWorker) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(box.run_committer()), asyncio.create_task(worker.run())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_alarm_records_reach_the_receiver_readings_never_and_an_unusable_url_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver()
    await receiver.start()
    monkeypatch.setenv("PHONES_URL", receiver.url("phones-s3cr3t-token-0001"))
    monkeypatch.setenv("BROKEN_URL", "nosuchservice://whatever")
    cfg = NotifySection.model_validate(
        {
            "targets": {"phones": {"url": {"env": "PHONES_URL"}}, "broken": {"url": {"env": "BROKEN_URL"}}},
            "routes": [{"targets": ["phones", "broken"]}],
        }
    )
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("mqtt", "influx", "notify"))
    await box.open()
    worker = NotifyWorker(box, cfg, silence_s=120)
    try:
        async with running(box, worker):
            t = time.time()
            for _ in range(20):
                _put(box, _reading)
            _put(box, lambda seq: _alarm(seq, "raised", t))
            _put(box, _reading)
            _put(box, lambda seq: _alarm(seq, "cleared", t + 1))
            await wait_for(lambda: len(receiver.to("phones-s3cr3t-token-0001")) >= 2, 20)
            await wait_for(lambda: worker.rejected >= 2, 10)
        got = receiver.to("phones-s3cr3t-token-0001")
        assert [r.ref for r in got] == ["7/oximeter/21>phones", "7/oximeter/23>phones"]
        assert "ALARM" in got[0].title and got[0].type == "failure"
        assert "cleared" in got[1].title and got[1].type == "success"
        await box.flush()
        rows = sqlite3.connect(box.path).execute("SELECT record_id, reason FROM rejected WHERE sink = 'notify'")
        rejected = sorted(rows.fetchall())
        assert [r[0] for r in rejected] == [21, 23]  # the outbox ids of the alarm records they came from
        assert all("Apprise cannot use target broken's URL" in reason for _, reason in rejected)
        assert await box.backlog() == {"mqtt": 23, "influx": 23, "notify": 0}
    finally:
        await box.close()
        await receiver.stop()


async def test_a_sink_added_to_an_existing_outbox_starts_at_its_head_and_a_removed_one_is_owed_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, sinks=("mqtt", "influx"))
    await box.open()
    for i in range(5):
        _put(box, functools.partial(_alarm, transition="raised", now=1_800_000_000.0 + i))
    await box.flush()
    await box.close()

    added = Outbox(path, sinks=("mqtt", "influx", "notify"))
    await added.open()
    assert added.cursor("notify") == added.head() == 5
    assert await added.backlog() == {"mqtt": 5, "influx": 5, "notify": 0}  # the history is not notify's to send
    assert await added.read(added.cursor("notify"), limit=10) == []
    _put(added, _reading)
    await added.flush()
    owed = await added.read(added.cursor("notify"), limit=10)
    assert [it.decoded().seq for it in owed] == [6]  # what comes from now on is
    await added.close()

    removed = Outbox(path, sinks=("mqtt", "influx"))
    await removed.open()
    assert await removed.backlog() == {"mqtt": 6, "influx": 6}  # notify's cursor stays in the file, owed nothing
    for sink in ("mqtt", "influx"):
        await removed.ack(sink, 6)
    assert await removed.prune() == 6  # and holds nothing back
    await removed.close()

    fresh = Outbox(tmp_path / "new.sqlite3", sinks=("mqtt", "influx", "notify"))
    await fresh.open()
    assert fresh.cursor("notify") == 0
    await fresh.close()


async def test_a_target_url_that_does_not_resolve_names_its_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At construction (Gateway.__init__, before any port opens); `run` turns it into exit 2."""
    monkeypatch.delenv("NOTIFY_NOWHERE_URL", raising=False)
    cfg = NotifySection.model_validate(
        {"targets": {"phones": {"url": {"env": "NOTIFY_NOWHERE_URL"}}}, "routes": [{"targets": ["phones"]}]}
    )
    box = Outbox(tmp_path / "outbox.sqlite3", sinks=("notify",))
    with pytest.raises(ConfigError) as info:
        NotifyWorker(box, cfg, silence_s=120)
    assert info.value.problems == [
        "notify.targets.phones.url: environment variable NOTIFY_NOWHERE_URL is not set: export it or use file = ..."
    ]
