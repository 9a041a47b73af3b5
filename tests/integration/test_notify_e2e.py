"""Notifications end to end: Masimo bytes on a real pty -> the real gateway CLI (real mosquitto and influxd) ->
alarm -> Apprise -> a real HTTP receiver on loopback, a stand-in for a phone or chat service (json:// targets).
The test plays the oximeter and ends each desaturation only once what it waits for has arrived, so the order of
events does not depend on how fast the machine is (a scenario's clock would race the gateway's start-up).

- A desaturation's alarm reaches the nurses' phones; not acknowledged, its escalation reaches the charge nurse; its
  clearing reaches both and cancels what was left of the chain (the notify state in the outbox holds nothing more).
- The receiver refusing connections, then answering 500, and the gateway SIGKILLed in the middle: after the restart
  the alarm arrives, marked LATE with its age, and every alarm transition seen on MQTT reaches the receiver.

Waits are bounded and fail naming what is missing; nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from devices.base import Sample
from devices.registry import get_model
from gateway.config import MqttSection
from gateway.sinks.mqtt import subscribe
from simulators.serve import PtyEndpoint
from tests.helpers import start_gateway, stop_gateway, wait_for
from tests.integration.test_gateway_e2e import write_config
from tests.notify_receiver import Receiver

TOKEN = "s3cr3t-e2e-token-4711"  # in the targets' URLs: it must never reach the gateway's log

PROFILE = """
[alarms]
profile = "e2e-test"
tick_s = 0.1
[[alarms.rules]]
id = "spo2-low"
metric = "spo2"
below = 90
priority = "high"
delay_s = 0.5
clear_delay_s = 0.5
hysteresis = 1
"""


def notify_section(chain: bool) -> str:
    escalation = 'escalate_to = ["charge"]\nescalate_after_s = 2\nrepeat_every_s = 2\n' if chain else ""
    return f"""
