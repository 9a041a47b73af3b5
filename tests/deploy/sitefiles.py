"""A site folder as the shipped deploy/make-secrets.sh writes it, and the shipped broker config run on it, for tests.

The broker runs deploy/mosquitto/mosquitto.conf with only these substituted, each line asserted to occur exactly once:
`listener 8883` becomes a free port on 127.0.0.1, the folder /mosquitto/site/ becomes the site's mosquitto folder and
the persistence path the test's own. `plain=True` also drops the TLS lines (certfile, keyfile, cafile, tls_version),
for the ACL tests (tests/integration/test_broker_acl.py), whose subject is not TLS (tests/integration/test_tls.py's is).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt

from devtools.localservices import Mosquitto, ServiceUnavailable
from gateway.config import Config, load_config

REPO = Path(__file__).parent.parent.parent
SCRIPT = REPO / "deploy" / "make-secrets.sh"
SHIPPED_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
SITE_FOLDER = "/mosquitto/site/"
TLS_LINES = ("certfile ", "keyfile ", "cafile ", "tls_version ")


def make_secrets(*args: str, trace: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The shipped script, files left to the caller (`--owners none`: the test's broker runs as the test's user)."""
    command = [str(SCRIPT), *args, "--owners", "none"]
    if trace is not None:  # every program it runs, with its whole command line
        command = ["strace", "-f", "-qq", "-e", "trace=execve", "-s", "4096", "-o", str(trace), *command]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120, cwd=REPO)


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value.strip('"') for key, _, value in pairs}


def password_key(account: str) -> str:
    """Where make-secrets.sh keeps an account's password in passwords.env."""
    return "MQTT_PASSWORD_" + account.upper().replace("-", "_")


def shipped_broker_config(site: Path, data: Path, *, plain: bool = False) -> Callable[[str, int], str]:
    """The shipped config on `site` (see the module docstring)."""
    text = SHIPPED_CONF.read_text()
    lines = text.splitlines()
    assert lines.count("listener 8883") == 1, "the shipped mosquitto.conf no longer has one 'listener 8883'"
    assert lines.count("persistence_location /mosquitto/data/") == 1
    assert text.count(SITE_FOLDER) == 5, "passwd, acl, server.crt, server.key, ca.crt: update the test"

    def render(host: str, port: int) -> str:
        out = []
        for line in lines:
            if line == "listener 8883":
                line = f"listener {port} {host}"
            elif line == "persistence_location /mosquitto/data/":
                line = f"persistence_location {data}/"
            elif plain and line.startswith(TLS_LINES):
                continue
            out.append(line.replace(SITE_FOLDER, f"{site}/mosquitto/"))
        return "\n".join(out) + "\n"

    return render


def ca_context(site: Path, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client's TLS context trusting the site's clinic CA only."""
    context = ssl.create_default_context(cafile=str(site / "tls" / "ca.crt"))
    context.check_hostname = check_hostname
    return context


def start_shipped_broker(site: Path, folder: Path, *, plain: bool = False) -> Mosquitto:
    """The shipped broker config on the site's files, in `folder`, ready (over TLS unless `plain`) when started."""
    (folder / "data").mkdir(parents=True)
    probe = None if plain else ca_context(site, check_hostname=False)  # the probe connects by address
    broker = Mosquitto(folder, config=shipped_broker_config(site, folder / "data", plain=plain), tls=probe)
    try:
        broker.start()
    except ServiceUnavailable as exc:
        raise AssertionError(str(exc)) from None
    return broker


# --- gateways and screens on the site's broker -----------------------------------------------------------------------

WAIT_S = 5.0
ROOM_TEMPLATE = REPO / "deploy" / "gateway.toml"


async def until(predicate: Callable[[], bool], reason: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"within {timeout:g} s: {reason}")
        await asyncio.sleep(0.02)


def room_config(site: Path, broker: Mosquitto, password_file: Path, host: str = "localhost") -> Config:
    """The shipped room PC template (deploy/gateway.toml) as a room PC's compose gives it: site and broker from the
    environment (its INFUSION_* overrides), the files of the room bundle here; the id is the template's default (the
    host name) and the account follows from it."""
    overrides = {
        "INFUSION_GATEWAY__SITE": read_env(site / "compose.env")["SITE"],
        "INFUSION_MQTT__HOST": host,
        "INFUSION_MQTT__PORT": str(broker.port),
        "INFUSION_MQTT__PASSWORD__FILE": str(password_file),
        "INFUSION_MQTT__TLS__CA_FILE": str(site / "tls" / "ca.crt"),
        "INFUSION_INFLUX__URL": f"https://{host}:8086",
        "INFUSION_INFLUX__ORG": read_env(site / "compose.env")["INFLUX_ORG"],
    }
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        return load_config(ROOM_TEMPLATE)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.asynccontextmanager
async def screen(
    broker: Mosquitto, site: Path, account: str, topic: str, host: str = "localhost"
) -> AsyncIterator[list[tuple[str, bytes]]]:
    """A screen logged in with its own account over TLS (the clinic CA), recording (topic, payload) of `topic`."""
    password = read_env(site / "passwords.env")[password_key(account)]
    seen: list[tuple[str, bytes]] = []
    client = aiomqtt.Client(
        host, broker.port, username=account, password=password, identifier=account, tls_context=ca_context(site)
    )
    async with client:
        await client.subscribe(topic, qos=1)

        async def record() -> None:
            async for message in client.messages:
                payload = message.payload
                seen.append((str(message.topic), payload if isinstance(payload, bytes) else str(payload).encode()))

        task = asyncio.create_task(record())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
