"""Config validation: golden bad configs with the error text a clinic IT person would read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, resolve_secret

HERE = Path(__file__).parent
BAD = sorted((HERE / "bad_configs").glob("*.toml"))
REPO = HERE.parent.parent


def _expected(path: Path) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# expect:")]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_names_field_and_fix(path: Path) -> None:
    expected = _expected(path)
    assert expected, f"{path.name} has no '# expect:' line"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_example_config_is_valid() -> None:
    cfg = load_config(REPO / "examples" / "gateway.toml")
    assert [d.key for d in cfg.devices] == ["1/oximeter", "2/oximeter"]
    assert cfg.influx.api == "v2"


def test_environment_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFUSION_MQTT__HOST", "broker.example")
    monkeypatch.setenv("INFUSION_MQTT__PORT", "1884")
    cfg = load_config(REPO / "examples" / "gateway.toml")
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker.example", 1884)
    assert cfg.gateway.site == "clinic-a"  # untouched values still come from the file


def test_secrets_resolve_from_env_and_file_and_are_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("file-secret-123\n")
    config = tmp_path / "gw.toml"
    config.write_text(
        f"""
[mqtt]
username = "gw"
password = {{ env = "TEST_MQTT_PASSWORD" }}
[influx]
api = "v2"
org = "o"
bucket = "b"
token = {{ file = "{secret_file}" }}
"""
    )
    monkeypatch.setenv("TEST_MQTT_PASSWORD", "env-secret-456")
    cfg = load_config(config)
    mqtt_password = resolve_secret(cfg.mqtt.password, "mqtt.password")
    token = resolve_secret(cfg.influx.token, "influx.token")
    assert mqtt_password is not None and token is not None
    assert mqtt_password.get_secret_value() == "env-secret-456"
    assert token.get_secret_value() == "file-secret-123"
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(config)],
        capture_output=True,
        text=True,
        env={"TEST_MQTT_PASSWORD": "env-secret-456", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "TEST_MQTT_PASSWORD" in out.stdout  # where the secret comes from is shown...
    assert "env-secret-456" not in out.stdout + out.stderr  # ...the secret never is
    assert "file-secret-123" not in out.stdout + out.stderr


def test_missing_secret_names_the_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    config = tmp_path / "gw.toml"
    config.write_text('[influx]\napi = "v2"\norg = "o"\nbucket = "b"\ntoken = { env = "NOT_SET_ANYWHERE" }\n')
    cfg = load_config(config)
    with pytest.raises(ConfigError, match=r"influx.token: environment variable NOT_SET_ANYWHERE is not set"):
        resolve_secret(cfg.influx.token, "influx.token")


def test_check_config_cli_exits_nonzero_with_errors() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(HERE / "bad_configs" / "unknown_key.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "mqtt.hots: unknown key" in out.stderr
    assert out.stdout == ""
