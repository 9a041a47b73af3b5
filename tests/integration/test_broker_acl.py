"""Authorization at the broker (issue 12, demonstration 2), against a real mosquitto running the shipped files.

The broker runs deploy/mosquitto/mosquitto.conf with the passwd and acl that the shipped
deploy/make-secrets.sh writes in a site folder (here with `--owners none`: the files stay the test's, mode 0600), with
only the listener, the paths and the TLS lines substituted (tests/deploy/sitefiles.py: TLS is the subject of
tests/integration/test_tls.py, not of these). `user root` goes first when the tests run as root, as for every test
broker (devtools/localservices.py): mosquitto would otherwise drop to its own user, which cannot read the caller's
0600 files.

A refused publish is dropped silently over MQTT 3.1.1 (what the gateway and the CLI speak): each refusal is proved by a
screen that sees nothing while a control message published afterwards on the same topic by a gateway arrives, and
again by the broker's own "not authorized" PUBACK over MQTT 5.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devtools.localservices import Mosquitto
from gateway.config import MqttSection, SecretRef
from gateway.sinks.mqtt import MqttSink, request
from tests.deploy.sitefiles import REPO, SHIPPED_CONF, make_secrets, read_env, start_shipped_broker, until

SITE = "clinic-a"
ROOM = f"infusion/{SITE}/1"
GATEWAY = "gateway-room-pc-1"  # the account of gateway id "room-pc-1"
OTHER_GATEWAY = "gateway-room-pc-2"
WAIT_S = 5.0
_ids = itertools.count(1)


# --- the shipped files ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secrets:
    env_file: Path
    out: Path
    passwords: dict[str, str]  # account -> password, as the script stored them in .env


def run_script(*args: str, site: Path, trace: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`make-secrets.sh central` on the site folder `site` (its settings given on the first run only)."""
    first = [] if (site / "compose.env").exists() else ["--site", SITE, "--bind", "127.0.0.1"]
    return make_secrets("central", "--dir", str(site), *first, *args, trace=trace)


def accounts_of(env: dict[str, str], listed: str) -> dict[str, str]:
    """account -> password, from the script's account list on stdout and the .env it wrote."""
    found = re.findall(r"^  (\S+) \(\w+; password: (\w+) in ", listed, flags=re.MULTILINE)
    return {account: env[key] for account, key in found}


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    """Accounts for two gateways of the site, two screens and a nurse station, made by the shipped script."""
    site = tmp_path_factory.mktemp("secrets") / "site"
    args = ["--gateway", "room-pc-1", "--gateway", "room-pc-2", "--readers", "2"]
    done = run_script(*args, site=site)
    assert done.returncode == 0, f"deploy/make-secrets.sh failed:\n{done.stderr}"
    env_file = site / "passwords.env"
    passwords = accounts_of(read_env(env_file), done.stdout)
    expected = {GATEWAY, OTHER_GATEWAY, "reader-1", "reader-2", "nurse-station-1", "health"}
    assert set(passwords) == expected, done.stdout
    return Secrets(env_file, site / "mosquitto", passwords)


def start_broker(secrets: Secrets, folder: Path) -> Mosquitto:
    """The shipped config on the script's files, plain (see the module docstring)."""
    return start_shipped_broker(secrets.out.parent, folder, plain=True)


