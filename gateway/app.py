"""Wiring: config -> device sessions -> outbox -> sink workers, plus the gateway's own status and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from devices.base import DeviceStatus, Reading, Waveform
from gateway.commands import handle_command
from gateway.config import Config
from gateway.delivery import SinkWorker
from gateway.outbox import Outbox
from gateway.records import iso_utc, origin_for, reading_record, status_record, waveform_record
from gateway.session import DeviceSession
from gateway.sinks.influx import InfluxSink
from gateway.sinks.mqtt import MqttSink

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return version("infusion-telemetry")
    except PackageNotFoundError:
        return "0+unknown"


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        g = cfg.gateway
        self.outbox = Outbox(g.data_dir / "outbox.sqlite3", sinks=("mqtt", "influx"))
        self.sessions = [DeviceSession(d, self._emit) for d in cfg.devices]
        self._origins = {s.key: origin_for(g.site, s.cfg.room, s.cfg.name, s.spec) for s in self.sessions}
        self.mqtt = SinkWorker(
            self.outbox,
            lambda: MqttSink(cfg.mqtt, g.site, g.id, g.live_window_s, on_command=self._command),
            "mqtt",
            batch_size=500,
        )
        self.influx = SinkWorker(self.outbox, lambda: InfluxSink(cfg.influx), "influx", cfg.influx.batch_size)
        self.received = 0

    def _command(self, topic: str, payload: bytes) -> bytes:
        by_key = {s.key: s for s in self.sessions}
        return handle_command(self.cfg.mqtt.topic_prefix, self.cfg.gateway.site, by_key, topic, payload)

    def _emit(self, session: DeviceSession, event: Reading | DeviceStatus | Waveform, now: float) -> None:
        """Stamp an event and hand it to the outbox; nothing reaches a sink before the commit."""
        seq = self.outbox.next_seq(session.key)
        origin = self._origins[session.key]
        if isinstance(event, Reading):
            record = reading_record(origin, seq, now, event)
        elif isinstance(event, Waveform):
            record = waveform_record(origin, seq, now, event)
        else:
            record = status_record(origin, seq, now, event)
        self.received += 1
        self.outbox.put(session.key, seq, record)

    async def status(self) -> dict[str, Any]:
        backlog = await self.outbox.backlog()
        return {
            "v": 1,
            "type": "gateway",
            "site": self.cfg.gateway.site,
            "gateway": self.cfg.gateway.id,
            "time": iso_utc(time.time()),
            "version": package_version(),
            "devices": {s.key: str(s.state) if s.state else "starting" for s in self.sessions},
            "counters": {
                "received": self.received,
                "committed": self.outbox.committed,
                "published": self.mqtt.delivered,
                "written": self.influx.delivered,
                "protocol_errors": sum(s.protocol_errors for s in self.sessions),
                "backlog_mqtt": backlog.get("mqtt", 0),
                "backlog_influx": backlog.get("influx", 0),
                "rejected": self.mqtt.rejected + self.influx.rejected,
            },
        }

    async def _status_loop(self) -> None:
        while True:
            body = await self.status()
            sink = self.mqtt.sink
            if isinstance(sink, MqttSink):
                sink.gateway_status = body
                with contextlib.suppress(Exception):
                    await sink.publish_gateway_status()
            await self.outbox.prune()
            await asyncio.sleep(self.cfg.gateway.status_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        await self.outbox.open()
        log.info(
            "gateway %s/%s started: %d device(s), outbox %s",
            self.cfg.gateway.site,
            self.cfg.gateway.id,
            len(self.sessions),
            self.outbox.path,
        )
        committer = asyncio.create_task(self.outbox.run_committer(), name="outbox")
        workers = [asyncio.create_task(w.run(), name=f"sink-{w.name}") for w in (self.mqtt, self.influx)]
        sessions = [asyncio.create_task(s.run(), name=f"device-{s.key}") for s in self.sessions]
        status = asyncio.create_task(self._status_loop(), name="status")
        everything = [committer, *workers, *sessions, status]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *everything], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                log.error("task %s failed: %r", task.get_name(), task.exception())
        await self._shutdown(committer, workers, [*sessions, status, stopper])

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
        await self.outbox.close()
        log.info("gateway stopped; still owed (kept in the outbox): %s", backlog)
