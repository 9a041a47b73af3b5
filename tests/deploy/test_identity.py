"""A room PC's identity (issue 18, finding 3): the gateway id defaults to the host name, the broker account to
"gateway-<id>"; both can be set, and an explicit username is kept."""

from __future__ import annotations

import socket

import pytest

from gateway.config import Config, host_gateway_id


@pytest.mark.parametrize(
    ("host", "gid"),
    [
        ("room-pc-3", "room-pc-3"),
        ("Room-PC-3.clinic.lan", "room-pc-3"),
        ("RAUM_2", "raum_2"),
        ("pc 7", "pc-7"),
        ("a" * 40, "a" * 32),
    ],
)
def test_the_id_is_the_host_name_as_a_valid_name(host: str, gid: str) -> None:
    assert host_gateway_id(host) == gid


def config(monkeypatch: pytest.MonkeyPatch, host: str, **sections: object) -> Config:
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    monkeypatch.setenv("TEST_SECRET", "x")
    influx = {"org": "o", "bucket": "b", "token": {"env": "TEST_SECRET"}}
    return Config(influx=influx, **sections)


def test_defaults_follow_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(monkeypatch, "Room-PC-3.clinic.lan", mqtt={"password": {"env": "TEST_SECRET"}})
    assert cfg.gateway.id == "room-pc-3" and cfg.mqtt.username == "gateway-room-pc-3"


def test_an_explicit_id_and_username_win(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(monkeypatch, "pc", gateway={"id": "room-9"}, mqtt={"password": {"env": "TEST_SECRET"}})
    assert cfg.gateway.id == "room-9" and cfg.mqtt.username == "gateway-room-9"
    monkeypatch.setenv("INFUSION_GATEWAY__ID", "room-10")  # compose-style override
    cfg = config(monkeypatch, "pc", mqtt={"password": {"env": "TEST_SECRET"}})
    assert cfg.mqtt.username == "gateway-room-10"
    cfg = config(monkeypatch, "pc", mqtt={"username": "nurse-station-1", "password": {"env": "TEST_SECRET"}})
    assert cfg.mqtt.username == "nurse-station-1"


def test_no_password_no_account(monkeypatch: pytest.MonkeyPatch) -> None:
    """An anonymous broker (a lab, the tests' own) gets no username."""
    assert config(monkeypatch, "pc").mqtt.username is None
