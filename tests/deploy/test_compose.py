"""docker-compose.yml checked by a real compose parser (Debian's docker-compose runs `config` without an engine),
every mounted file checked to exist, and the compose gateway configs validated by the gateway itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).parent.parent.parent


def example_env() -> dict[str, str]:
    env = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def compose_config(env: dict[str, str], profile: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose not found: install it with `sudo apt-get install -y docker-compose`", pytrace=False)
    return subprocess.run(
        [
            binary,
            "--project-directory",
            str(REPO),
            "-f",
            str(REPO / "docker-compose.yml"),
            "--profile",
            profile,
            "config",
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
        check=False,
        timeout=60,
    )


@pytest.fixture(scope="module", params=["hardware", "simulated"])
def rendered(request: pytest.FixtureRequest) -> dict[str, Any]:
    out = compose_config(example_env(), request.param)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = yaml.safe_load(out.stdout)
    return doc


def test_services_restart_and_health(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert {"mosquitto", "influxdb", "grafana", "gateway", "simulators", "gateway-sim"} <= set(services)
    for name in ("mosquitto", "influxdb", "gateway", "gateway-sim"):
        assert services[name].get("healthcheck"), f"{name} has no healthcheck"
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", f"{name} has no restart policy"
    assert services["gateway"]["devices"], "the hardware gateway maps its serial devices"
    assert services["grafana"]["image"].startswith("grafana/grafana-oss:11")
    env = services["influxdb"]["environment"]
    assert env["DOCKER_INFLUXDB_INIT_BUCKET"] == "infusion" and env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]


def test_every_mounted_file_exists(rendered: dict[str, Any]) -> None:
    for name, service in rendered["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            named = source in rendered.get("volumes", {})
            if not named:
                assert Path(source).exists(), f"{name} mounts {source}, which is not in the repository"
    home = rendered["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "dashboards" / "generated" / Path(home).name).is_file(), "the wall dashboard must be the home"


def test_a_missing_secret_stops_compose_with_its_name() -> None:
    env = example_env()
    del env["MQTT_PASSWORD"]
    out = compose_config(env, "hardware")
    assert out.returncode != 0
    assert "set MQTT_PASSWORD in .env" in out.stderr


@pytest.mark.parametrize(
    ("config", "service_name"), [("deploy/gateway.toml", "gateway"), ("deploy/gateway-sim.toml", "gateway-sim")]
)
def test_compose_gateway_configs_validate(config: str, service_name: str) -> None:
    """The gateway's own check-config, with the environment compose gives the container."""
    rendered = yaml.safe_load(compose_config(example_env(), "hardware").stdout)
    service = rendered["services"][service_name]
    env = {"PATH": os.environ["PATH"], **{k: str(v) for k, v in service["environment"].items()}}
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(REPO / config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert env["MQTT_PASSWORD"] not in out.stdout  # secrets are shown as where they come from, never as values
