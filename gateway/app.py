"""Wiring: config -> device sessions -> outbox -> sink workers, plus the gateway's own status and shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, TypeVarTuple

import msgspec

from devices.base import DeviceStatus, Reading, Waveform
from gateway.alarms import AlarmEngine, EngineEvent, RoomModeEvent, SessionEvent
from gateway.backoff import Backoff
from gateway.clock import ClockCheck
from gateway.commands import CommandRouter
from gateway.config import Config
from gateway.envelope import (
    GatewayCounters,
    GatewayStatusMessage,
    Origin,
    Record,
    alarm_record,
    gateway_origin,
    gateway_status_record,
    iso_after,
    iso_utc,
    origin_for,
    reading_record,
    room_mode_record,
    room_origin,
    session_record,
    status_record,
    waveform_record,
)
from gateway.health import HealthServer
from gateway.outbox import Outbox
from gateway.session import DeviceSession
from gateway.sink_worker import LiveFirst, RenderedBacklog, SinkWorker
from gateway.sinks import SinkUnavailable
from gateway.sinks.influx import InfluxSink
from gateway.sinks.mqtt import MqttSink, RetainedState

if TYPE_CHECKING:
    from gateway.notify.worker import NotifyWorker

log = logging.getLogger(__name__)
Args = TypeVarTuple("Args")
CLOCK_CHECK_S = 60.0
LINK_FLAP_WINDOW_S = 60.0
LINK_FLAP_LOSSES = 3


def package_version() -> str:
    try:
        return version("infusion-telemetry")
    except PackageNotFoundError:
        return "0+unknown"


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        g = cfg.gateway
        sinks = ("mqtt", "influx", "notify") if cfg.notify is not None else ("mqtt", "influx")
        self.outbox = Outbox(g.data_dir / "outbox.sqlite3", sinks, g.outbox_commit_interval_ms / 1000)
        # Alarm notifications (docs/notifications.md): its own cursor; target URLs resolved here, before any port opens.
        self.notify: NotifyWorker | None = None
        if cfg.notify is not None:
            from gateway.notify.worker import NotifyWorker  # Apprise is imported only where it is used

            self.notify = NotifyWorker(self.outbox, cfg.notify, cfg.commands.silence_max_s)
        self.sessions = [DeviceSession(d, self._emit) for d in cfg.devices]
        self._origins = {s.key: origin_for(g.site, s.cfg.room, s.cfg.name, s.spec) for s in self.sessions}
        # Retained topics outlive each connection (and, through the outbox, a restart): put back after every connect.
        self.retained = RetainedState(on_change=self._retained_changed)
        self._retained_save: asyncio.TimerHandle | None = None
        self.mqtt = SinkWorker(
            self.outbox,
            lambda: MqttSink(
                cfg.mqtt,
                g.site,
                g.id,
                g.live_window_s,
                on_command=self._command,
                commands=self.router.subscriptions,
                retained=self.retained,
            ),
            "mqtt",
            batch_size=20,  # small, and the replay paced to half the loop's time: live data first
            backoff=Backoff(0.5, cfg.mqtt.reconnect_max_s),
            live_first=LiveFirst(backlog_share=0.5),
        )
        self.influx = SinkWorker(
            self.outbox,
            lambda: InfluxSink(cfg.influx),
            "influx",
            cfg.influx.batch_size,
            backoff=Backoff(0.5, cfg.influx.reconnect_max_s),
            linger_s=cfg.influx.flush_interval_s,
            renderer=RenderedBacklog(),  # a backlog is read and rendered by a worker process: its GIL is not ours
        )
        self.received = 0
        self._last_time: dict[str, str] = {}  # outbox key -> time of its latest record
        self.profile = cfg.alarms.build()
        if self.profile.example:
            log.warning(
                "alarm profile %r is the shipped EXAMPLE of a site policy, not clinical advice: "
                "configure [alarms] rules with your clinicians",
                self.profile.name,
            )
        schedules = {d.key: d.measure_every_s for d in cfg.devices if d.measure_every_s is not None}
        stale = {s.key: s.spec.stale_after_s for s in self.sessions}
        self.alarms = AlarmEngine(self.profile, schedules, stale)
        self._alarm_origins = dict(self._origins)
        self._alarm_origins[f"_gateway/{g.id}"] = gateway_origin(g.site, g.id)
        self.clock = ClockCheck(cfg.influx)  # InfluxDB's Date header: the clock the wall's staleness is judged by
        self.router = CommandRouter(
            cfg.mqtt.topic_prefix,
            g.site,
            {s.key: s for s in self.sessions},
            self,
            cfg.commands,
            on_change=lambda ledger: self.outbox.put_state("commands", ledger),
        )

    def _command(self, topic: str, payload: bytes) -> bytes | None:
        return self.router.handle(topic, payload)

    def _put(self, key: str, build: Callable[[Origin, int, *Args], Record], origin: Origin, *args: *Args) -> None:
        """Number the record in its key's sequence, build it (`build(origin, seq, *args)`: mypy checks `args`
        against the builder) and queue it for the next commit. Its time is made strictly later than the key's
        previous record: InfluxDB identifies a point by series and time, so two records stamped alike (lines that
        arrived in one read, an acknowledgement and the clear it causes) would overwrite each other there."""
        seq = self.outbox.next_seq(key)
        record = build(origin, seq, *args)
        last = self._last_time.get(key)
        if last is not None and record.time <= last:
            record = msgspec.structs.replace(record, time=iso_after(last))
        self._last_time[key] = record.time
        self.outbox.put(key, seq, record)

    def _emit(self, session: DeviceSession, event: Reading | DeviceStatus | Waveform, now: float) -> None:
        """Stamp an event and hand it to the outbox; nothing reaches a sink before the commit. Then alarms, whose
        records and state go in the same transaction (the outbox commits what this step of the loop put)."""
        origin = self._origins[session.key]
        room, device = session.cfg.room, session.cfg.name
        self.received += 1
        if isinstance(event, Reading):
            self._put(session.key, reading_record, origin, now, event)
            self._alarm_events(self.alarms.on_reading(room, device, event.metrics, event.flags, now))
        elif isinstance(event, Waveform):
            self._put(session.key, waveform_record, origin, now, event)
        else:
            self._put(session.key, status_record, origin, now, event)
            self._alarm_events(self.alarms.on_status(room, device, event.state, event.code, now))

    def _alarm_events(self, events: Sequence[EngineEvent]) -> None:
        """Every engine transition becomes a record; the engine's state is committed in the same transaction."""
        if not events:
            return
        site = self.cfg.gateway.site
        for event in events:
            if isinstance(event, SessionEvent):
                self._put(f"{event.room}/_room", session_record, room_origin(site, event.room), event)
                log.info("room %s: session %s %s %s", event.room, event.session_id, event.transition, event.baseline)
                continue
            if isinstance(event, RoomModeEvent):
                self._put(f"{event.room}/_room", room_mode_record, room_origin(site, event.room), event)
                log.warning("room %s: %s %s", event.room, event.mode.upper(), event.reason)
                continue
            key = f"{event.room}/{event.device}"
            self._put(key, alarm_record, self._alarm_origins[key], event, self.profile.name, self.profile.example)
            log.log(
                logging.WARNING if event.transition in ("raised", "escalated") else logging.INFO,
                "alarm %s %s (%s, %s) value=%s limit=%s",
                event.alarm_id,
                event.transition,
                event.priority,
                event.message,
                event.value,
                event.limit,
            )
        self.outbox.put_state("alarms", self.alarms.snapshot)  # taken when the commit starts

    # -- room actions (RoomActions, for MQTT commands and the CLI) --------------------------------------------

    def acknowledge(self, room: str, alarm_id: str, role: str | None) -> None:
        self._alarm_events(self.alarms.acknowledge(room, alarm_id, role, time.time()))

    def silence(self, room: str, alarm_id: str, seconds: float, role: str | None) -> None:
        renewals = self.cfg.commands.silence_max_renewals
        self._alarm_events(self.alarms.silence(room, alarm_id, seconds, role, time.time(), renewals))

    def start_session(self, room: str, role: str | None) -> str:
        now = time.time()
        session_id = f"{room}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}"
        self._alarm_events(self.alarms.start_session(room, session_id, now))
        return session_id

    def stop_session(self, room: str, role: str | None) -> None:
        self._alarm_events(self.alarms.stop_session(room, time.time()))

    def standby(self, room: str, seconds: float, role: str | None) -> None:
        self._alarm_events(self.alarms.standby(room, seconds, role, time.time()))

    def end_standby(self, room: str, role: str | None) -> None:
        self._alarm_events(self.alarms.end_standby(room, role, time.time()))

    def _retained_changed(self) -> None:
        """Save the retained topics with the next commit, at most once a second (a burst of status changes is one
        write)."""
        if self._retained_save is None:

            def save() -> None:
                self._retained_save = None
                self.outbox.put_state("retained", self.retained.snapshot())

            self._retained_save = asyncio.get_running_loop().call_later(1.0, save)

    async def restore_state(self) -> None:
        """The state of the last run (a clean stop or a crash): the command ids already handled (a repeat is not
        run again), and the alarm state: acknowledged, silenced, latched alarms, sessions and standby carry on;
        physiological alarms wait for fresh data to be judged again."""
        ledger = await self.outbox.load_state("commands")
        if ledger is not None:
            try:
                self.router.ledger.restore(ledger, time.time())
            except (ValueError, TypeError) as exc:
                log.error("command ids of the last run are unreadable (%s): repeats within the window may run", exc)
        retained = await self.outbox.load_state("retained")
        if retained is not None:
            try:
                self.retained.restore(retained)
            except (ValueError, TypeError, AttributeError) as exc:
                log.error("retained topics of the last run are unreadable (%s): they return as devices report", exc)
        snapshot = await self.outbox.load_state("alarms")
        if snapshot is None:
            return
        try:
            events = self.alarms.restore(snapshot, {s.key for s in self.sessions}, time.time())
        except (ValueError, TypeError, KeyError) as exc:
            log.error("alarm state of the last run is unreadable (%s): starting without it", exc)
            return
        log.info("alarm state restored: %d active alarm(s)", len(self.alarms.active()))
        self._alarm_events(events)

    async def _alarm_loop(self) -> None:
        """Delays, escalations and the gateway's own technical alarms, checked every tick."""
        limit = self.cfg.gateway.outbox_max_records
        fill = 0.0
        last_fill_check = 0.0
        while True:
            now = time.time()
            if now - last_fill_check >= 5.0:
                last_fill_check = now
                fill = max((await self.outbox.backlog()).values(), default=0) / limit
            self._alarm_events(self.alarms.tick(now))
            # A link that keeps dropping (another client taking the gateway's id, a flapping network) counts as lost
            # even if each reconnect succeeds at once.
            link = self.mqtt.connected and self.mqtt.losses_within(LINK_FLAP_WINDOW_S) < LINK_FLAP_LOSSES
            self._alarm_events(self.alarms.on_gateway(self.cfg.gateway.id, link, fill, now))
            storage = self.outbox.storage_error
            detail = None if storage is None else f"{storage}; {self.outbox.unsaved} records wait in memory"
            self._alarm_events(self.alarms.on_storage(self.cfg.gateway.id, detail, self.outbox.unsaved, now))
            await asyncio.sleep(self.cfg.alarms.tick_s)

    async def _relay_unsaved(self) -> None:
        """While the outbox cannot be written, live records still reach MQTT (marked `durable: false`) so the wall
        and the alarms keep working; each is published again, durable, once it is committed."""
        while True:
            await self.outbox.unsaved_ready.wait()
            records = self.outbox.take_unsaved()
            sink = self.mqtt.sink
            if not records or not isinstance(sink, MqttSink):
                continue
            try:
                await sink.write_undurable(records)
            except SinkUnavailable as exc:
                log.warning("%d undurable records not published: %s", len(records), exc)

    async def _clock_loop(self) -> None:
        """The gateway's clock against the database's, every CLOCK_CHECK_S: a skewed clock makes the wall show
        stale values as live (gateway ahead) or live ones as NO DATA (behind). Unreachable: the alarm stays as is."""
        while True:
            reading = await self.clock.measure()
            if reading is not None:
                events = self.alarms.on_clock(
                    self.cfg.gateway.id, reading.skew_s, reading.uncertainty_s, reading.server, time.time()
                )
                self._alarm_events(events)
            await asyncio.sleep(CLOCK_CHECK_S)

    def status_message(self) -> GatewayStatusMessage:
        """From memory only (the health endpoint asks per request): no query, no file read, nothing that queues
        behind the outbox's threads."""
        backlog = self.outbox.owed()
        if "_version" not in self.__dict__:
            self.__dict__["_version"] = package_version()  # reads the package metadata: once
        return GatewayStatusMessage(
            site=self.cfg.gateway.site,
            gateway=self.cfg.gateway.id,
            time=iso_utc(time.time()),
            version=self.__dict__["_version"],
            devices={s.key: str(s.state) if s.state else "starting" for s in self.sessions},
            counters=GatewayCounters(
                received=self.received,
                committed=self.outbox.committed,
                published=self.mqtt.delivered,
                written=self.influx.delivered,
                protocol_errors=sum(s.protocol_errors for s in self.sessions),
                backlog_mqtt=backlog.get("mqtt", 0),
                backlog_influx=backlog.get("influx", 0),
                rejected=self.mqtt.rejected + self.influx.rejected,
                dropped=self.outbox.dropped,
                unsaved=self.outbox.unsaved if self.outbox.storage_error else 0,
                unsaved_dropped=self.outbox.unsaved_dropped,
            ),
            links={
                "mqtt": "up" if self.mqtt.connected else "down",
                "influx": "up" if self.influx.connected else "down",
                "storage": "up" if self.outbox.storage_error is None else "down",
                **{s.key: str(s.state) if s.state else "starting" for s in self.sessions},
            },
            state="online"
            if self.mqtt.connected and self.influx.connected and self.outbox.storage_error is None
            else "degraded",
        )

    async def status(self) -> dict[str, Any]:
        """The status as the health endpoint serves it: the retained gateway status message, as JSON values."""
        status: dict[str, Any] = msgspec.to_builtins(self.status_message())
        return status

    async def _status_loop(self) -> None:
        while True:
            body = self.status_message()
            sink = self.mqtt.sink
            if isinstance(sink, MqttSink):
                sink.gateway_status = body
                try:
                    await sink.publish_gateway_status()
                except SinkUnavailable as exc:  # the sink has marked itself lost: its worker reconnects
                    log.warning("gateway status not published: %s", exc)
            g = self.cfg.gateway
            # The same counters as a record, so InfluxDB keeps their history for the gateway-health dashboard.
            self._put(
                f"_gateway/{g.id}", gateway_status_record, self._alarm_origins[f"_gateway/{g.id}"], time.time(), body
            )
            await self.outbox.prune(g.outbox_max_records, g.outbox_max_age_s)
            await asyncio.sleep(g.status_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        await self.outbox.open()
        await self.restore_state()
        health: HealthServer | None = None
        if self.cfg.gateway.health_port is not None:
            health = HealthServer(self.cfg.gateway.health_host, self.cfg.gateway.health_port, self.status)
            try:
                await health.start()
                health.ready = True
            except OSError as exc:  # a taken port must not stop the readings: say so loudly and go on
                log.error("health endpoint not started on port %d: %s", self.cfg.gateway.health_port, exc)
                health = None
        log.info(
            "gateway %s/%s started: %d device(s), outbox %s",
            self.cfg.gateway.site,
            self.cfg.gateway.id,
            len(self.sessions),
            self.outbox.path,
        )
        committer = asyncio.create_task(self.outbox.run_committer(), name="outbox")
        workers = [asyncio.create_task(w.run(), name=f"sink-{w.name}") for w in (self.mqtt, self.influx)]
        if self.notify is not None:
            workers.append(asyncio.create_task(self.notify.run(), name="sink-notify"))
        sessions = [asyncio.create_task(s.run(), name=f"device-{s.key}") for s in self.sessions]
        status = asyncio.create_task(self._status_loop(), name="status")
        alarms = asyncio.create_task(self._alarm_loop(), name="alarms")
        clock = asyncio.create_task(self._clock_loop(), name="clock")
        relay = asyncio.create_task(self._relay_unsaved(), name="unsaved-relay")
        everything = [committer, *workers, *sessions, status, alarms, clock, relay]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *everything], return_when=asyncio.FIRST_COMPLETED)
        ended = [task for task in done if task is not stopper]  # a task of the gateway's never ends by itself
        for task in ended:
            if task.exception() is not None:
                log.error("task %s failed: %r", task.get_name(), task.exception())
        if health is not None:
            health.ready = False
        await self._shutdown(committer, workers, [*sessions, status, alarms, clock, relay, stopper])
        if health is not None:
            await health.stop()
        if ended:  # not a clean stop: the process must exit non-zero (gateway.preflight's exit codes)
            from gateway.preflight import task_fatal

            raise task_fatal(ended[0].get_name(), ended[0].exception(), self.outbox.path)

    async def _shutdown(
        self,
        committer: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        others: list[asyncio.Task[Any]],
    ) -> None:
        """Stop reading, commit what was read, give the sinks a bounded time to deliver; the rest stays owed."""
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._retained_save is not None:  # a change of the last second: saved now, not lost with the timer
            self._retained_save.cancel()
            self._retained_save = None
            self.outbox.put_state("retained", self.retained.snapshot())
        await self.outbox.flush()
        deadline = time.monotonic() + self.cfg.gateway.shutdown_timeout_s
        while time.monotonic() < deadline:
            backlog = await self.outbox.backlog()
            if not any(backlog.values()):
                break
            await asyncio.sleep(0.05)
        for task in [*workers, committer]:
            task.cancel()
        await asyncio.gather(*workers, committer, return_exceptions=True)
        backlog = await self.outbox.backlog()
        unsaved, reason = self.outbox.unsaved, self.outbox.storage_error
        await self.outbox.close()
        log.info("gateway stopped; still owed (kept in the outbox): %s", backlog)
        if unsaved:  # stopped while the disk was full: what waited in memory is gone, and that must not read as fine
            from gateway.preflight import EXIT_STORAGE, Fatal

            raise Fatal(
                EXIT_STORAGE,
                f"{unsaved} records could not be saved before the stop ({reason}) -> free space in "
                f"{self.outbox.path.parent}",
            )
