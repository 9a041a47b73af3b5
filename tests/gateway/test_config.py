"""Config validation: golden bad configs with the error text a clinic IT person would read."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import (
    ConfigError,
    InfluxSection,
    RedactingFilter,
    load_config,
    redact,
    register_secret,
    resolve_secret,
)
from gateway.sinks import SinkUnavailable
from gateway.sinks.influx import InfluxSink

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


# --- redaction (issue 12, observation 7) and environment overrides that are not JSON (observation 6) ------------


def test_redact_removes_url_userinfo_and_registered_secrets() -> None:
    register_secret("token-abc-991")
    register_secret("ab")  # too short to blank out of every line: never registered
    text = "connect http://reader:p@ss@db.local:8086/write with token-abc-991, then https://host/x?a=b ab"
    assert redact(text) == "connect http://***@db.local:8086/write with ***, then https://host/x?a=b ab"


def test_check_config_prints_the_influx_url_without_its_userinfo(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('[influx]\napi = "v1"\nurl = "http://reader:pw-in-url-123@db.local:8086"\ndatabase = "x"\n')
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["influx"]["url"] == "http://***@db.local:8086"
    assert "pw-in-url-123" not in out.stdout + out.stderr


def test_every_log_record_is_redacted_message_and_traceback() -> None:
    register_secret("s3cret-value-42")
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("some.library")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad login to https://u:s3cret-value-42@influx.local:8086")
        except ValueError:
            logger.exception("retrying %s with %s", "http://user:pw-99@h:1/write", "s3cret-value-42")
    finally:
        logger.removeHandler(handler)
    assert isinstance(handler.stream, io.StringIO)
    written = handler.stream.getvalue()
    assert "ValueError: bad login to https://***@influx.local:8086" in written  # the traceback is still there
    assert "retrying http://***@h:1/write with ***" in written
    assert "s3cret-value-42" not in written and "pw-99" not in written


async def test_an_unreachable_influxdb_is_reported_without_the_urls_userinfo() -> None:
    sink = InfluxSink(InfluxSection(api="v1", url="http://reader:url-pw-5521@127.0.0.1:9", database="x"))
    with pytest.raises(SinkUnavailable) as caught:  # found on connect now: up only once the server answers
        async with sink:
            pass
    assert "url-pw-5521" not in str(caught.value) and "http://***@127.0.0.1:9" in str(caught.value)


def test_an_environment_override_that_is_not_json_is_a_named_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It was a pydantic_settings traceback."""
    config = tmp_path / "gw.toml"
    config.write_text('[influx]\napi = "v1"\ndatabase = "x"\n')
    monkeypatch.setenv("INFUSION_DEVICES", "room 1 oximeter")
    with pytest.raises(ConfigError, match=r"INFUSION_DEVICES: not valid JSON .* -> give the field as JSON"):
        load_config(config)


def test_environment_overrides_reach_nested_tables_merge_with_json_and_ignore_case(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Compose's way: `INFUSION_<SECTION>__<KEY>__...`, a secret reference included, over the file's values; a section
    given as JSON merges with the nested variables; variable names and JSON keys in any case."""
    secret = tmp_path / "mqtt-password"
    secret.write_text("pw-from-file\n")
    config = tmp_path / "gw.toml"
    config.write_text('[gateway]\nid = "room-1"\n[mqtt]\nport = 1883\n[influx]\napi = "v1"\ndatabase = "x"\n')
    monkeypatch.setenv("INFUSION_MQTT", '{"HOST": "broker.example", "Keepalive_S": 60}')
    monkeypatch.setenv("infusion_mqtt__port", "1884")
    monkeypatch.setenv("INFUSION_MQTT__PASSWORD__FILE", str(secret))
    monkeypatch.setenv("INFUSION_COMMANDS__ROLES__NURSE", '["acknowledge"]')
    cfg = load_config(config)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive_s) == ("broker.example", 1884, 60)
    assert cfg.mqtt.password is not None and cfg.mqtt.password.file == secret
    assert cfg.mqtt.username == "gateway-room-1"  # the account of a gateway given a password, as in the file
    assert cfg.commands.roles == {"nurse": ("acknowledge",)}


def test_an_override_that_is_not_json_where_text_is_allowed_is_an_ordinary_field_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """[mqtt.tls] may be absent (a union with None): text that is not JSON reaches validation, which names the field;
    a nested variable for a field that must be JSON (a list) is named by its section's variable."""
    config = tmp_path / "gw.toml"
    config.write_text('[influx]\napi = "v1"\ndatabase = "x"\n')
    monkeypatch.setenv("INFUSION_MQTT__TLS", "yes")
    with pytest.raises(ConfigError, match=r"mqtt\.tls: Input should be a valid dictionary"):
        load_config(config)
    monkeypatch.delenv("INFUSION_MQTT__TLS")
    monkeypatch.setenv("INFUSION_NOTIFY__ROUTES", "phones")
    with pytest.raises(ConfigError, match=r"INFUSION_NOTIFY: not valid JSON .* -> give the field as JSON"):
        load_config(config)
