"""`run`'s preflight resolves the notification targets' URLs with the other secrets (docs/notifications.md): a missing
one is named in the same one line as a missing password, before any port opens, and a resolved one is redacted."""

from __future__ import annotations

import pytest

from gateway.config import Config, InfluxSection, MqttSection, NotifySection, SecretRef, redact
from gateway.preflight import EXIT_CONFIG, Fatal, check_secrets


def _notify(*targets: str) -> NotifySection:
    return NotifySection.model_validate(
        {
            "targets": {name: {"url": {"env": f"PREFLIGHT_{name.upper()}_URL"}} for name in targets},
            "routes": [{"targets": list(targets)}],
        }
    )


def test_a_missing_notify_target_url_is_named_with_the_other_missing_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_MQTT_PW", raising=False)
    monkeypatch.delenv("PREFLIGHT_PHONES_URL", raising=False)
    monkeypatch.setenv("PREFLIGHT_STATION_URL", "json://127.0.0.1:9/station")
    cfg = Config(
        mqtt=MqttSection(username="gw", password=SecretRef(env="NO_SUCH_MQTT_PW")),
        influx=InfluxSection(api="v1", database="x"),
        notify=_notify("phones", "station"),
    )
    with pytest.raises(Fatal) as caught:
        check_secrets(cfg)
    assert caught.value.code == EXIT_CONFIG and "\n" not in caught.value.message
    assert "mqtt.password" in caught.value.message
    assert "notify.targets.phones.url: environment variable PREFLIGHT_PHONES_URL is not set" in caught.value.message
    assert "station" not in caught.value.message  # it resolved


def test_resolved_notify_target_urls_are_redacted_from_then_on(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "jsons://hooks.clinic.invalid/infusion/tk_preflight0token"
    monkeypatch.setenv("PREFLIGHT_PHONES_URL", url)
    check_secrets(Config(influx=InfluxSection(api="v1", database="x"), notify=_notify("phones")))
    assert redact(f"posting to {url} failed") == "posting to *** failed"
