"""Store and forward between sites: the shipped bridge (deploy/mosquitto/bridge.conf.example) between two real
mosquitto processes, a site's central broker and the clinic group's broker.

The site broker runs the shipped file with four lines substituted, each asserted to occur exactly once: the group
broker's address, the bridge account's password, the CA file (a CA made here with openssl) and the reconnect backoff
(so the test waits seconds, not the shipped cap of 15 s). Around it, what a real site broker has: accounts, an ACL
and persistence. The group broker has a TLS listener for the bridge (certificate signed by that CA, host name
127.0.0.1 verified by the bridge), an ACL that lets the bridge account write only its site's tree, persistence, and
a plain loopback listener for the test's observer, a consumer with a persistent session as a group service has.

Readings are published at QoS 1 by a client logged in as a gateway, on the gateway's topics, each with a unique id.
During an outage of the group broker more readings are published than mosquitto queues by default (1,000) and the
site broker is restarted as well; afterwards every reading is counted at the group broker by id, with its payload.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devtools.localservices import Mosquitto, ServiceUnavailable, find_binary, find_free_port
from tests.helpers import wait_for

REPO = Path(__file__).parent.parent.parent
SHIPPED = REPO / "deploy" / "mosquitto" / "bridge.conf.example"
SITE = "clinic-a"
STATE_TOPIC = f"infusion-bridge/{SITE}/state"
GATEWAY = "gateway-room-pc-1"
BRIDGE = f"bridge-{SITE}"
OBSERVER = "group-reader"
OUTAGE_READINGS = 1500  # over mosquitto's default max_queued_messages (1,000): the shipped limit must be in force
LIVE_READINGS = 20
WAIT_S = 10.0
RECONNECT_WAIT_S = 20.0  # the bridge retries every 1-2 s here (substituted backoff); the observer every second
_ids = itertools.count(1)


# --- the two brokers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def make_pki(folder: Path) -> Pki:
    """A CA and the group broker's certificate for 127.0.0.1 (P-256 keys: made in milliseconds)."""
    openssl = find_binary("openssl", "/usr/bin/openssl", "openssl")
    folder.mkdir(parents=True)
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    cert, key, csr, ext = folder / "server.crt", folder / "server.key", folder / "server.csr", folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sign = ["-days", "2", "-extfile", ext]
    steps = [
        [openssl, "req", "-x509", *ec, "-days", "2", "-subj", "/CN=test group CA", "-keyout", ca_key, "-out", ca],
        [openssl, "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", *sign, "-out", cert],
    ]
    for step in steps:
        done = subprocess.run([str(s) for s in step], capture_output=True, text=True, check=False, timeout=30)
        assert done.returncode == 0, f"{' '.join(map(str, step))} failed:\n{done.stderr}"
    return Pki(ca, cert, key)


