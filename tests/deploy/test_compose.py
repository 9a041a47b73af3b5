"""The two compose roles checked by a real compose parser (Debian's docker-compose runs `config` without an engine),
on site folders made by the shipped deploy/make-secrets.sh: the central server's (docker-compose.yml, with the
simulated trial) and a room PC's, unpacked from its bundle (docker-compose.room.yml). Each is rendered exactly as an
administrator runs it, `docker compose --env-file /etc/infusion-telemetry/compose.env config` (COMPOSE_FILE in that
file picks the role's compose file), with only SITE_DIR pointing at the test's folder.

What a Docker engine would add and cannot be run here: the images, InfluxDB's first start (init-tokens.sh), Grafana
reading its files, a serial adapter re-plugged under the device cgroup rules (docs/deploy.md says what was checked).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.sitefiles import REPO, make_secrets, read_env

SITE = "clinic-a"
SERVER = "central.clinic.test"
BIND = "192.0.2.10"  # a documentation address: the central server's address on the clinic network
ROOM_PC = "room-pc-1"


def compose_config(env_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose not found: install it with `sudo apt-get install -y docker-compose`", pytrace=False)
    return subprocess.run(
        [binary, "--project-directory", str(REPO), "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
        check=False,
        timeout=60,
        cwd=REPO,
    )


def private_file(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@pytest.fixture(scope="module")
def central_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("central") / "etc"
    args = ["--dir", str(site), "--site", SITE, "--server-name", SERVER, "--bind", BIND, "--gateway", ROOM_PC]
    done = make_secrets("central", *args, "--simulated")
    assert done.returncode == 0, done.stderr
    # What InfluxDB's first start writes (deploy/influxdb/init-tokens.sh): the room bundle needs the gateways' token.
    private_file(site / "tokens" / "gateways.token", "gateways-token-from-influxdb\n")
    private_file(site / "tokens" / "grafana.token", "grafana-token-from-influxdb\n")
    return site


@pytest.fixture(scope="module")
def room_site(central_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A room PC's /etc/infusion-telemetry, unpacked from the bundle the central server made for it."""
    folder = tmp_path_factory.mktemp("room")
    bundle = folder / "room.tar"
    done = make_secrets("room", "--dir", str(central_site), "--gateway", ROOM_PC, "--bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    site = folder / "etc"
    with tarfile.open(bundle) as tar:
        tar.extractall(site, filter="data")
    return site


def rendered(site: Path) -> dict[str, Any]:
    out = compose_config(site / "compose.env", SITE_DIR=str(site))
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = yaml.safe_load(out.stdout)
    return doc


@pytest.fixture(scope="module")
def central(central_site: Path) -> dict[str, Any]:
    return rendered(central_site)


@pytest.fixture(scope="module")
def room(room_site: Path) -> dict[str, Any]:
    return rendered(room_site)


def published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, host port) of each published port; docker-compose 1.x renders "ip:host:container"."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((str(port.get("host_ip", "")), int(port["published"])))
        else:
            ip, host, _ = str(port).rsplit(":", 2)
            ports.append((ip, int(host)))
    return ports


# --- the roles ---------------------------------------------------------------------------------------------------


def test_the_central_role(central: dict[str, Any], central_site: Path) -> None:
    services = central["services"]
    assert set(services) == {"mosquitto", "influxdb", "grafana", "simulators", "gateway-sim"}
    assert {s for s, v in services.items() if "profiles" not in v} == {"mosquitto", "influxdb", "grafana"}
    assert all(services[s]["profiles"] == ["simulated"] for s in ("simulators", "gateway-sim"))
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", f"{name} has no restart policy"
        if name not in ("simulators", "grafana"):  # Grafana: nothing waits for it, and its image's wget is busybox's
            assert service.get("healthcheck"), f"{name} has no healthcheck"
    assert read_env(central_site / "compose.env")["COMPOSE_PROFILES"] == "simulated"


def test_the_room_role_is_the_gateway_only(room: dict[str, Any], room_site: Path) -> None:
    env = read_env(room_site / "compose.env")
    assert env["COMPOSE_FILE"] == "docker-compose.room.yml" and env["GATEWAY_ID"] == ROOM_PC
    (name,) = room["services"]
    gateway = room["services"][name]
    assert name == "gateway" and gateway["restart"] == "unless-stopped" and gateway["healthcheck"]
    # The id: the container has the room PC's name, the template no id, so the gateway's id is that name.
    assert gateway["hostname"] == ROOM_PC
    assert "id" not in tomllib.loads((room_site / "gateway.toml").read_text())["gateway"]
    environment = gateway["environment"]
    assert environment["INFUSION_MQTT__HOST"] == SERVER and environment["INFUSION_GATEWAY__SITE"] == SITE
    assert environment["INFUSION_INFLUX__URL"] == f"https://{SERVER}:8086"
    assert "INFUSION_GATEWAY__ID" not in environment


