"""TLS by default (issue 18): the certificates deploy/make-secrets.sh makes, on a real mosquitto running the shipped
config (TLS only, on what is 8883 in compose: tests/deploy/sitefiles.py), with the gateway's own MQTT connection built
from the shipped room PC template. The gateway connects and publishes; a client without the clinic CA, or connecting
by a name the certificate does not carry, is refused, and so is plain MQTT. The InfluxDB and Grafana certificates are
checked by a TLS handshake as their clients make it (by the service's compose name and by the server's name)."""

from __future__ import annotations

import asyncio
import json
import ssl
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.localservices import Mosquitto, mqtt_handshake
from gateway.config import MqttSection, TlsConfig, host_gateway_id
from gateway.sinks import SinkUnavailable
from gateway.sinks.mqtt import MqttSink
from tests.deploy.sitefiles import (
    ROOM_TEMPLATE,
    ca_context,
    make_secrets,
    password_key,
    read_env,
    room_config,
    screen,
    start_shipped_broker,
    until,
)

SITE = "clinic-a"
SERVER_NAME = "central.test"  # the name room PCs use; not resolvable here, so checked by a handshake naming it
GATEWAY = host_gateway_id()  # the shipped template's id on this machine


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls") / "site"
    args = ["--dir", str(folder), "--site", SITE, "--bind", "127.0.0.1", "--server-name", SERVER_NAME]
    done = make_secrets("central", *args, "--gateway", GATEWAY)
    assert done.returncode == 0, f"deploy/make-secrets.sh failed:\n{done.stderr}"
    return folder


@pytest.fixture(scope="module")
def broker(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    server = start_shipped_broker(site, tmp_path_factory.mktemp("tls-broker"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def password_file(site: Path, tmp_path: Path) -> Path:
    """The gateway's password as its room bundle holds it (secrets/mqtt-password)."""
    path = tmp_path / "mqtt-password"
    path.write_text(read_env(site / "passwords.env")[password_key(f"gateway-{GATEWAY}")] + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.integration
async def test_the_gateway_connects_over_tls_and_publishes(site: Path, broker: Mosquitto, password_file: Path) -> None:
    cfg = room_config(site, broker, password_file)
    assert cfg.mqtt.tls is not None and cfg.mqtt.port == broker.port and cfg.mqtt.username == f"gateway-{GATEWAY}"
    topic = f"infusion/{SITE}/_gateway/{GATEWAY}/status"
    sink = MqttSink(cfg.mqtt, cfg.gateway.site, cfg.gateway.id, live_window_s=10)
    async with screen(broker, site, "reader-1", topic) as seen, sink:
        await until(lambda: len(seen) == 1, "the gateway's online status did not arrive over TLS")
        await sink.publish_gateway_status()  # raises SinkUnavailable if the connection had gone
        await until(lambda: len(seen) == 2, "the gateway's second status did not arrive")
        states = [json.loads(payload)["state"] for _, payload in seen]
    assert states == ["online", "online"], "the gateway lost its connection (its will said offline)"


async def refused(cfg: MqttSection) -> str:
    """Why the gateway's own connection is refused."""
    with pytest.raises(SinkUnavailable) as caught:
        async with MqttSink(cfg, SITE, GATEWAY, live_window_s=10):
            pass
    return str(caught.value)


@pytest.mark.integration
async def test_a_client_without_the_clinic_ca_is_refused(
    site: Path, broker: Mosquitto, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system's trust store (no ca_file) does not know the clinic CA: the certificate is refused before any
    password is sent."""
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent")  # the system's store only, whatever the machine's environment
    cfg = room_config(site, broker, password_file).mqtt
    why = await refused(cfg.model_copy(update={"tls": TlsConfig()}))
    assert "CERTIFICATE_VERIFY_FAILED" in why, why


@pytest.mark.integration
async def test_a_client_connecting_by_a_wrong_name_is_refused(
    site: Path, broker: Mosquitto, password_file: Path
) -> None:
    """The certificate carries the server's names, its compose name and localhost: by its address (not a name it
    carries) the gateway refuses the broker, with the CA."""
    cfg = room_config(site, broker, password_file, host="127.0.0.1").mqtt
    why = await refused(cfg)
    assert "CERTIFICATE_VERIFY_FAILED" in why and "IP address mismatch" in why, why


@pytest.mark.integration
@pytest.mark.parametrize(("name", "accepted"), [(SERVER_NAME, True), ("mosquitto", True), ("other.test", False)])
async def test_the_broker_certificate_names(site: Path, broker: Mosquitto, name: str, accepted: bool) -> None:
    """What a client connecting by `name` concludes (the handshake the gateway makes, naming the server)."""
    assert await tls_handshake(broker.host, broker.port, site, name) == accepted


@pytest.mark.integration
def test_plain_mqtt_is_not_served(site: Path, broker: Mosquitto) -> None:
    """No plain-text listener: an MQTT CONNECT without TLS gets no CONNACK, not even a refusal; with TLS it does."""
    assert not mqtt_handshake(broker.host, broker.port, timeout=2, any_answer=True)
    with_ca = ca_context(site, check_hostname=False)
    assert mqtt_handshake(broker.host, broker.port, timeout=2, any_answer=True, tls=with_ca)


@pytest.mark.integration
@pytest.mark.parametrize("service", ["influxdb", "grafana"])
async def test_https_certificates_of_influxdb_and_grafana(site: Path, tmp_path: Path, service: str) -> None:
    """Each service's certificate (its own key, 0600, owned by its user in a real run) is accepted under the clinic
    CA by its compose name (Grafana's datasource, the simulated gateway) and the server's name (room PCs, browsers),
    and refused by another name."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(site / service / "tls.crt", site / service / "tls.key")
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        results = {
            name: await tls_handshake("127.0.0.1", port, site, name) for name in (service, SERVER_NAME, "x.test")
        }
    assert results == {service: True, SERVER_NAME: True, "x.test": False}


async def tls_handshake(host: str, port: int, site: Path, name: str) -> bool:
    """A TLS handshake to host:port as a client that trusts the clinic CA and expects the server to be `name`."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ca_context(site), server_hostname=name), timeout=5
        )
    except ssl.SSLCertVerificationError:
        return False
    writer.close()
    return True


def test_the_room_template_reads_secrets_from_files_and_verifies_the_ca() -> None:
    """Secrets from the bundle's files, never from the environment (docker inspect shows a container's); TLS on."""
    cfg = tomllib.loads(ROOM_TEMPLATE.read_text())
    assert cfg["mqtt"]["password"] == {"file": "/etc/infusion-telemetry/secrets/mqtt-password"}
    assert cfg["influx"]["token"] == {"file": "/etc/infusion-telemetry/secrets/influx-token"}
    assert cfg["mqtt"]["port"] == 8883 and cfg["mqtt"]["tls"] == {"ca_file": "/etc/infusion-telemetry/tls/ca.crt"}
    assert cfg["influx"]["ca_file"] == "/etc/infusion-telemetry/tls/ca.crt"
    assert "insecure_skip_verify" not in cfg["mqtt"]["tls"]