def write_passwd(path: Path, accounts: dict[str, str]) -> Path:
    """mosquitto_passwd reads each password from stdin, as deploy/make-secrets.sh has it do."""
    tool = find_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd", "mosquitto")
    path.touch(mode=0o600)
    for account, password in accounts.items():
        done = subprocess.run(
            [tool, str(path), account], input=f"{password}\n{password}\n", capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"mosquitto_passwd {account} failed: {done.stderr}"
    return path


def common(folder: Path, acl: str, passwords: dict[str, str]) -> str:
    """What every clinic broker has: accounts, an ACL, persistence, logging to the test's log file."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "acl").write_text(acl)
    return (
        "per_listener_settings false\nallow_anonymous false\n"
        f"password_file {write_passwd(folder / 'passwd', passwords)}\nacl_file {folder / 'acl'}\n"
        f"persistence true\npersistence_location {folder / 'data'}/\n"
        "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
    )


def group_config(folder: Path, pki: Pki, tls_port: int, passwords: dict[str, str]) -> Callable[[str, int], str]:
    """The group broker: a TLS listener for bridges, each bridge account writing its own site only; a plain loopback
    listener (the port Mosquitto checks for readiness) for the test's observer."""
    acl = (
        f"user {BRIDGE}\ntopic write infusion/{SITE}/#\ntopic write {STATE_TOPIC}\n\n"
        f"user {OBSERVER}\ntopic read infusion/#\ntopic read infusion-bridge/#\n"
    )
    base = common(folder, acl, passwords)

    def render(host: str, port: int) -> str:
        return (
            base
            # As at the site: the default of 1,000 queued messages a client would drop a site's backlog arriving
            # faster than a consumer takes it.
            + "max_queued_messages 2000000\nmax_queued_bytes 1073741824\n"
            + f"listener {port} {host}\n"
            + f"listener {tls_port} {host}\ncafile {pki.ca}\ncertfile {pki.cert}\nkeyfile {pki.key}\n"
            + "tls_version tlsv1.2\n"
        )

    return render


def site_config(folder: Path, pki: Pki, group_tls_port: int, bridge_password: str, passwords: dict[str, str]) -> (
    Callable[[str, int], str]
):  # fmt: skip
    """The site's central broker: the shipped bridge file, four lines substituted (the module docstring)."""
    acl = f"user {GATEWAY}\ntopic readwrite infusion/{SITE}/#\ntopic read {STATE_TOPIC}\n"
    base = common(folder, acl, passwords)
    lines = SHIPPED.read_text().splitlines()
    substitutions = {
        "address group-broker.example.org:8883": f"address 127.0.0.1:{group_tls_port}",
        "remote_password CHANGE-ME": f"remote_password {bridge_password}",
        "bridge_cafile /mosquitto/site/conf.d/group-ca.crt": f"bridge_cafile {pki.ca}",
        "restart_timeout 2 15": "restart_timeout 1 2",
    }
    for line in substitutions:
        assert lines.count(line) == 1, f"the shipped bridge.conf.example no longer has {line!r} once: update the test"
    bridge = "\n".join(substitutions.get(line, line) for line in lines) + "\n"

    def render(host: str, port: int) -> str:
        return base + f"listener {port} {host}\n" + bridge

    return render


def start(broker: Mosquitto) -> Mosquitto:
    try:
        broker.start()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    return broker


# --- clients -------------------------------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], reason: str | Callable[[], str], timeout: float = WAIT_S) -> None:
    """wait_for, failing with `reason` (a callable is asked at that moment, to say how far it got)."""
    try:
        await wait_for(predicate, timeout)
    except AssertionError:
        raise AssertionError(f"within {timeout:g} s: {reason() if callable(reason) else reason}") from None


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Client:
    """A paho client in its own network thread that reconnects by itself (every second) and records what it receives.
    `persistent`: a fixed client id with clean_session false, so the broker queues for it while it is away."""

    broker: Mosquitto
    account: str
    password: str
    subscriptions: tuple[str, ...] = ()
    persistent: bool = False
    seen: list[Seen] = field(default_factory=list)
    pubacks: set[int] = field(default_factory=set)
    connects: int = 0

    def __post_init__(self) -> None:
        client_id = f"{self.account}-{'session' if self.persistent else next(_ids)}"
        self.paho = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not self.persistent, protocol=paho.MQTTv311
        )
        self.paho.username_pw_set(self.account, self.password)
        self.paho.reconnect_delay_set(1, 1)
        self.paho.on_connect = self._on_connect
        self.paho.on_message = lambda _c, _u, m: self.seen.append(Seen(m.topic, bytes(m.payload), bool(m.retain)))
        self.paho.on_publish = lambda _c, _u, mid, _rc, _p: self.pubacks.add(mid)
        self.paho.connect_async(self.broker.host, self.broker.port, keepalive=10)
        self.paho.loop_start()

    def _on_connect(self, client: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        assert not rc.is_failure, f"{self.account} refused: {rc}"
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connects += 1

    async def connected(self) -> Client:
        await until(lambda: self.connects > 0, f"{self.account} did not connect to {self.broker.url}")
        return self

    async def publish(self, messages: list[tuple[str, bytes]], retain: bool = False) -> None:
        """QoS 1, waiting for every PUBACK: once they came, the broker has the messages (and owes them the bridge)."""
        mids = {self.paho.publish(topic, payload, qos=1, retain=retain).mid for topic, payload in messages}
        await until(lambda: mids <= self.pubacks, lambda: f"{self.account}: {len(mids - self.pubacks)} PUBACKs missing")

    def payloads(self, topic: str) -> list[bytes]:
        return [s.payload for s in self.seen if s.topic == topic]

    def state(self) -> bytes | None:
        """The bridge's latest notification, as this client saw it."""
        states = self.payloads(STATE_TOPIC)
        return states[-1] if states else None

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def reading(room: str, seq: int) -> tuple[str, bytes]:
    """A reading as the gateway publishes it (topic, id `room/device/seq`); no patient data, as everywhere."""
    body = {
        "v": 1, "site": SITE, "room": room, "device": "oximeter", "model": "masimo-ascii1", "kind": "pulse_oximeter",
        "id": f"{room}/oximeter/{seq}", "seq": seq, "time": "2026-11-25T02:03:04.512345Z", "historical": False,
        "type": "reading", "metrics": {"spo2": 90 + seq % 9, "pulse_rate": 60 + seq % 40, "perfusion_index": 3.6},
        "units": {"spo2": "%", "pulse_rate": "/min", "perfusion_index": "%"},
        "mdc": {"spo2": 150456, "pulse_rate": 149530, "perfusion_index": 150448},
        "flags": [], "valid": True, "device_time": "2026-11-25T02:03:04",
    }  # fmt: skip
    return f"infusion/{SITE}/{room}/oximeter/reading", json.dumps(body).encode()


def received(observer: Client) -> dict[str, list[bytes]]:
    """id -> every payload the group broker delivered with that id (QoS 1: a repeat is possible, a loss is not)."""
    found: dict[str, list[bytes]] = {}
    for seen in observer.seen:
        if seen.topic.endswith("/reading"):
            found.setdefault(json.loads(seen.payload)["id"], []).append(seen.payload)
    return found


def missing(expected: dict[str, bytes], observer: Client) -> str:
    gone = sorted(set(expected) - set(received(observer)))
    return f"{len(gone)} of {len(expected)} readings missing at the group broker (ids {', '.join(gone[:8])} ...)"


# --- the test ------------------------------------------------------------------------------------------------------


async def test_readings_published_during_a_bridge_outage_all_arrive_at_the_group_broker(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    passwords = {GATEWAY: "gw-secret-1", BRIDGE: "bridge-secret-1", OBSERVER: "reader-secret-1"}
    tls_port = find_free_port()
    group = Mosquitto(tmp_path / "group", config=group_config(tmp_path / "group", pki, tls_port, passwords))
    site = Mosquitto(
        tmp_path / "site", config=site_config(tmp_path / "site", pki, tls_port, passwords[BRIDGE], passwords)
    )
    made: list[Client] = []

    def clients(*args: Any, **kwargs: Any) -> Client:
        made.append(client := Client(*args, **kwargs))
        return client

    try:
        start(group)
        observer = await clients(
            group, OBSERVER, passwords[OBSERVER], ("infusion/#", "infusion-bridge/#"), persistent=True
        ).connected()
        start(site)
        gateway = await clients(site, GATEWAY, passwords[GATEWAY], (STATE_TOPIC,)).connected()
        await until(lambda: observer.state() == b"1", "the bridge never said it is up at the group broker")

        # The link works: readings go through as they are published.
        live = [reading("1", seq) for seq in range(1, LIVE_READINGS + 1)]
        await gateway.publish(live)
        expected = {json.loads(payload)["id"]: payload for _, payload in live}
        await until(lambda: set(received(observer)) == set(expected), lambda: missing(expected, observer))

        # The group broker goes away; the site notices (its local notification says "0").
        group.stop()
        await until(lambda: gateway.state() == b"0", "the site broker did not notice the bridge was down")
        outage = [reading(str(2 + seq % 3), seq) for seq in range(1, OUTAGE_READINGS + 1)]
        await gateway.publish(outage)
        expected.update({json.loads(payload)["id"]: payload for _, payload in outage})
        status_topic = f"infusion/{SITE}/2/oximeter/status"
        status = json.dumps({"v": 1, "type": "status", "id": "2/oximeter/999999", "state": "probe_off"}).encode()
        await gateway.publish([(status_topic, status)], retain=True)

        # The site broker restarts too, while the queue waits: the queue is in its database, not only in memory.
        site.restart()
        await until(lambda: gateway.connects >= 2, "the gateway's client did not reconnect to the restarted site")

        # The group broker comes back: everything that waited arrives, every reading, byte for byte.
        start(group)
        await until(
            lambda: set(received(observer)) >= set(expected), lambda: missing(expected, observer), RECONNECT_WAIT_S
        )
        got = received(observer)
        assert set(got) == set(expected), (
            f"readings at the group broker that were never published: {set(got) - set(expected)}"
        )
        wrong = [i for i, payloads in got.items() if any(p != expected[i] for p in payloads)]
        assert not wrong, f"payloads changed on the way: {wrong[:5]}"
        repeats = sum(len(p) - 1 for p in got.values())
        assert len(got) == LIVE_READINGS + OUTAGE_READINGS, f"{len(got)} distinct readings ({repeats} repeats)"
        # (the observer's own resubscriptions deliver the retained copy again: count the content, not the copies)
        assert set(observer.payloads(status_topic)) == {status}

        # A group consumer that subscribes now gets the site's state retained, and the link up.
        fresh = await clients(
            group, OBSERVER, passwords[OBSERVER], (f"infusion/{SITE}/+/+/status", STATE_TOPIC)
        ).connected()
        await until(lambda: fresh.payloads(status_topic) == [status], "the retained status is not on the group broker")
        assert all(s.retain for s in fresh.seen if s.topic == status_topic)
        await until(lambda: fresh.state() == b"1", "the group broker does not say the link is up")

        # The site broker dies: its last will tells the group that this site's retained statuses are not current.
        site.kill()
        await until(lambda: fresh.state() == b"0", "the group broker did not learn that the site's link was lost")
    finally:
        for client in made:
            client.close()
        site.stop()
        group.stop()
