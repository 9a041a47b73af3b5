"""The fixtures are real: a broker that routes messages, a database that stores points, a pty that passes bytes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import serial

from gateway.localservices import Influxd, Mosquitto, mqtt_handshake
from tests.conftest import PtyPair


def test_mosquitto_routes_messages_and_restarts_on_the_same_port(mosquitto: Mosquitto) -> None:
    got = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fixture-test")
    client.on_message = lambda _c, _u, msg: got.set() if msg.payload == b"hello" else None
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    client.subscribe("t/#", qos=1)
    time.sleep(0.2)
    client.publish("t/x", b"hello", qos=1).wait_for_publish(5)
    assert got.wait(5)
    client.loop_stop()
    client.disconnect()
    port = mosquitto.port
    mosquitto.stop()
    assert not mqtt_handshake(mosquitto.host, port)
    mosquitto.start()
    assert mosquitto.port == port and mqtt_handshake(mosquitto.host, port)


def test_influxd_stores_points_and_keeps_them_across_restart(influxd: Influxd, influx_db: str) -> None:
    influxd.write(influx_db, "vitals,room=1 spo2=97 1700000000000000000")
    assert influxd.query(influx_db, "SELECT spo2 FROM vitals")[0]["values"] == [[1700000000000000000, 97]]
    influxd.restart()
    assert influxd.query(influx_db, "SELECT spo2 FROM vitals")[0]["values"] == [[1700000000000000000, 97]]


def test_pty_passes_every_byte_unchanged_both_ways(pty_pair: PtyPair) -> None:
    data = bytes(range(256)) + b"\r\n\r\n"
    with serial.Serial(str(pty_pair.link), timeout=2) as port:
        os.write(pty_pair.master_fd, data)
        assert port.read(len(data)) == data
        port.write(b"\x7d\x81\xa1\r\n")
        port.flush()
        assert os.read(pty_pair.master_fd, 64) == b"\x7d\x81\xa1\r\n"
    assert Path(pty_pair.link).resolve() == Path(pty_pair.slave_path)
