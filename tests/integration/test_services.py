"""The fixtures are real: a broker routes messages, a database stores points, a pty passes every byte."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import serial
from paho.mqtt.enums import CallbackAPIVersion

from devtools.localservices import (
    Influxd,
    InfluxError,
    Mosquitto,
    ServiceUnavailable,
    find_free_port,
    mqtt_handshake,
)
from tests.helpers import PtyPair, read_exactly

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_123_456_789  # a nanosecond timestamp: precision=ns must keep every digit


class Client:
    """A paho client that connects and subscribes synchronously, collecting (topic, payload) pairs."""

    def __init__(self, broker: Mosquitto, client_id: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.got = threading.Event()
        self.subscribed = threading.Event()
        connected = threading.Event()
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: connected.set() if not rc.is_failure else None
        self.paho.on_subscribe = lambda *_: self.subscribed.set()
        self.paho.on_message = self._on_message
        self.paho.connect(broker.host, broker.port, keepalive=10)
        self.paho.loop_start()
        assert connected.wait(5), "no CONNACK from the broker"

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self.messages.append((msg.topic, bytes(msg.payload)))
        self.got.set()

    def subscribe(self, topic: str) -> None:
        self.paho.subscribe(topic, qos=1)
        assert self.subscribed.wait(5), "no SUBACK from the broker"

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def round_trip(broker: Mosquitto, payload: bytes) -> None:
    client = Client(broker, "fixture-test")
    try:
        client.subscribe("t/#")
        client.paho.publish("t/x", payload, qos=1).wait_for_publish(5)
        assert client.got.wait(5)
        assert client.messages == [("t/x", payload)]
    finally:
        client.close()


def test_mosquitto_routes_a_publish_to_a_subscriber(mosquitto: Mosquitto) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    round_trip(mosquitto, bytes(range(256)))


def test_mosquitto_restart_keeps_the_port(mosquitto: Mosquitto) -> None:
    port = mosquitto.port
    mosquitto.stop()
    assert not mosquitto.running and not mqtt_handshake(mosquitto.host, port)
    mosquitto.stop()  # twice is harmless
    mosquitto.start()
    assert mosquitto.port == port
    round_trip(mosquitto, b"after start")
    mosquitto.restart()
    assert mosquitto.port == port
    round_trip(mosquitto, b"after restart")


def post_lines(influxd: Influxd, db: str, lines: str) -> int:
    query = urllib.parse.urlencode({"db": db, "precision": "ns"})
    req = urllib.request.Request(f"{influxd.url}/write?{query}", data=lines.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(resp.status)


def test_influxd_stores_a_line_protocol_write(influxd: Influxd, influx_db: str) -> None:
    assert influxd.url == f"http://127.0.0.1:{influxd.port}"
    assert post_lines(influxd, influx_db, f'vitals,room=1 spo2=97i,pi=2.5,state="ok" {T0}\n') == 204
    series = influxd.query(influx_db, "SELECT spo2, pi, state FROM vitals WHERE room = '1'")
    columns = ["time", "spo2", "pi", "state"]
    assert series == [{"name": "vitals", "columns": columns, "values": [[T0, 97, 2.5, "ok"]]}]
    assert influxd.query(influx_db, "SELECT * FROM vitals WHERE room = '2'") == []


def test_influxd_restart_keeps_the_data_and_the_port(influxd: Influxd, influx_db: str) -> None:
    port = influxd.port
    lines = f"vitals,room=1 spo2=97i {T0}\nvitals,room=1 spo2=96i {T0 + 1}"
    assert post_lines(influxd, influx_db, lines) == 204
    influxd.restart()
    assert influxd.port == port
    assert influxd.query(influx_db, "SELECT spo2 FROM vitals")[0]["values"] == [[T0, 97], [T0 + 1, 96]]


def test_influxd_query_errors_raise(influxd: Influxd, influx_db: str) -> None:
    with pytest.raises(InfluxError, match="database not found"):
        influxd.query("no_such_db", "SELECT * FROM vitals")
    with pytest.raises(InfluxError):
        influxd.query(influx_db, "SELEKT nonsense")


def test_pty_passes_every_byte_unchanged_both_ways(pty_pair: PtyPair) -> None:
    assert Path(pty_pair.link).resolve() == Path(pty_pair.slave_path)
    data = bytes(range(256)) + b"\r\n\r\r\n\n" + bytes(range(255, -1, -1))
    with serial.Serial(str(pty_pair.link), baudrate=9600, timeout=2) as port:
        os.write(pty_pair.master_fd, data)  # device -> gateway
        assert port.read(len(data)) == data
        port.write(data)  # gateway -> device (host commands)
        port.flush()
        assert read_exactly(pty_pair.master_fd, len(data)) == data


def test_missing_binary_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(Mosquitto, "fallback", str(tmp_path / "nowhere" / "mosquitto"))
    monkeypatch.setattr(Influxd, "fallback", str(tmp_path / "nowhere" / "influxd"))
    with pytest.raises(ServiceUnavailable, match=r"mosquitto not found.*`sudo apt-get install -y mosquitto`"):
        Mosquitto(tmp_path).start()
    with pytest.raises(ServiceUnavailable, match=r"influxd not found.*`sudo apt-get install -y influxdb`"):
        Influxd(tmp_path).start()


def test_a_service_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        broker = Mosquitto(tmp_path / "given", port=taken)  # a port the caller chose is never changed
        with pytest.raises(ServiceUnavailable, match=r"(?s)exited with code \d+.*Address already in use"):
            broker.start()
        assert not broker.running

        # A port we chose is chosen again if someone took it before the first start.
        broker = Mosquitto(tmp_path / "chosen")
        with socket.socket() as thief:
            thief.bind(("127.0.0.1", broker.port))
            thief.listen()
            with broker:
                assert broker.port != thief.getsockname()[1] and mqtt_handshake(broker.host, broker.port)
        assert not broker.running


def test_context_manager_starts_and_stops(tmp_path: Path) -> None:
    port = find_free_port()
    with Influxd(tmp_path, port=port) as server:
        assert server.running and server.port == port
        server.create_database("ctx")
        assert server.query("ctx", "SHOW MEASUREMENTS") == []
    assert not server.running
    server.stop()


def test_a_service_that_never_answers_is_stopped_and_reports_its_log(tmp_path: Path) -> None:
    class Mute(Mosquitto):
        def _ready(self, timeout: float) -> bool:
            return False

    broker = Mute(tmp_path)
    expected = r"(?s)did not answer on mqtt://.* within 0.5 s.*mosquitto version .* running"
    with pytest.raises(ServiceUnavailable, match=expected):
        broker.start(timeout=0.5)
    assert not broker.running and not mqtt_handshake(broker.host, broker.port)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_services_die_with_their_parent(tmp_path: Path) -> None:
    """A test run killed with SIGKILL must not leave brokers and databases behind (mosquitto as root too)."""
    script = (
        "import sys, time; from pathlib import Path; from devtools.localservices import Influxd, Mosquitto\n"
        "m = Mosquitto(Path(sys.argv[1]) / 'm'); m.start(); i = Influxd(Path(sys.argv[1]) / 'i'); i.start()\n"
        "print(m._proc.pid, i._proc.pid, flush=True); time.sleep(60)\n"
    )
    argv = [sys.executable, "-c", script, str(tmp_path)]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids), "orphaned services outlived their killed parent"
    finally:
        parent.kill()
        parent.wait()
        for pid in filter(alive, pids):  # do not leak them when the test fails
            os.kill(pid, signal.SIGKILL)
