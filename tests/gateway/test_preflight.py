"""What `run` checks before opening a port, and what a stopped task means for the exit code (issue 12, obs. 6)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, InfluxSection, MqttSection, SecretRef, redact
from gateway.preflight import (
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_STORAGE,
    Fatal,
    check_data_dir,
    check_secrets,
    task_fatal,
)


def _config(**influx: object) -> Config:
    return Config(influx=InfluxSection(api="v1", database="x", **influx))


def test_every_missing_secret_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_MQTT_PW", raising=False)
    monkeypatch.delenv("NO_SUCH_INFLUX_PW", raising=False)
    cfg = Config(
        mqtt=MqttSection(username="gw", password=SecretRef(env="NO_SUCH_MQTT_PW")),
        influx=InfluxSection(api="v1", database="x", username="u", password=SecretRef(env="NO_SUCH_INFLUX_PW")),
    )
    with pytest.raises(Fatal) as caught:
        check_secrets(cfg)
    assert caught.value.code == EXIT_CONFIG and "\n" not in caught.value.message
    assert "mqtt.password" in caught.value.message and "influx.password" in caught.value.message


def test_resolved_secrets_and_the_url_password_are_redacted_from_then_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFLIGHT_PW", "resolved-pw-8080")
    cfg = _config(url="http://u:url-pw-3131@127.0.0.1:9", username="u", password=SecretRef(env="PREFLIGHT_PW"))
    check_secrets(cfg)
    assert redact("login resolved-pw-8080 / url-pw-3131") == "login *** / ***"


def test_a_data_dir_that_cannot_be_made_is_a_storage_fatal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(Fatal) as caught:
        check_data_dir(tmp_path / "file" / "data")
    assert caught.value.code == EXIT_STORAGE and "gateway.data_dir" in caught.value.message
    check_data_dir(tmp_path / "fresh" / "data")  # made, written, fsynced, and the probe removed
    assert list((tmp_path / "fresh" / "data").iterdir()) == []


@pytest.mark.parametrize(
    ("task", "exc", "code"),
    [
        ("outbox", sqlite3.OperationalError("disk I/O error"), EXIT_STORAGE),
        ("status", sqlite3.OperationalError("database or disk is full"), EXIT_STORAGE),
        ("sink-mqtt", ConfigError("secrets", ["mqtt.password: gone"]), EXIT_CONFIG),
        ("sink-influx", OSError(24, "Too many open files"), EXIT_INTERNAL),
        ("device-1/ox", None, EXIT_INTERNAL),  # a task that returned: never a clean stop
    ],
)
def test_a_stopped_task_maps_to_its_exit_code(task: str, exc: BaseException | None, code: int) -> None:
    fatal = task_fatal(task, exc, Path("/data/outbox.sqlite3"))
    assert fatal.code == code and "\n" not in fatal.message
    if code != EXIT_CONFIG:  # a config problem carries its own fix, from ConfigError
        assert "->" in fatal.message