[notify]
stale_after_s = 1
retry_max_s = 2
send_timeout_s = 10
[notify.targets.phones]
url = {{ env = "E2E_PHONES_URL" }}
max_messages = 100
[notify.targets.charge]
url = {{ env = "E2E_CHARGE_URL" }}
max_messages = 100
[[notify.routes]]
priorities = ["high"]
kinds = ["physiological"]
targets = ["phones"]
{escalation}"""


def setup(tmp_path: Path, mosquitto: Any, influxd: Any, db: str, chain: bool) -> tuple[Path, Path]:
    """The gateway's config and the oximeter's stable port name."""
    link = tmp_path / "room7-oximeter"
    return write_config(tmp_path, mosquitto.port, influxd.url, db, link, PROFILE + notify_section(chain)), link


class Oximeter:
    """A Rad-8 on a pty that sends, once a second, the SpO2 the test sets: the test decides when a desaturation ends."""

    def __init__(self, link: Path, spo2: float) -> None:
        self.endpoint = PtyEndpoint(link=link)
        self.spo2 = spo2
        self._model = get_model("masimo-ascii1")
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            metrics = {"spo2": self.spo2, "pulse_rate": 72.0, "perfusion_index": 3.5}
            self.endpoint.write(self._model.encode(Sample(metrics, device_time=datetime.now())))
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.endpoint.close()


def notify_state(tmp_path: Path) -> dict[str, Any]:
    db = sqlite3.connect(tmp_path / "data" / "outbox.sqlite3")
    try:
        row = db.execute("SELECT body FROM state WHERE name = 'notify'").fetchone()
    finally:
        db.close()
    assert row is not None, "the notify state was never saved"
    state: dict[str, Any] = json.loads(row[0])
    return state


async def test_an_alarm_reaches_the_phones_escalates_to_the_charge_nurse_and_its_clearing_ends_the_chain(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver()
    monkeypatch.setenv("E2E_PHONES_URL", receiver.url(f"phones-{TOKEN}"))
    monkeypatch.setenv("E2E_CHARGE_URL", receiver.url(f"charge-{TOKEN}"))
    config, link = setup(tmp_path, mosquitto, influxd, influx_db, chain=True)
    await receiver.start()
    oximeter = Oximeter(link, spo2=85)  # desaturated from the first reading on
    log = tmp_path / "gateway.log"
    proc = None
    try:
        proc = start_gateway(config, log=log)
        phones, charge = f"phones-{TOKEN}", f"charge-{TOKEN}"

        def titles(path: str) -> list[str]:
            return [r.title for r in receiver.to(path)]

        await wait_for(lambda: any(t.endswith("- ALARM") for t in titles(phones)), 40)
        raised = receiver.to(phones)[0]
        assert raised.title.startswith("[test-site] HIGH room 7 oximeter: spo2-low - ALARM"), raised.title
        assert "Value: spo2 8" in raised.message and "limit 90 %" in raised.message
        assert "infusion-telemetry ack --room 7 --alarm 7/oximeter/spo2-low" in raised.message
        assert raised.type == "failure"
        # Nobody acknowledges: the chain's first step goes to the charge nurse.
        await wait_for(lambda: any("ESCALATION 1: not acknowledged" in t for t in titles(charge)), 20)
        # The desaturation ends: both learn it, and the chain stops.
        oximeter.spo2 = 98
        await wait_for(lambda: any(t.endswith("- cleared") for t in titles(phones)), 40)
        await wait_for(lambda: any(t.endswith("- cleared") for t in titles(charge)), 10)
    finally:
        output = stop_gateway(proc) if proc is not None else ""
        await oximeter.close()
        await receiver.stop()
    assert proc.returncode == 0, output + log.read_text()
    state = notify_state(tmp_path)
    assert state["alarms"] == {} and state["queue"] == [], "a cleared alarm leaves no escalation pending"
    for path in (phones, charge):
        after = [r.title for r in receiver.to(path)]
        last_clear = max(i for i, t in enumerate(after) if t.endswith("- cleared"))
        assert not [t for t in after[last_clear + 1 :] if "not acknowledged" in t], after
    assert TOKEN not in log.read_text(), "a target's URL token reached the log"


async def test_an_outage_and_a_sigkill_deliver_late_marked_and_lose_nothing(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver()  # not listening yet: connections are refused
    monkeypatch.setenv("E2E_PHONES_URL", receiver.url(f"phones-{TOKEN}"))
    monkeypatch.setenv("E2E_CHARGE_URL", receiver.url(f"charge-{TOKEN}"))
    config, link = setup(tmp_path, mosquitto, influxd, influx_db, chain=False)
    events: list[dict[str, Any]] = []

    async def collect() -> None:
        cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
        async with subscribe(cfg, ["infusion/test-site/7/alarms/events"], "notify-e2e-collector") as messages:
            async for _topic, payload in messages:
                events.append(json.loads(payload))

    collecting = asyncio.create_task(collect())
    oximeter = Oximeter(link, spo2=85)  # desaturated from the first reading on
    log = tmp_path / "gateway.log"
    proc = None
    phones = f"phones-{TOKEN}"
    try:
        proc = start_gateway(config, log=log)
        await wait_for(lambda: any(e["transition"] == "raised" for e in events), 40)
        await wait_for(lambda: "notify phones:" in log.read_text(), 20)  # an attempt was refused
        receiver.status = 500
        await receiver.start()
        await wait_for(lambda: receiver.failed >= 2, 20)  # and two more answered 500
        proc.kill()  # SIGKILL in the middle of the outage: no flush, no goodbye
        proc.wait(timeout=10)
        receiver.status = 200
        proc = start_gateway(config, log=log)
        await wait_for(lambda: any("- ALARM" in r.title for r in receiver.to(phones)), 40)
        oximeter.spo2 = 98  # the desaturation ends only now
        await wait_for(lambda: any(e["transition"] == "cleared" for e in events), 40)
        await wait_for(lambda: any(r.title.endswith("- cleared") for r in receiver.to(phones)), 20)
    finally:
        output = stop_gateway(proc) if proc is not None else ""
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        await oximeter.close()
        await receiver.stop()
    assert proc.returncode == 0, output + log.read_text()
    late = next(r for r in receiver.to(phones) if "- ALARM" in r.title)
    assert late.title.startswith("LATE "), late.title
    assert " ago (delivered late" in late.message, late.message
    # Every notified transition of a routed alarm reached the receiver (at least once; a repeat has the same ref).
    notified = {"raised", "escalated", "acknowledged", "cleared", "suspended"}
    expected = {f"{e['id']}>phones" for e in events if e["transition"] in notified and e["priority"] == "high"}
    got = [r.ref for r in receiver.to(phones)]
    assert expected and expected <= set(got), (sorted(expected), got)
    assert set(got) <= expected, f"messages about nothing seen on MQTT: {sorted(set(got) - expected)}"
    assert receiver.to(f"charge-{TOKEN}") == []
    assert TOKEN not in log.read_text(), "a target's URL token reached the log"