@pytest.fixture
def broker(secrets: Secrets, tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own, on the shipped files."""
    server = start_broker(secrets, tmp_path / "mosquitto")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_broker(secrets: Secrets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the table of publish paths: each case uses its own payload and observes only live messages."""
    server = start_broker(secrets, tmp_path_factory.mktemp("shared") / "mosquitto")
    try:
        yield server
    finally:
        server.stop()


# --- clients -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool  # True only for a retained message delivered on subscribing; live ones arrive with False


class Client:
    """A paho client in its own network thread that records what it receives and each PUBACK's reason code."""

    def __init__(self, broker: Mosquitto, account: str | None, password: str | None, *, v5: bool = False,
                 client_id: str | None = None) -> None:  # fmt: skip
        self.account = account
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        self.paho = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{next(_ids)}", protocol=protocol
        )
        if account is not None:
            self.paho.username_pw_set(account, password)
        self.connack: ReasonCode | None = None
        self.seen: list[Seen] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.paho.on_connect = self._on_connect
        self.paho.on_message = lambda _c, _u, m: self.seen.append(Seen(m.topic, bytes(m.payload), bool(m.retain)))
        self.paho.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc)
        self.paho.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(mid, rcs)
        self.paho.connect_async(broker.host, broker.port, keepalive=10)
        self.paho.loop_start()

    def _on_connect(self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self.connack = rc

    async def answer(self) -> ReasonCode:
        """The CONNACK's reason code."""
        await until(lambda: self.connack is not None, f"{self.account} got no CONNACK")
        assert self.connack is not None
        return self.connack

    async def connected(self) -> Client:
        reason = await self.answer()
        assert not reason.is_failure, f"{self.account} refused: {reason}"
        return self

    async def subscribe(self, topic: str) -> None:
        _, mid = self.paho.subscribe(topic, qos=1)
        await until(lambda: mid in self.subacks, f"{self.account} got no SUBACK for {topic}")

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        """QoS 1; returns the PUBACK's reason (always success over MQTT 3.1.1, where the broker drops silently)."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        await until(lambda: info.mid in self.pubacks, f"{self.account} got no PUBACK for {topic}")
        return self.pubacks[info.mid]

    def live(self, topic: str) -> list[bytes]:
        return [s.payload for s in self.seen if s.topic == topic and not s.retain]

    def retained(self) -> dict[str, bytes]:
        return {s.topic: s.payload for s in self.seen if s.retain}

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Makes clients; every one is closed at the end of the test."""
    made: list[Client] = []

    def make(*args: object, **kwargs: object) -> Client:
        client = Client(*args, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


NOT_AUTHORIZED = "Not authorized"


# --- every publish path --------------------------------------------------------------------------------------------

# (account, topic, retain, empty payload, allowed)
PATHS = [
    # The gateway publishes everything of its site, the retained topics and its replies, and clears retained commands.
    (GATEWAY, f"{ROOM}/oximeter/reading", False, False, True),
    (GATEWAY, f"{ROOM}/oximeter/waveform", False, False, True),
    (GATEWAY, f"{ROOM}/oximeter/status", True, False, True),
    (GATEWAY, f"{ROOM}/alarms/events", False, False, True),
    (GATEWAY, f"{ROOM}/alarms/active/oximeter/spo2_low", True, False, True),
    (GATEWAY, f"{ROOM}/alarms/active/oximeter/spo2_low", True, True, True),  # an alarm clears
    (GATEWAY, f"{ROOM}/session", True, False, True),
    (GATEWAY, f"{ROOM}/mode", True, False, True),
    (GATEWAY, f"infusion/{SITE}/_gateway/room-pc-1/status", True, False, True),
    (GATEWAY, f"{ROOM}/command/reply", False, False, True),
    (GATEWAY, f"{ROOM}/cuff/command/reply", False, False, True),
    (GATEWAY, f"{ROOM}/command", True, True, True),  # clears a retained command it found
    # ... and nothing of another site or outside the prefix.
    (GATEWAY, "infusion/clinic-b/1/oximeter/status", True, False, False),
    (GATEWAY, "infusion/clinic-b/1/command", False, False, False),
    (GATEWAY, "infusion/clinic-b/_gateway/room-pc-1/status", True, False, False),
    (GATEWAY, f"other/{SITE}/1/oximeter/status", True, False, False),
    # A nurse station publishes commands, to rooms and devices of its site, and nothing else.
    ("nurse-station-1", f"{ROOM}/command", False, False, True),
    ("nurse-station-1", f"{ROOM}/cuff/command", False, False, True),
    ("nurse-station-1", f"{ROOM}/command", True, False, True),  # an ACL cannot forbid retain: the gateway clears it
    ("nurse-station-1", f"{ROOM}/oximeter/reading", False, False, False),
    ("nurse-station-1", f"{ROOM}/oximeter/status", True, False, False),  # {"spoofed": true}
    ("nurse-station-1", f"{ROOM}/alarms/events", False, False, False),
    ("nurse-station-1", f"{ROOM}/alarms/active/oximeter/spo2_low", True, False, False),
    ("nurse-station-1", f"{ROOM}/alarms/active/oximeter/spo2_low", True, True, False),  # erasing an active alarm
    ("nurse-station-1", f"{ROOM}/session", True, False, False),
    ("nurse-station-1", f"{ROOM}/mode", True, True, False),
    ("nurse-station-1", f"infusion/{SITE}/_gateway/room-pc-1/status", True, False, False),
    ("nurse-station-1", f"{ROOM}/command/reply", False, False, False),  # a forged reply
    ("nurse-station-1", f"{ROOM}/cuff/command/reply", False, False, False),
    ("nurse-station-1", "infusion/clinic-b/1/command", False, False, False),
    # Readers and the health check publish nothing.
    ("reader-1", f"{ROOM}/command", False, False, False),
    ("reader-1", f"{ROOM}/cuff/command", False, False, False),
    ("reader-1", f"{ROOM}/oximeter/status", True, False, False),
    ("reader-1", f"{ROOM}/alarms/active/oximeter/spo2_low", True, True, False),
    ("health", f"{ROOM}/command", False, False, False),
    ("health", f"{ROOM}/oximeter/status", True, False, False),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("account", "topic", "retain", "empty", "allowed"),
    PATHS,
    ids=[f"{a}-{'may' if ok else 'may-not'}-{'clear' if e else 'publish'}-{t}" for a, t, _, e, ok in PATHS],
)
async def test_publish_path(
    shared_broker: Mosquitto,
    secrets: Secrets,
    clients: Callable[..., Client],
    account: str,
    topic: str,
    retain: bool,
    empty: bool,
    allowed: bool,
) -> None:
    """Each publish is seen by a screen iff allowed; a refused one is dropped (3.1.1) and answered not authorized (5)."""
    pw = secrets.passwords
    in_site = topic.startswith(f"infusion/{SITE}/")
    screen = await clients(shared_broker, "reader-2", pw["reader-2"]).connected()
    await screen.subscribe("infusion/+/#")  # as `watch` without --site does
    case = next(_ids)
    payloads = [b"" if empty else json.dumps({"case": case, "protocol": p}).encode() for p in ("3.1.1", "5")]
    # One connection of an account at a time: the broker names both after the account, so a second kicks the first.
    mqtt311 = await clients(shared_broker, account, pw[account]).connected()
    assert not (await mqtt311.publish(topic, payloads[0], retain)).is_failure
    mqtt311.close()
    mqtt5 = await clients(shared_broker, account, pw[account], v5=True).connected()
    reason = await mqtt5.publish(topic, payloads[1], retain)
    if allowed:
        assert not reason.is_failure, f"{account} may publish {topic}: the broker said {reason}"
        await until(lambda: len(screen.live(topic)) == 2, f"the screen did not see both publishes on {topic}")
        assert screen.live(topic) == payloads
        return
    assert str(reason) == NOT_AUTHORIZED, f"{account} must not publish {topic}: the broker said {reason}"
    if in_site:  # a control message, published after both refusals were acknowledged, arrives; they do not
        control = json.dumps({"case": case, "control": True}).encode()
        gateway = await clients(shared_broker, OTHER_GATEWAY, pw[OTHER_GATEWAY]).connected()
        assert not (await gateway.publish(topic, control, retain)).is_failure
        await until(lambda: control in screen.live(topic), f"the control message on {topic} did not arrive")
        assert screen.live(topic) == [control], f"{account} published on {topic}"
    else:  # nobody here may read another site: the broker's MQTT 5 answer above is the proof
        assert screen.live(topic) == []


# --- the demonstrations ----------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_retained_state_survives_everyone_but_the_gateway(
    broker: Mosquitto, secrets: Secrets, clients: Callable[..., Client]
) -> None:
    """{"spoofed":true} and empty retained publishes from a nurse station or a screen change nothing a new screen sees;
    the gateway's own empty publish does clear its alarm (so the new screen would have seen an erase)."""
    pw = secrets.passwords
    gateway = await clients(broker, GATEWAY, pw[GATEWAY]).connected()
    state = {
        f"{ROOM}/oximeter/status": b'{"state": "ok"}',
        f"{ROOM}/alarms/active/oximeter/spo2_low": b'{"type": "alarm", "active": true}',
        f"{ROOM}/session": b'{"type": "session", "state": "started"}',
        f"{ROOM}/mode": b'{"type": "room_mode", "mode": "monitoring"}',
        f"infusion/{SITE}/_gateway/room-pc-1/status": b'{"state": "online"}',
    }
    for topic, payload in state.items():
        assert not (await gateway.publish(topic, payload, retain=True)).is_failure
    for account in ("nurse-station-1", "reader-1"):
        attacker = await clients(broker, account, pw[account]).connected()
        for topic in state:
            await attacker.publish(topic, b'{"spoofed": true}', retain=True)
            await attacker.publish(topic, b"", retain=True)
        attacker.close()  # its account's next login (the screen below) would kick it, and it would reconnect

    screen = await clients(broker, "reader-1", pw["reader-1"]).connected()
    await screen.subscribe(f"infusion/{SITE}/#")
    await until(lambda: screen.retained().keys() >= state.keys(), "a new screen did not get every retained topic")
    assert screen.retained() == state

    alarm = f"{ROOM}/alarms/active/oximeter/spo2_low"
    assert not (await gateway.publish(alarm, b"", retain=True)).is_failure
    later = await clients(broker, "reader-2", pw["reader-2"]).connected()
    await later.subscribe(f"infusion/{SITE}/#")
    await until(lambda: len(later.retained()) >= len(state) - 1, "the next screen did not get the retained topics")
    await asyncio.sleep(0.2)  # a retained alarm would have come with the others
    assert later.retained() == {t: p for t, p in state.items() if t != alarm}


def sink_config(broker: Mosquitto, account: str, env_name: str) -> MqttSection:
    return MqttSection(host=broker.host, port=broker.port, username=account, password=SecretRef(env=env_name))


GATEWAY_IDS = ("infusion-gw-clinic-a-room-pc-1", GATEWAY)  # the client id the gateway asks for, the one it gets


async def refused_login(broker: Mosquitto, account: str | None, password: str | None, client_id: str) -> None:
    client = aiomqtt.Client(broker.host, broker.port, username=account, password=password, identifier=client_id)
    with pytest.raises(aiomqtt.MqttError, match=NOT_AUTHORIZED):
        async with client:
            pass


async def gateway_states(
    broker: Mosquitto, secrets: Secrets, clients: Callable[..., Client]
) -> Callable[[], list[str]]:
    """What a screen sees of gateway room-pc-1's retained status topic from now on: "online", "offline" (its will)."""
    screen = await clients(broker, "reader-2", secrets.passwords["reader-2"]).connected()
    topic = f"infusion/{SITE}/_gateway/room-pc-1/status"
    await screen.subscribe(topic)
    return lambda: [json.loads(p)["state"] for p in screen.live(topic)]


@pytest.mark.integration
async def test_nobody_takes_over_the_gateways_client_id(
    broker: Mosquitto, secrets: Secrets, clients: Callable[..., Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's real MQTT sink stays connected and its publishes arrive while every other account (over MQTT
    3.1.1 and 5), anonymous clients and wrong passwords log in with its client ids."""
    pw = secrets.passwords
    monkeypatch.setenv("TEST_GATEWAY_PASSWORD", pw[GATEWAY])
    states = await gateway_states(broker, secrets, clients)
    sink = MqttSink(sink_config(broker, GATEWAY, "TEST_GATEWAY_PASSWORD"), SITE, "room-pc-1", live_window_s=10)
    async with sink:
        await until(lambda: states() == ["online"], "the gateway's online status did not arrive")
        for account in ("nurse-station-1", "reader-1", OTHER_GATEWAY, "health"):
            for client_id in GATEWAY_IDS:
                for v5 in (False, True):
                    attacker = await clients(broker, account, pw[account], client_id=client_id, v5=v5).connected()
                    attacker.close()
        for login, password in ((GATEWAY, "wrong"), (GATEWAY, ""), (None, None)):
            for client_id in GATEWAY_IDS:
                await refused_login(broker, login, password, client_id)
        await asyncio.sleep(0.5)  # a kicked gateway's will would be on its way by now
        await sink.publish_gateway_status()  # raises SinkUnavailable if the gateway had lost its connection
        await until(lambda: len(states()) == 2, "the gateway's status after the attempts did not arrive")
        assert states() == ["online", "online"], "the gateway was kicked off (its will said offline)"


@pytest.mark.integration
async def test_the_gateways_own_account_does_kick_it_off(
    broker: Mosquitto, secrets: Secrets, clients: Callable[..., Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: a second program logging in with the gateway's account (a CLI given the gateway's
    config, a copied password) takes the client id over, and the gateway's will says offline. One account each."""
    monkeypatch.setenv("TEST_GATEWAY_PASSWORD", secrets.passwords[GATEWAY])
    states = await gateway_states(broker, secrets, clients)
    sink = MqttSink(sink_config(broker, GATEWAY, "TEST_GATEWAY_PASSWORD"), SITE, "room-pc-1", live_window_s=10)
    async with sink:
        await until(lambda: states() == ["online"], "the gateway's online status did not arrive")
        second = aiomqtt.Client(
            broker.host, broker.port, username=GATEWAY, password=secrets.passwords[GATEWAY], identifier="infusion-cli-1"
        )
        async with second:
            await until(lambda: states() == ["online", "offline"], "the gateway's own account did not kick it off")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("account", "password"),
    [(None, None), (GATEWAY, "wrong"), (GATEWAY, ""), ("nobody", "x"), ("nurse-station-1", "gateway's")],
    ids=["anonymous", "wrong-password", "empty-password", "unknown-account", "another-accounts-password"],
)
async def test_login_refused(broker: Mosquitto, secrets: Secrets, account: str | None, password: str | None) -> None:
    if password == "gateway's":
        password = secrets.passwords[GATEWAY]
    await refused_login(broker, account, password, "any")


@pytest.mark.integration
async def test_nurse_station_command_round_trip(
    broker: Mosquitto, secrets: Secrets, clients: Callable[..., Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's request() with a nurse station's account: the command reaches the gateway, the reply comes back."""
    pw = secrets.passwords
    gateway = await clients(broker, GATEWAY, pw[GATEWAY]).connected()
    for topic in (f"infusion/{SITE}/+/command", f"infusion/{SITE}/+/+/command"):  # as the gateway subscribes
        await gateway.subscribe(topic)
    answered: set[int] = set()

    async def answer() -> None:
        while True:
            for i, seen in enumerate(gateway.seen):
                if i not in answered:
                    answered.add(i)
                    reply = {"id": json.loads(seen.payload)["id"], "ok": True}
                    await gateway.publish(f"{seen.topic}/reply", json.dumps(reply).encode())
            await asyncio.sleep(0.02)

    monkeypatch.setenv("TEST_NURSE_PASSWORD", pw["nurse-station-1"])
    nurse = sink_config(broker, "nurse-station-1", "TEST_NURSE_PASSWORD")
    responder = asyncio.create_task(answer())
    try:
        for topic in (f"{ROOM}/command", f"{ROOM}/cuff/command"):
            payload = json.dumps({"id": f"c-{next(_ids)}", "action": "acknowledge"}).encode()
            reply = await request(nurse, topic, payload, json.loads(payload)["id"], timeout_s=WAIT_S)
            assert json.loads(reply) == {"id": json.loads(payload)["id"], "ok": True}
        # The same through the real CLI, logged in as the nurse station (its password from the environment).
        login = ["--username", "nurse-station-1", "--password-env", "TEST_NURSE_PASSWORD"]
        broker_args = ["--host", "127.0.0.1", "--port", str(broker.port), "--site", SITE, *login]
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "ack",
            "--room",
            "1",
            "--alarm",
            "1/oximeter/spo2-low",
            "--role",
            "nurse",
            *broker_args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            out, err = await cli.communicate()
        assert cli.returncode == 0, err.decode()
        assert json.loads(out)["ok"] is True
    finally:
        responder.cancel()


@pytest.mark.integration
async def test_health_account_reads_uptime_only(
    broker: Mosquitto, secrets: Secrets, clients: Callable[..., Client]
) -> None:
    pw = secrets.passwords
    health = await clients(broker, "health", pw["health"]).connected()
    await health.subscribe("$SYS/broker/uptime")
    await health.subscribe("#")
    screen = await clients(broker, "reader-1", pw["reader-1"]).connected()
    await screen.subscribe("#")
    await until(lambda: any(s.topic == "$SYS/broker/uptime" for s in health.seen), "health did not get the uptime")
    gateway = await clients(broker, GATEWAY, pw[GATEWAY]).connected()
    await gateway.publish(f"{ROOM}/oximeter/status", b'{"state": "ok"}', retain=True)
    await until(lambda: bool(screen.live(f"{ROOM}/oximeter/status")), "the screen did not get the status")
    assert {s.topic for s in health.seen} == {"$SYS/broker/uptime"}
    assert not {s.topic for s in screen.seen if s.topic.startswith("$SYS")}, "a screen read $SYS"


# --- the script and the shipped config -----------------------------------------------------------------------------


@pytest.mark.integration
def test_script_keeps_passwords_off_command_lines_and_files_private(tmp_path: Path) -> None:
    """Every program the script runs (openssl, mosquitto_passwd, tar...) is traced: no secret of the site appears in
    any command line, for the central server's files nor for a room PC's bundle; every file holding a secret or a
    private key is 0600 (the script gives each to its service's user when run as root: `--owners none` here)."""
    if shutil.which("strace") is None:
        pytest.fail("strace not found: install it with `sudo apt-get install -y strace`", pytrace=False)
    site, trace = tmp_path / "site", tmp_path / "execve.txt"
    done = run_script("--gateway", "room-pc-1", "--simulated", site=site, trace=trace)
    assert done.returncode == 0, done.stderr
    token = site / "tokens" / "gateways.token"
    token.write_text("a-token-influxdb-would-write\n")
    token.chmod(0o600)  # as deploy/influxdb/init-tokens.sh writes it
    bundle_trace = tmp_path / "bundle-execve.txt"
    bundle = tmp_path / "room-pc-1.tar"
    made = make_secrets(
        "room", "--dir", str(site), "--gateway", "room-pc-1", "--bundle", str(bundle), trace=bundle_trace
    )
    assert made.returncode == 0, made.stderr
    execs = trace.read_text() + bundle_trace.read_text()
    for program in ("mosquitto_passwd", "openssl", "tar"):
        assert f"/{program}" in execs, f"the trace did not see the script run {program}"
    env = read_env(site / "passwords.env")
    secrets = {k: v for k, v in env.items() if "PASSWORD" in k or "TOKEN" in k}
    assert len(secrets) >= 7
    secrets["gateways.token"] = "a-token-influxdb-would-write"
    leaked = [key for key, value in secrets.items() if value in execs]
    assert leaked == [], f"on a command line: {leaked}"

    unpacked = tmp_path / "room"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(unpacked)], check=True, timeout=30)
    private = []
    for folder in (site, unpacked):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            text = path.read_text(errors="replace")
            if "PRIVATE KEY" in text or any(value in text for value in secrets.values()):
                private.append(path)
                assert path.stat().st_mode & 0o777 == 0o600, f"{path.relative_to(tmp_path)} is not 0600"
    names = {str(p.relative_to(tmp_path)) for p in private}
    for expected in ("site/passwords.env", "site/mosquitto/server.key", "site/mosquitto/health/mosquitto_sub",
                     "site/influxdb/admin-token", "site/influxdb/tls.key", "site/grafana/admin-password",
                     "site/grafana/tls.key", "site/tls/ca.key", "site/gateway-sim/mqtt-password",
                     "room/secrets/mqtt-password", "room/secrets/influx-token"):  # fmt: skip
        assert expected in names, f"{expected} holds no secret: {sorted(names)}"
    for path in (bundle, site / "mosquitto" / "passwd", site / "mosquitto" / "acl"):  # hashes, and who may do what
        assert path.stat().st_mode & 0o777 == 0o600, f"{path.name} is not 0600"
    assert (unpacked / "secrets" / "mqtt-password").read_text().strip() == env["MQTT_PASSWORD_GATEWAY_ROOM_PC_1"]
    room_env = read_env(unpacked / "compose.env")
    assert room_env["GATEWAY_ID"] == "room-pc-1" and room_env["COMPOSE_FILE"] == "docker-compose.room.yml"


@pytest.mark.integration
def test_shipped_gateway_configs_log_in_with_their_own_accounts(tmp_path: Path) -> None:
    """No username in the shipped configs: each gateway logs in as "gateway-<id>", the account the script makes
    (the room template's id is the host name: tests/integration/test_two_gateways.py)."""
    site = tmp_path / "site"
    assert run_script("--gateway", "room-pc-1", "--simulated", site=site).returncode == 0
    accounts = {line.split(":")[0] for line in (site / "mosquitto" / "passwd").read_text().splitlines()}
    assert accounts == {"gateway-room-pc-1", "gateway-sim-gw", "reader-1", "nurse-station-1", "health"}
    for config in ("gateway.toml", "gateway-sim.toml"):
        cfg = tomllib.loads((REPO / "deploy" / config).read_text())
        assert "username" not in cfg["mqtt"], config
    assert tomllib.loads((REPO / "deploy" / "gateway-sim.toml").read_text())["gateway"]["id"] == "sim-gw"
    assert "id" not in tomllib.loads((REPO / "deploy" / "gateway.toml").read_text())["gateway"]


@pytest.mark.integration
def test_script_run_again_keeps_passwords_and_the_ca(tmp_path: Path) -> None:
    site = tmp_path / "site"
    assert run_script("--gateway", "room-pc-1", site=site).returncode == 0
    before = read_env(site / "passwords.env")
    ca = (site / "tls" / "ca.crt").read_bytes()
    again = run_script("--readers", "3", site=site)  # the gateways of the last run are kept
    assert again.returncode == 0, again.stderr
    after = read_env(site / "passwords.env")
    assert {k: after[k] for k in before} == before, "a second run changed a password"
    assert set(after) - set(before) == {"MQTT_PASSWORD_READER_2", "MQTT_PASSWORD_READER_3"}
    acl = (site / "mosquitto" / "acl").read_text()
    assert "user reader-3\ntopic read infusion/clinic-a/#\n" in acl and "user gateway-room-pc-1\n" in acl
    assert (site / "tls" / "ca.crt").read_bytes() == ca, "a second run made a new CA: every room PC would need it"

    refused = run_script("--site", "clinic-b", site=site)
    assert refused.returncode == 2 and "compose.env is for site clinic-a" in refused.stderr


def test_every_listener_names_clients_after_their_account() -> None:
    """use_username_as_clientid is a per-listener setting: the one listener (TLS, 8883) sets it."""
    blocks = re.split(r"^(?=#?listener )", SHIPPED_CONF.read_text(), flags=re.MULTILINE)[1:]
    assert len(blocks) == 1
    for block in blocks:
        assert "use_username_as_clientid true" in block.splitlines(), block
    assert "allow_anonymous false" in SHIPPED_CONF.read_text().splitlines()
