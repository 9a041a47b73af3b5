"""The command channel and the MQTT link against a real mosquitto and the real gateway CLI, with no device talking:

- a retained command is never executed (not at start, not on reconnect) and the gateway clears it;
- a payload of nested `[` is answered and the listener goes on answering;
- a client that takes the gateway's client id over is noticed: the gateway reconnects, and a link that keeps being
  taken raises `broker_lost`;
- a frozen broker (SIGSTOP) is noticed within the keepalive although nothing is being published.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devtools.localservices import find_free_port
from gateway.commands import command_payload
from gateway.config import MqttSection
from gateway.sinks.mqtt import request, subscribe
from tests.helpers import health, start_gateway, stop_gateway, wait_for
from tests.integration.test_gateway_e2e import write_config

GATEWAY_CLIENT_ID = "infusion-gw-test-site-gw-e2e"
# The absent device's device_disconnected alarm is published 2 s after start; after that nothing is published at
# all, so only the gateway's own watch on its link can notice a loss.
IDLE_AFTER_S = 4.0


def mqtt_link(port: int) -> str | None:
    links = health(port).get("links") or {}
    value = links.get("mqtt")
    return None if value is None else str(value)


class Watcher:
    def __init__(self, port: int) -> None:
        self.cfg = MqttSection(host="127.0.0.1", port=port)
        self.messages: list[tuple[str, bytes]] = []

    async def run(self) -> None:
        async with subscribe(self.cfg, ["infusion/#"], f"watcher-{uuid.uuid4().hex[:6]}") as messages:
            async for topic, payload in messages:
                self.messages.append((topic, payload))

    def alarms(self, rule: str) -> list[str]:
        return [
            json.loads(p)["transition"]
            for t, p in self.messages
            if t.endswith("/alarms/events") and json.loads(p)["rule"] == rule
        ]

    async def command(self, topic: str, **fields: Any) -> dict[str, Any]:
        command_id = uuid.uuid4().hex[:12]
        raw = await request(self.cfg, topic, command_payload(id=command_id, **fields), command_id, 10.0)
        reply: dict[str, Any] = json.loads(raw)
        return reply


@pytest.fixture
def idle_gateway_config(tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str) -> tuple[Path, int]:
    """A gateway whose one device is absent (a port that does not exist): nothing is ever published but status."""
    port = find_free_port()
    return write_config(tmp_path, mosquitto.port, influxd.url, influx_db, tmp_path / "absent", health_port=port), port


async def test_a_retained_command_is_never_executed_and_is_cleared(
    mosquitto: Any, idle_gateway_config: tuple[Path, int]
) -> None:
    """Demonstration 1: a retained start_session ran on every gateway restart and reconnect."""
    config, _ = idle_gateway_config
    cfg = MqttSection(host="127.0.0.1", port=mosquitto.port)
    topic = "infusion/test-site/7/command"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="attacker") as attacker:
        retained = command_payload(id="r-1", action="start_session", operator_role="nurse")
        await attacker.publish(topic, retained, qos=1, retain=True)
    watcher = Watcher(mosquitto.port)
    watching = asyncio.create_task(watcher.run())
    proc = start_gateway(config)
    try:
        await wait_for(lambda: any(t == topic and p == b"" for t, p in watcher.messages), 20)
        assert not any(t.endswith("/session") for t, _ in watcher.messages)
        assert not any(t == f"{topic}/reply" for t, _ in watcher.messages)  # not even answered: never acted on
        # Still listening: a live command is carried out once.
        reply = await watcher.command(topic, action="start_session", operator_role="nurse")
        assert reply["ok"] is True, reply
        async with subscribe(cfg, [topic], "retained-check") as messages:  # nothing retained is left
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for _t, payload in messages:
                        assert payload == b"", "a retained command is still on the broker"
    finally:
        output = stop_gateway(proc)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert "retained command message ignored and cleared" in output
    assert proc.returncode == 0, output


async def test_nested_brackets_are_answered_and_the_listener_goes_on(
    mosquitto: Any, idle_gateway_config: tuple[Path, int]
) -> None:
    """Demonstration 3: 2,000 bytes of `[` killed the command listener silently."""
    config, health_port = idle_gateway_config
    watcher = Watcher(mosquitto.port)
    watching = asyncio.create_task(watcher.run())
    proc = start_gateway(config)
    topic = "infusion/test-site/7/command"
    try:
        await wait_for(lambda: mqtt_link(health_port) == "up", 20)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="fuzzer") as fuzzer:
            await fuzzer.subscribe(f"{topic}/reply", qos=1)
            await fuzzer.publish(topic, b"[" * 2000, qos=1)
            async with asyncio.timeout(10):
                async for message in fuzzer.messages:
                    assert isinstance(message.payload, bytes)
                    reply = json.loads(message.payload)
                    assert reply["ok"] is False and "nested" in reply["reason"]
                    break
        reply = await watcher.command(topic, action="start_session", operator_role="nurse")
        assert reply["ok"] is True, reply
        assert mqtt_link(health_port) == "up"
    finally:
        output = stop_gateway(proc)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert proc.returncode == 0, output


async def test_a_taken_client_id_is_noticed_and_repeated_takeovers_raise_broker_lost(
    mosquitto: Any, idle_gateway_config: tuple[Path, int]
) -> None:
    """Demonstration 4: after a client-id takeover the gateway said online for 81 s, with no broker_lost."""
    config, health_port = idle_gateway_config
    watcher = Watcher(mosquitto.port)
    watching = asyncio.create_task(watcher.run())
    proc = start_gateway(config)
    try:
        await wait_for(lambda: mqtt_link(health_port) == "up", 20)
        for _ in range(4):  # an impostor keeps taking the id; each time the gateway takes it back
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier=GATEWAY_CLIENT_ID):
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.5)
        await wait_for(lambda: "raised" in watcher.alarms("broker_lost"), 30)
        await wait_for(lambda: mqtt_link(health_port) == "up", 10)  # and it is connected again
    finally:
        output = stop_gateway(proc)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert "MQTT link lost" in output
    assert proc.returncode == 0, output


async def test_a_frozen_broker_is_noticed_within_the_keepalive_with_no_device_talking(
    mosquitto: Any, idle_gateway_config: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Demonstration 4 (idle link): an idle gateway did not notice its broker was gone."""
    config, health_port = idle_gateway_config
    monkeypatch.setenv("INFUSION_MQTT__KEEPALIVE_S", "5")
    monkeypatch.setenv("INFUSION_GATEWAY__STATUS_INTERVAL_S", "60")  # no status publish to stumble on the loss
    proc = start_gateway(config)
    frozen = False
    try:
        await wait_for(lambda: mqtt_link(health_port) == "up", 20)
        await asyncio.sleep(IDLE_AFTER_S)
        os.kill(mosquitto.pid, signal.SIGSTOP)
        frozen = True
        await wait_for(lambda: mqtt_link(health_port) == "down", 15)  # keepalive 5 s: a ping unanswered
        os.kill(mosquitto.pid, signal.SIGCONT)
        frozen = False
        await wait_for(lambda: mqtt_link(health_port) == "up", 30)
    finally:
        if frozen:
            os.kill(mosquitto.pid, signal.SIGCONT)
        output = stop_gateway(proc)
    assert proc.returncode == 0, output


async def test_an_idle_gateway_notices_a_broker_restart_at_once(
    mosquitto: Any, idle_gateway_config: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Demonstration 4: with every device silent the gateway did not reconnect after a broker restart (its log said
    only "MQTT command listener stopped") and /health said online with mqtt up."""
    config, health_port = idle_gateway_config
    monkeypatch.setenv("INFUSION_GATEWAY__STATUS_INTERVAL_S", "60")
    proc = start_gateway(config)
    try:
        await wait_for(lambda: mqtt_link(health_port) == "up", 20)
        await asyncio.sleep(IDLE_AFTER_S)
        mosquitto.stop()
        await wait_for(lambda: mqtt_link(health_port) == "down", 5)
        mosquitto.restart()
        await wait_for(lambda: mqtt_link(health_port) == "up", 15)
        watcher = Watcher(mosquitto.port)  # and it listens to commands again
        watching = asyncio.create_task(watcher.run())
        try:
            reply = await watcher.command("infusion/test-site/7/command", action="start_session", operator_role="nurse")
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        assert reply["ok"] is True, reply
    finally:
        output = stop_gateway(proc)
    assert proc.returncode == 0, output
