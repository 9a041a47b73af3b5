"""End to end: simulated Masimo bytes on a real pty -> the real gateway CLI -> real mosquitto and influxd.

Every reading the simulator wrote is counted on MQTT and in InfluxDB, with its values.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from devices.base import Reading
from devices.registry import get_model
from devtools.localservices import find_free_port
from gateway.config import MqttSection
from gateway.envelope import GatewayStatusMessage, ReadingMessage, StatusMessage
from gateway.sinks.mqtt import subscribe
from simulators.scenarios import load_scenario
from simulators.serve import DeviceSimulator, PtyEndpoint
from tests.helpers import start_gateway, stop_gateway, wait_for, write_gateway_config

N = 40


def write_config(
    tmp_path: Path, mqtt_port: int, influx_url: str, db: str, port: Path, extra: str = "", health_port: int = 0
) -> Path:
    """One Masimo oximeter in room 7 on `port`; `extra` follows its [[devices]] table."""
    device = f'[[devices]]\nroom = "7"\nname = "oximeter"\nmodel = "masimo-ascii1"\nport = "{port}"\n{extra}'
    return write_gateway_config(
        tmp_path, "gw-e2e", mqtt_port, influx_url, db, device, health_port, gateway_extra="status_interval_s = 1"
    )


class Collector:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m.get("type") == kind]

    async def run(self, port: int) -> None:
        async with subscribe(MqttSection(host="127.0.0.1", port=port), ["infusion/#"], "test-collector") as msgs:
            async for topic, payload in msgs:
                self.messages.append((topic, json.loads(payload)))


async def test_every_simulated_reading_reaches_mqtt_and_influx(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    model = get_model("masimo-ascii1")
    link = tmp_path / "serial-by-id-room7"
    endpoint = PtyEndpoint(link=link)
    health_port = find_free_port()
    config = write_config(tmp_path, mosquitto.port, influxd.url, influx_db, link, health_port=health_port)
    collector = Collector()
    collecting = asyncio.create_task(collector.run(mosquitto.port))
    proc = start_gateway(config)
    try:
        await wait_for(lambda: any(m.get("state") == "connected" for m in collector.of_type("status")), 20)

        written: list[bytes] = []

        def write(frame: bytes) -> None:
            written.append(frame)
            endpoint.write(frame)

        sim = DeviceSimulator(model, load_scenario("desaturation"), seed=7, speed=20.0)
        await sim.run(write, duration_s=None, count=N)
        expected = [e for e in model.driver().feed(b"".join(written), 0.0) if isinstance(e, Reading)]
        assert len(expected) == N

        await wait_for(lambda: len(collector.of_type("reading")) >= N, 60)
        readings = collector.of_type("reading")
        assert len(readings) == N  # exactly once here: nothing was redelivered on a healthy link
        assert [r["metrics"] for r in readings] == [dict(e.metrics) for e in expected]
        for r in readings:
            msgspec.convert(r, ReadingMessage)
            assert (r["site"], r["room"], r["device"], r["model"]) == ("test-site", "7", "oximeter", "masimo-ascii1")
            assert r["units"]["spo2"] == "%" and r["mdc"]["spo2"] == 150456
        seqs = [r["seq"] for r in readings]
        assert seqs == sorted(seqs) and len(set(seqs)) == N
        for s in collector.of_type("status"):
            msgspec.convert(s, StatusMessage)

        def stored() -> int:
            rows = influxd.query(influx_db, 'SELECT count("seq") FROM "vitals"')
            return int(rows[0]["values"][0][1]) if rows else 0

        await wait_for(lambda: stored() == N, 60)
        rows = influxd.query(influx_db, 'SELECT "spo2", "pulse_rate", "perfusion_index", "seq" FROM "vitals"')
        by_seq = {int(v[4]): v[1:4] for v in rows[0]["values"]}
        for r in readings:
            m = r["metrics"]
            assert by_seq[r["seq"]] == [m.get("spo2"), m.get("pulse_rate"), m.get("perfusion_index")]
        # The gateway's own history, for its dashboard: counters land in the `gateway` measurement.
        counted = f'SELECT "received", "state" FROM "gateway" WHERE "received" >= {N} AND "written" > 0'
        await wait_for(lambda: bool(influxd.query(influx_db, counted)), 15)
        assert influxd.query(influx_db, counted)[0]["values"][-1][2] == "online"
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/health", timeout=5) as resp:
            health = json.loads(resp.read())
        assert resp.status == 200 and health["state"] == "online"
        assert health["counters"]["written"] >= N and health["links"]["7/oximeter"] == "ok"

        online = [m for _, m in collector.messages if m.get("type") == "gateway" and m.get("state") == "online"]
        assert online
        msgspec.convert(online[-1], GatewayStatusMessage)

        # The terminal wall shows the room from what is on the broker.
        wall = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "watch",
                "--host",
                "127.0.0.1",
                "--port",
                str(mosquitto.port),
                "--site",
                "test-site",
                "--once",
                "1.5",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": "120"},
            check=False,
        )
        assert wall.returncode == 0, wall.stderr
        assert "room 7" in wall.stdout and "gateway gw-e2e: online" in wall.stdout
        assert "NO DATA" in wall.stdout  # the simulator has stopped: no old number is shown as live

        # Infusion sessions from the CLI, answered by the gateway over MQTT.
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            broker = ["--host", "127.0.0.1", "--port", str(mosquitto.port), "--site", "test-site"]
            return subprocess.run(
                [sys.executable, "-m", "gateway", *args, *broker],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )

        started = cli("session", "start", "--room", "7", "--role", "nurse")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["reason"].startswith("session 7-")
        again = cli("session", "start", "--room", "7", "--role", "nurse")
        assert again.returncode == 1 and "already has a session" in again.stdout
        unknown = cli("ack", "--room", "7", "--alarm", "7/oximeter/spo2-low", "--role", "nurse")
        assert unknown.returncode == 1 and "no such active alarm" in unknown.stdout
        assert cli("session", "stop", "--room", "7", "--role", "nurse").returncode == 0
    finally:
        output = stop_gateway(proc)
        endpoint.close()
    assert proc.returncode == 0, output
    await wait_for(
        lambda: any(m.get("type") == "gateway" and m.get("state") == "offline" for _, m in collector.messages), 10
    )
    collecting.cancel()
    await asyncio.gather(collecting, return_exceptions=True)


async def test_unplugged_pty_gives_disconnected_status_then_recovers(
    tmp_path: Path, mosquitto: Any, influxd: Any, influx_db: str
) -> None:
    """A pty that closes is noticed at once; a new one at the same path is picked up again."""
    model = get_model("masimo-ascii1")
    link = tmp_path / "serial-by-id-room7"
    endpoint = PtyEndpoint(link=link)
    config = write_config(tmp_path, mosquitto.port, influxd.url, influx_db, link)
    collector = Collector()
    collecting = asyncio.create_task(collector.run(mosquitto.port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def states() -> list[str]:
            return [m["state"] for m in collector.of_type("status")]

        await wait_for(lambda: "connected" in states(), 20)
        sim = DeviceSimulator(model, load_scenario("baseline"), seed=1, speed=20.0)
        await sim.run(endpoint.write, duration_s=None, count=5)
        await wait_for(lambda: len(collector.of_type("reading")) == 5, 10)
        endpoint.close()
        await wait_for(lambda: "disconnected" in states(), 10)  # a lost port is noticed, not waited out
        endpoint = PtyEndpoint(link=link)
        await wait_for(lambda: states().count("connected") >= 2, 20)
        await sim.run(endpoint.write, duration_s=None, count=5)
        await wait_for(lambda: len(collector.of_type("reading")) == 10, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        endpoint.close()
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