def test_ports_only_where_a_role_needs_them_on_the_configured_address(
    central: dict[str, Any], room: dict[str, Any]
) -> None:
    """The broker over TLS, InfluxDB and Grafana over HTTPS, on BIND_ADDRESS only; nothing else anywhere."""
    ports = {name: published(service) for name, service in central["services"].items()}
    assert ports == {
        "mosquitto": [(BIND, 8883)],
        "influxdb": [(BIND, 8086)],
        "grafana": [(BIND, 3000)],
        "simulators": [],
        "gateway-sim": [],
    }
    assert published(room["services"]["gateway"]) == []


def test_every_mounted_file_exists(
    central: dict[str, Any], room: dict[str, Any], central_site: Path, room_site: Path
) -> None:
    for doc, site in ((central, central_site), (room, room_site)):
        for name, service in doc["services"].items():
            for volume in service.get("volumes", []):
                source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
                if source not in doc.get("volumes", {}):
                    assert Path(source).exists(), f"{name} mounts {source}, which make-secrets.sh did not make"
                    if not source.startswith(str(REPO)) and source != "/dev":
                        assert source.startswith(str(site)), f"{name} mounts {source}, outside the site's folder"
    home = central["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (central_site / "dashboards" / Path(home).name).is_file(), "the wall dashboard must be the home"


# --- TLS, tokens, secrets ------------------------------------------------------------------------------------------


def test_tls_everywhere(central: dict[str, Any]) -> None:
    services = central["services"]
    conf = (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    assert [line for line in conf if line.startswith("listener")] == ["listener 8883"]
    assert {"certfile /mosquitto/site/server.crt", "keyfile /mosquitto/site/server.key"} <= set(conf)
    grafana, influx = services["grafana"]["environment"], services["influxdb"]["environment"]
    assert grafana["GF_SERVER_PROTOCOL"] == "https" and grafana["GF_SERVER_CERT_KEY"].endswith("tls.key")
    assert influx["INFLUXD_TLS_CERT"].endswith("tls.crt") and influx["INFLUXD_TLS_KEY"].endswith("tls.key")
    datasources = yaml.safe_load((REPO / "dashboards/provisioning/datasources/influxdb.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["url"] == "https://influxdb:8086" and source["jsonData"]["tlsAuthWithCACert"] is True
    assert services["gateway-sim"]["environment"]["INFUSION_INFLUX__URL"] == "https://influxdb:8086"


def test_per_role_influx_tokens(central: dict[str, Any]) -> None:
    """Gateways write, Grafana reads, nobody but the administrator holds the admin token (InfluxDB 2 itself cannot
    run here: the token script's grants are checked as written, its output format by a unit check below)."""
    script = (REPO / "deploy" / "influxdb" / "init-tokens.sh").read_text()
    assert 'make_token gateways 10001:10001 --write-bucket "$bucket"\n' in script
    assert 'make_token grafana 472:0 --read-bucket "$bucket" --read-dbrps\n' in script
    datasources = (REPO / "dashboards/provisioning/datasources/influxdb.yaml").read_text()
    assert "Token $__file{/infusion/tokens/grafana.token}" in datasources
    for name, service in central["services"].items():
        environment = service.get("environment", {})
        assert not any("TOKEN" in key and not key.endswith("_FILE") for key in environment), name
    mounts = {m if isinstance(m, str) else m["target"] for m in central["services"]["influxdb"]["volumes"]}
    assert any("20-init-tokens.sh" in str(m) for m in mounts)


def test_init_tokens_reads_the_token_out_of_influx_json(tmp_path: Path) -> None:
    """The script's token extraction on the shape `influx auth create --json` prints, with a stand-in `influx` on
    PATH (the real CLI cannot run here)."""
    influx = tmp_path / "bin" / "influx"
    influx.parent.mkdir()
    influx.write_text(
        '#!/bin/sh\nprintf \'{\\n\\t"id": "0a1b",\\n\\t"token": "tok-%s==",\\n\\t"status": "active"\\n}\\n\' "$6"\n'
    )
    influx.chmod(0o755)
    script = (REPO / "deploy" / "influxdb" / "init-tokens.sh").read_text()
    script = script.replace("tokens=/infusion/tokens", f"tokens={tmp_path}").replace('chown "$owner"', "true")
    (tmp_path / "run.sh").write_text(script)
    env = {"PATH": f"{influx.parent}:{os.environ['PATH']}", "DOCKER_INFLUXDB_INIT_ORG": "clinic"}
    env["DOCKER_INFLUXDB_INIT_BUCKET_ID"] = "b1"
    done = subprocess.run(["sh", str(tmp_path / "run.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for name in ("gateways", "grafana"):
        token = tmp_path / f"{name}.token"
        assert token.read_text() == f"tok-infusion-telemetry {name}==\n"
        assert token.stat().st_mode & 0o777 == 0o600


def test_no_secret_in_compose_or_health_checks(
    central: dict[str, Any], room: dict[str, Any], central_site: Path
) -> None:
    """Secrets are files (0600, their service's); compose files, their environments and health checks hold none, so
    neither `docker inspect` nor a process list shows one."""
    secrets = [v for k, v in read_env(central_site / "passwords.env").items() if "PASSWORD" in k or "TOKEN" in k]
    secrets += ["gateways-token-from-influxdb", "grafana-token-from-influxdb"]
    for doc in (central, room):
        text = yaml.safe_dump(doc)
        assert not [s for s in secrets if s in text], "a secret in the rendered compose file"
        for name, service in doc["services"].items():
            check = " ".join(service.get("healthcheck", {}).get("test", []))
            assert " -P " not in check and "--pw" not in check and "password" not in check.lower(), name
    health = central["services"]["mosquitto"]["healthcheck"]["test"][1]
    assert health.startswith("XDG_CONFIG_HOME=/mosquitto/site/health mosquitto_sub ") and "--cafile" in health
    assert (central_site / "mosquitto" / "health" / "mosquitto_sub").read_text().startswith("-u health\n-P ")
    grafana = central["services"]["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana and grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    influx = central["services"]["influxdb"]["environment"]
    assert "DOCKER_INFLUXDB_INIT_PASSWORD" not in influx and influx["DOCKER_INFLUXDB_INIT_PASSWORD_FILE"]


# --- serial re-plug, settings ------------------------------------------------------------------------------------


def test_serial_adapters_can_be_replugged(room: dict[str, Any], room_site: Path) -> None:
    """The host's /dev read-only (live nodes and /dev/serial/by-id links) and the right to open ttyUSB/ttyACM, no
    `devices:` mapped once at creation; the template's ports are under that mount."""
    gateway = room["services"]["gateway"]
    assert "devices" not in gateway
    assert sorted(gateway["device_cgroup_rules"]) == ["c 166:* rmw", "c 188:* rmw"]
    assert "/dev:/host/dev:ro" in [
        v if isinstance(v, str) else f"{v['source']}:{v['target']}:ro" for v in gateway["volumes"]
    ]
    ports = [d["port"] for d in tomllib.loads((room_site / "gateway.toml").read_text())["devices"]]
    assert ports and all(p.startswith("/host/dev/serial/by-id/") for p in ports)


def test_a_missing_setting_stops_compose_with_its_name(room_site: Path, tmp_path: Path) -> None:
    env = tmp_path / "compose.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in read_env(room_site / "compose.env").items() if k != "GATEWAY_ID"))
    out = compose_config(env, SITE_DIR=str(room_site))
    assert out.returncode != 0 and "set GATEWAY_ID in compose.env" in out.stderr


@pytest.mark.parametrize("role", ["room", "simulated"])
def test_compose_gateway_configs_validate(
    role: str, central: dict[str, Any], room: dict[str, Any], room_site: Path, central_site: Path
) -> None:
    """The gateway's own check-config on the config each role mounts, with the environment compose gives the
    container (the container's paths of the CA mapped to the site's file, which check-config requires)."""
    if role == "room":
        service, config, ca = room["services"]["gateway"], room_site / "gateway.toml", room_site / "tls" / "ca.crt"
    else:
        service, config = central["services"]["gateway-sim"], REPO / "deploy" / "gateway-sim.toml"
        ca = central_site / "tls" / "ca.crt"
    env = {"PATH": os.environ["PATH"], **{k: str(v) for k, v in service["environment"].items()}}
    env["INFUSION_MQTT__TLS__CA_FILE"] = str(ca)
    if "hostname" in service:  # the container's host name, which is the gateway's default id inside it
        env["INFUSION_GATEWAY__ID"] = service["hostname"]
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    account = f"gateway-{ROOM_PC}" if role == "room" else "gateway-sim-gw"
    assert account in out.stdout, "the account is gateway-<id>, the id the container's host name"


def test_site_files_live_outside_the_repository() -> None:
    """`git pull` never conflicts: nothing a site edits is tracked (the templates are copied out by the script)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for site_file in ("compose.env", ".env", "deploy/mosquitto/passwd", "deploy/mosquitto/acl", "passwords.env"):
        assert site_file not in tracked
    for compose in ("docker-compose.yml", "docker-compose.room.yml"):
        text = (REPO / compose).read_text()
        assert "./deploy/gateway.toml" not in text and "./dashboards/generated" not in text, compose
