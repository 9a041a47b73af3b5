"""The aiomqtt adapter: the only module that imports aiomqtt (publishing for the gateway, subscribing for watch).

QoS 1 for everything the gateway publishes: aiomqtt's publish returns after the broker's PUBACK, so a batch is
acknowledged to the outbox only when the broker has it. Redeliveries carry the same `id`, so they are recognisable.

A record's payload is its body as the outbox stored it, published as it is; only a record sent after the live window
(marked `historical`) or before it was committed (marked `durable: false`) is encoded again, with that mark.

The records' path (`write`) publishes through the paho client under aiomqtt directly (`LivePublisher`): one future per
batch for its PUBACKs instead of a task, an event and a timeout per message, and the packets written at the end of
the loop's pass instead of after a wake-up through the loop's self-pipe and an add_writer/remove_writer pair per
message. Everything else (the will, retained topics put back, the gateway status, commands) goes through aiomqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import aiomqtt
from msgspec.structs import replace

from gateway.config import MqttSection, resolve_secret
from gateway.envelope import (
    AlarmMessage,
    GatewayStatusMessage,
    GatewayStatusRecord,
    Record,
    RoomModeMessage,
    SessionMessage,
    StatusMessage,
    device_topic,
    encode,
    gateway_topic,
    iso_utc,
    record_type,
)
from gateway.errors import GatewayError
from gateway.sinks import ACCEPTED, SinkUnavailable, WriteResult

if TYPE_CHECKING:
    from gateway.outbox import Item

log = logging.getLogger(__name__)
PUBACK_TIMEOUT_S = 10.0  # as aiomqtt's own publish: a batch not acknowledged by then means a lost link
CommandHandler = Callable[[str, bytes], bytes | None]  # (topic, payload) -> reply payload (None: no reply)
# aiomqtt warns on every publish beyond 10 in flight, which a backlog batch always is: keep its errors only.
_client_log = logging.getLogger("gateway.sinks.mqtt.client")
_client_log.setLevel(logging.ERROR)


def _tls_context(cfg: MqttSection) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None)
    if cfg.tls.cert_file and cfg.tls.key_file:
        ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
    if cfg.tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_client(cfg: MqttSection, identifier: str, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    password = resolve_secret(cfg.password, "mqtt.password")
    return aiomqtt.Client(
        hostname=cfg.host,
        port=cfg.port,
        username=cfg.username,
        password=password.get_secret_value() if password else None,
        identifier=identifier,
        will=will,
        keepalive=cfg.keepalive_s,
        tls_context=_tls_context(cfg),
        timeout=10,
        max_queued_outgoing_messages=10_000,
        logger=_client_log,
    )


class RetainedState:
    """The newest message of every retained topic the gateway owns (device statuses, active alarms, sessions, room
    modes). It outlives a connection (owned by the gateway, given to every sink it builds) and, through the outbox's
    state, a restart: after a broker restart without persistence, or a gateway restart, every retained topic is put
    back. A topic only moves forward in time: a backlog record drained after a newer live one must not put an older
    state back (a cleared alarm would come back as a ghost on the wall)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.payloads: dict[str, bytes] = {}  # topic -> what it holds now (a cleared topic is absent)
        self.times: dict[str, str] = {}  # topic -> event time of the newest message routed there (ISO UTC)
        self.on_change = on_change

    def newest(self, topic: str, at: str) -> bool:
        """Whether a record of time `at` may take the topic (fixed-width ISO UTC: string order is time order)."""
        if at < self.times.get(topic, ""):
            return False
        self.times[topic] = at
        return True

    def published(self, topic: str, payload: bytes) -> None:
        if payload:
            self.payloads[topic] = payload
        else:
            self.payloads.pop(topic, None)
        if self.on_change is not None:
            self.on_change()

    def snapshot(self) -> dict[str, Any]:
        return {
            "v": 1,
            "times": dict(self.times),
            "payloads": {t: p.decode() for t, p in self.payloads.items()},
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        if snapshot.get("v") != 1:
            raise ValueError(f"unknown retained state version {snapshot.get('v')!r}")
        self.times = {str(t): str(at) for t, at in snapshot.get("times", {}).items()}
        self.payloads = {str(t): str(p).encode() for t, p in snapshot.get("payloads", {}).items()}


Finished = Callable[[BaseException | None], None]  # a batch's end: None (every PUBACK came) or why not


class _Batch:
    """The PUBACKs one batch still waits for, since when (monotonic), and whom to tell when it ends."""

    __slots__ = ("finished", "mids", "since", "waiting")

    def __init__(self, finished: Finished, since: float) -> None:
        self.finished = finished
        self.since = since
        self.waiting = 0
        self.mids: list[int] = []


class LivePublisher:
    """QoS 1 publishing of record batches on the paho client that aiomqtt wraps (see the module docstring). Installed
    on the client before it connects: its write callbacks replace aiomqtt's for every packet the client sends, and its
    PUBACK callback passes on the acknowledgements it does not wait for (aiomqtt's own publishes). One timer a
    second (`_watch`) fails a batch whose PUBACKs are overdue, in place of a timeout armed and cancelled per batch."""

    def __init__(self, client: aiomqtt.Client, on_error: Callable[[str], None]) -> None:
        self._paho = client._client  # aiomqtt's paho client (aiomqtt 2.x): the one connection, not a second one
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._on_error = on_error
        self._flush_due = False
        self._in_publish = False  # send() writes its packets itself, once, at its end
        self._writer: int | None = None  # the fd watched for writability while the socket's buffer is full
        self._acks: dict[int, _Batch] = {}  # mid -> the batch waiting for its PUBACK
        self._batches: dict[_Batch, None] = {}  # waiting for PUBACKs, oldest first
        self._passed_on: Callable[..., None] | None = self._paho.on_publish
        self._paho.on_publish = self._published
        self._paho.on_socket_register_write = self._register_write
        self._paho.on_socket_unregister_write = self._unregister_write
        self._watchdog = self._loop.call_later(1.0, self._watch)

    def close(self) -> None:
        """The connection ends: every batch still waiting ends with SinkUnavailable."""
        self._watchdog.cancel()
        self._fail(list(self._batches), "MQTT connection closed")

    def _fail(self, batches: list[_Batch], reason: str) -> None:
        for batch in batches:
            self._batches.pop(batch, None)
            for mid in batch.mids:
                self._acks.pop(mid, None)
            batch.finished(SinkUnavailable(reason))

    def _watch(self) -> None:
        overdue = time.monotonic() - PUBACK_TIMEOUT_S
        late = [b for b in self._batches if b.since < overdue]
        if late:
            self._fail(late, f"MQTT: PUBACKs not received in {PUBACK_TIMEOUT_S:g} s")
        self._watchdog = self._loop.call_later(1.0, self._watch)

    def _register_write(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        """paho has packets to send: send() writes its own at its end; anything else (aiomqtt's publishes, a
        PUBACK for a command) at the end of this pass of the loop."""
        if self._flush_due:
            return
        self._flush_due = True
        if threading.get_ident() != self._thread:  # aiomqtt connects from a worker thread
            self._loop.call_soon_threadsafe(self._flush)
        elif not self._in_publish:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if not self._flush_due:
            return
        self._flush_due = False
        try:
            self._paho.loop_write()
        except Exception as exc:  # as aiomqtt's own callback: a broken socket is a lost link
            self._on_error(f"MQTT write failed: {exc!r}")
            return
        sock = self._paho.socket()
        if self._paho.want_write() and self._writer is None and sock is not None:
            self._writer = sock.fileno()  # the socket's buffer is full: wait until it can take more
            self._loop.add_writer(self._writer, self._writable)

    def _writable(self) -> None:
        self._flush_due = True
        self._flush()

    def _unregister_write(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        if self._writer is not None:
            self._loop.remove_writer(self._writer)
            self._writer = None

    def _published(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        batch = self._acks.pop(mid, None)
        if batch is None:
            if self._passed_on is not None:
                self._passed_on(client, userdata, mid, reason, properties)
            return
        batch.waiting -= 1
        if batch.waiting == 0:
            self._batches.pop(batch, None)
            batch.finished(None)

    def send(self, messages: Sequence[tuple[str, bytes, bool]], finished: Finished) -> None:
        """Publish every message at QoS 1, written before this returns; `finished` is called once, from the loop:
        with None when the broker has acknowledged them all, or with SinkUnavailable (the PUBACKs did not come
        within PUBACK_TIMEOUT_S (+ 1 s), or the connection closed). Raises SinkUnavailable when paho refuses one
        (then `finished` is never called)."""
        batch = _Batch(finished, time.monotonic())
        self._in_publish = True
        try:
            for topic, payload, retain in messages:
                info = self._paho.publish(topic, payload, 1, retain)
                if info.rc != 0:  # MQTT_ERR_SUCCESS
                    raise SinkUnavailable(f"MQTT publish failed: paho error {info.rc}")
                batch.mids.append(info.mid)
                self._acks[info.mid] = batch
                batch.waiting += 1
        except BaseException:
            for mid in batch.mids:
                self._acks.pop(mid, None)
            raise
        finally:
            self._in_publish = False
            self._flush()
        if batch.waiting:
            self._batches[batch] = None
        else:
            self._loop.call_soon(finished, None)

    async def publish(self, messages: Sequence[tuple[str, bytes, bool]]) -> None:
        """send() and wait for its end; SinkUnavailable as send() says."""
        done: asyncio.Future[None] = self._loop.create_future()

        def finished(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        self.send(messages, finished)
        await done


class MqttSink:
    """Publishes outbox records and the retained gateway status (with a last will saying "offline")."""

    name = "mqtt"

    def __init__(
        self,
        cfg: MqttSection,
        site: str,
        gateway_id: str,
        live_window_s: float,
        on_command: CommandHandler | None = None,
        commands: list[str] | None = None,
        retained: RetainedState | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_command = on_command
        self.command_topics = commands or []
        self._listener: asyncio.Task[None] | None = None
        self.site = site
        self.gateway_id = gateway_id
        self.live_window_s = live_window_s
        self.status_topic = gateway_topic(cfg.topic_prefix, site, gateway_id)
        self._client: aiomqtt.Client | None = None
        self.retained = retained if retained is not None else RetainedState()
        self.gateway_status: GatewayStatusMessage | None = None  # the latest, from the gateway's status loop
        self.published = 0
        self._lost: asyncio.Future[str] | None = None
        self._live: LivePublisher | None = None
        self._since: tuple[int, str] = (0, "")

    def _gateway_body(self, offline: bool = False) -> bytes:
        """The retained gateway status as of now: the latest the gateway gave (online before its first)."""
        now = iso_utc(time.time())
        status = self.gateway_status
        if status is None:
            status = GatewayStatusMessage(site=self.site, gateway=self.gateway_id, state="online", time=now)
        return encode(replace(status, state="offline" if offline else status.state, time=now))

    def _offline(self) -> bytes:
        return self._gateway_body(offline=True)

    async def __aenter__(self) -> Self:
        will = aiomqtt.Will(self.status_topic, self._offline(), qos=1, retain=True)
        client = make_client(self.cfg, f"infusion-gw-{self.site}-{self.gateway_id}", will)
        self._live = LivePublisher(client, self._mark_lost)
        try:
            await client.__aenter__()
        except BaseException as exc:
            self._live.close()
            self._live = None
            if isinstance(exc, aiomqtt.MqttError):
                raise SinkUnavailable(f"MQTT broker {self.cfg.host}:{self.cfg.port}: {exc}") from exc
            raise
        self._client = client
        self._lost = asyncio.get_running_loop().create_future()
        log.info("connected to MQTT broker %s:%s", self.cfg.host, self.cfg.port)
        try:
            # After a broker restart without persistence (or a gateway restart) the retained topics may be gone or
            # stale: put the newest of each back, from the gateway's own durable memory of them.
            held = list(self.retained.payloads.items())
            await asyncio.gather(*(client.publish(t, p, qos=1, retain=True) for t, p in held))
            if held:
                log.info("retained topics put back after connecting: %d", len(held))
            await self.publish_gateway_status()
            if self.on_command is not None:
                for topic in self.command_topics:
                    await client.subscribe(topic, qos=1)
                self._listener = asyncio.create_task(self._listen(client), name="mqtt-commands")
        except aiomqtt.MqttError as exc:
            await self.__aexit__(None, None, None)
            raise SinkUnavailable(f"MQTT publish failed after connect: {exc}") from exc
        return self

    async def _listen(self, client: aiomqtt.Client) -> None:
        """Commands in, replies out, until the link goes. Whatever happens here ends in a log line and a lost link
        (the worker reconnects, /health says degraded, broker_lost counts it): never a silent death."""
        assert self.on_command is not None
        try:
            async for message in client.messages:
                topic = str(message.topic)
                payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                if message.retain:
                    # A retained command would run again on every reconnect: never executed, and cleared.
                    if payload:
                        log.warning("retained command message ignored and cleared on a command topic")
                        await client.publish(topic, b"", qos=1, retain=True)
                    continue
                reply = self.on_command(topic, payload)
                if reply is not None:
                    await client.publish(f"{topic}/reply", reply, qos=1)
            reason = "the broker ended the command subscription"
        except aiomqtt.MqttError as exc:
            reason = f"MQTT link lost: {exc}"
        except Exception as exc:  # a bug must not leave the gateway deaf while it says it is online
            reason = f"MQTT command listener failed: {type(exc).__name__}"
        log.warning("%s; reconnecting", reason)
        self._mark_lost(reason)

    def _mark_lost(self, reason: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)

    async def wait_lost(self) -> str:
        """Returns (with the reason) when the link is lost: the listener ended or a publish failed."""
        assert self._lost is not None, "not connected"
        return await asyncio.shield(self._lost)

    async def __aexit__(self, *exc: object) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        client, self._client = self._client, None
        if self._live is not None:
            self._live.close()
        if client is None:
            return
        # A clean stop says "offline" itself; the will only fires on an unclean loss.
        try:
            await client.publish(self.status_topic, self._offline(), qos=1, retain=True, timeout=2)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish the offline status (%s): the broker's last will says it instead", exc)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def publish_gateway_status(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            await client.publish(self.status_topic, self._gateway_body(), qos=1, retain=True)
        except aiomqtt.MqttError as exc:
            self._mark_lost(f"MQTT gateway status publish failed: {exc}")
            raise SinkUnavailable(f"MQTT gateway status publish failed: {exc}") from exc

    def _route(self, record: Record, payload: bytes, live_since: str) -> list[tuple[str, bytes, bool]]:
        """(topic, payload, retain) for each message a record becomes (docs/mqtt.md); `payload` is the record's
        JSON. Records that arrived before `live_since` (fixed-width ISO UTC, so string order is time order) go out
        marked historical."""
        prefix, site, room, device = self.cfg.topic_prefix, record.site, record.room, record.device
        if isinstance(record, GatewayStatusRecord):
            return []  # stored only: the retained gateway status carries the same counters live
        if isinstance(record, StatusMessage):
            topic = device_topic(prefix, site, room, device, "status")
            return [(topic, payload, True)] if self._newest(topic, record) else []
        if record.time < live_since and not record.historical:
            record = replace(record, historical=True)
            payload = encode(record)
        if isinstance(record, AlarmMessage):
            base = f"{prefix}/{site}/{room}/alarms"
            # The retained "active" topic holds the alarm while it lasts; an empty retained message removes it.
            active = payload if record.active else b""
            routed = [(f"{base}/events", payload, False)]
            topic = f"{base}/active/{device}/{record.rule}"
            return [*routed, (topic, active, True)] if self._newest(topic, record) else routed
        if isinstance(record, SessionMessage | RoomModeMessage):
            topic = f"{prefix}/{site}/{room}/{'session' if isinstance(record, SessionMessage) else 'mode'}"
            return [(topic, payload, True)] if self._newest(topic, record) else []
        return [(device_topic(prefix, site, room, device, record_type(record)), payload, False)]

    def _newest(self, topic: str, record: Record) -> bool:
        """Whether a retained topic should take this record: only if nothing newer was routed there before."""
        return self.retained.newest(topic, record.time)

    def push(self, batch: Sequence[Item], finished: Finished) -> None:
        """Publish committed records now, from the caller's step (the sink worker's listener on the outbox: see
        sink_worker.Pushed); `finished(None)` once the broker has them all, or `finished(SinkUnavailable)` (the
        link is then marked lost). Raises what routing a record raises (that record's fault) or SinkUnavailable."""
        live = self._live
        if self._client is None or live is None:
            raise SinkUnavailable("not connected")
        live_since = self._live_since()
        routed = [message for it in batch for message in self._route(it.decoded(), it.body, live_since)]

        def done(error: BaseException | None) -> None:
            if error is None:
                for topic, payload, retain in routed:
                    if retain:
                        self.retained.published(topic, payload)
                self.published += len(batch)
            else:
                self._mark_lost(str(error))
            finished(error)

        try:
            live.send(routed, done)
        except SinkUnavailable as exc:
            self._mark_lost(str(exc))
            raise

    async def write(self, batch: Sequence[Item]) -> WriteResult:
        """Publish committed records, each as the outbox stored it (LivePublisher: the records' fast path)."""
        live = self._live
        if self._client is None or live is None:
            raise SinkUnavailable("not connected")
        live_since = self._live_since()
        routed = [message for it in batch for message in self._route(it.decoded(), it.body, live_since)]
        try:
            await live.publish(routed)
        except SinkUnavailable as exc:
            self._mark_lost(str(exc))
            raise
        for topic, payload, retain in routed:
            if retain:
                self.retained.published(topic, payload)
        self.published += len(batch)
        return ACCEPTED

    async def write_undurable(self, records: Sequence[Record]) -> WriteResult:
        """Publish records not yet committed (the outbox cannot be written), marked `durable: false`: the wall
        and the alarms keep working; each comes again, durable, once it is committed."""
        undurable = [replace(r, durable=False) for r in records]
        return await self._publish([(r, encode(r)) for r in undurable])

    def _live_since(self) -> str:
        """The time before which a record goes out marked historical, to the whole second (formatted once a
        second: the records' own times are formatted by the same iso_utc, which keeps the latest second)."""
        second = math.floor(time.time() - self.live_window_s)
        if second != self._since[0]:
            self._since = (second, iso_utc(second))
        return self._since[1]

    async def _publish(self, batch: list[tuple[Record, bytes]]) -> WriteResult:
        """Route (record, payload) pairs and publish every message they become."""
        client = self._client
        if client is None:
            raise SinkUnavailable("not connected")
        live_since = self._live_since()
        routed = [message for record, payload in batch for message in self._route(record, payload, live_since)]
        try:
            await asyncio.gather(*(client.publish(t, p, qos=1, retain=r) for t, p, r in routed))
        except aiomqtt.MqttError as exc:
            self._mark_lost(f"MQTT publish failed: {exc}")
            raise SinkUnavailable(f"MQTT publish failed: {exc}") from exc
        for topic, payload, retain in routed:
            if retain:
                self.retained.published(topic, payload)
        self.published += len(batch)
        return ACCEPTED


@asynccontextmanager
async def subscribe(
    cfg: MqttSection, topics: list[str], identifier: str
) -> AsyncIterator[AsyncIterator[tuple[str, bytes]]]:
    """Subscribe and yield (topic, payload) pairs: for `watch` and for tests that want our own client settings.
    A broker that cannot be reached, or a link lost while iterating, raises BrokerError (never aiomqtt's type)."""
    try:
        async with make_client(cfg, identifier) as client:
            for topic in topics:
                await client.subscribe(topic, qos=1)

            async def messages() -> AsyncIterator[tuple[str, bytes]]:
                try:
                    async for msg in client.messages:
                        payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
                        yield str(msg.topic), payload
                except aiomqtt.MqttError as exc:
                    raise BrokerError(str(exc)) from exc

            yield messages()
    except aiomqtt.MqttError as exc:
        raise BrokerError(str(exc)) from exc


class BrokerError(GatewayError):
    """The MQTT broker could not be reached, or the link was lost (for the CLI, watch and tests)."""


async def request(cfg: MqttSection, topic: str, payload: bytes, command_id: str, timeout_s: float = 10.0) -> bytes:
    """Publish a command and wait for the gateway's reply with the same id (the CLI's `session` and `ack`)."""
    try:
        async with make_client(cfg, f"infusion-cli-{command_id}") as client:
            await client.subscribe(f"{topic}/reply", qos=1)
            await client.publish(topic, payload, qos=1)
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    body = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                    try:
                        if json.loads(body).get("id") == command_id:
                            return body
                    except (ValueError, AttributeError):
                        continue
    except aiomqtt.MqttError as exc:
        raise BrokerError(str(exc)) from exc
    raise TimeoutError  # pragma: no cover - the loop above only ends by returning or timing out
