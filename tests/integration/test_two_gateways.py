"""Two room PCs with the same shipped files never collide (issue 18, finding 3).

Each gateway is the shipped room template (deploy/gateway.toml: no id, no username) loaded on a PC with another host
name: its id is the host name and its broker account "gateway-<id>", which deploy/make-secrets.sh made for that room
PC. Both connect to one real mosquitto running the shipped config (TLS, accounts, ACL, client id = account), and both
stay connected and publish. A control with the same host name on both shows the test sees a collision when there is
one: the second login takes the first's client id over, and the first's last will says "offline".
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway.config
from devtools.localservices import Mosquitto
from gateway.config import Config
from gateway.sinks.mqtt import MqttSink
from tests.deploy.sitefiles import (
    make_secrets,
    password_key,
    read_env,
    room_config,
    screen,
    start_shipped_broker,
    until,
)

SITE = "clinic-a"
HOSTS = {"room-pc-a": "Room-PC-A.clinic.lan", "room-pc-b": "room-pc-b"}  # gateway id -> the PC's host name
ROUNDS = 5


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("two") / "site"
    args = ["--dir", str(folder), "--site", SITE, "--bind", "127.0.0.1"]
    done = make_secrets("central", *args, *[arg for gid in HOSTS for arg in ("--gateway", gid)])
    assert done.returncode == 0, f"deploy/make-secrets.sh failed:\n{done.stderr}"
    return folder


@pytest.fixture
def broker(site: Path, tmp_path: Path) -> Iterator[Mosquitto]:
    server = start_shipped_broker(site, tmp_path / "broker")
    try:
        yield server
    finally:
        server.stop()


def gateway_on(host_name: str, site: Path, broker: Mosquitto, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The shipped template as loaded on a PC named `host_name`, with that PC's password file from its bundle."""
    monkeypatch.setattr(socket, "gethostname", lambda: host_name)
    gid = gateway.config.host_gateway_id()
    password = folder / f"{gid}-mqtt-password"
    password.write_text(read_env(site / "passwords.env")[password_key(f"gateway-{gid}")] + "\n")
    cfg = room_config(site, broker, password)
    monkeypatch.undo()
    return cfg


def states(seen: list[tuple[str, bytes]], gid: str) -> list[str]:
    return [json.loads(p)["state"] for t, p in seen if t == f"infusion/{SITE}/_gateway/{gid}/status"]


@pytest.mark.integration
async def test_two_gateways_with_default_ids_stay_connected_and_both_publish(
    site: Path, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = [gateway_on(host, site, broker, tmp_path, monkeypatch) for host in HOSTS.values()]
    assert [c.gateway.id for c in configs] == list(HOSTS), "the id is not the host name"
    assert [c.mqtt.username for c in configs] == [f"gateway-{gid}" for gid in HOSTS]
    first, second = (MqttSink(c.mqtt, c.gateway.site, c.gateway.id, live_window_s=10) for c in configs)
    async with screen(broker, site, "reader-1", f"infusion/{SITE}/_gateway/+/status") as seen, first, second:
        for _ in range(ROUNDS):  # interleaved: a takeover would show as an "offline" will between them
            await first.publish_gateway_status()  # raises SinkUnavailable if its connection had gone
            await second.publish_gateway_status()
        want = ["online"] * (ROUNDS + 1)
        await until(lambda: all(states(seen, gid) == want for gid in HOSTS), f"not {len(want)} statuses each")
        assert {gid: states(seen, gid) for gid in HOSTS} == {gid: want for gid in HOSTS}


@pytest.mark.integration
async def test_control_the_same_host_name_twice_does_collide(
    site: Path, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two PCs both named room-pc-a (a cloned disk image): the test above would see it."""
    configs = [gateway_on("room-pc-a", site, broker, tmp_path, monkeypatch) for _ in range(2)]
    first, second = (MqttSink(c.mqtt, c.gateway.site, c.gateway.id, live_window_s=10) for c in configs)
    async with screen(broker, site, "reader-1", f"infusion/{SITE}/_gateway/+/status") as seen, first:
        await until(lambda: states(seen, "room-pc-a") == ["online"], "the first gateway's status did not arrive")
        async with second:
            await until(
                lambda: "offline" in states(seen, "room-pc-a"), "the second login did not take the first's client id"
            )
