"""One device session: keep its port open, feed the driver, stamp events, and say when the device is unavailable.

Unavailable is a state, not an absence: a port that cannot be opened or is lost gives `disconnected`, an open port
that stays silent longer than the model's `stale_after_s` gives `no_data` (a serial device server never reports a
lost cable, so only silence tells). Both reach the outbox like any other status.

`run` is the I/O; what it does with what the driver decoded (`handle`) and with time passing (`advance`) is plain
code, public so that it can be driven without a port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from devices.base import (
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    Driver,
    DriverOptions,
    Event,
    Measuring,
    Polling,
    ProtocolError,
    Reading,
    Waveform,
)
from devices.registry import get_model
from gateway.backoff import Backoff
from gateway.config import DeviceConfig
from gateway.errors import GatewayError
from gateway.serial_port import SerialPort, TransportError

log = logging.getLogger(__name__)
HELD_WAIT_S = 0.2  # the chores' longest sleep while something waits for its slot or commands are due

# The session's one output: (device session, event, receive time) -> None; the app stamps and commits it.
EmitEvent = Callable[["DeviceSession", Reading | DeviceStatus | Waveform, float], None]


class CommandRejected(GatewayError):
    """A valid command this device cannot carry out now; the text is the reason sent back."""


class DeviceSession:
    def __init__(self, cfg: DeviceConfig, emit: EmitEvent, clock: Callable[[], float] = time.time) -> None:
        model = get_model(cfg.model)
        spec = model.spec
        if cfg.baudrate is not None:
            spec = replace(spec, serial=replace(spec.serial, baudrate=cfg.baudrate))
        if cfg.stale_after_s is not None:
            spec = replace(spec, stale_after_s=cfg.stale_after_s)
        self.cfg = cfg
        self.spec: DeviceSpec = spec
        # The config's per-device options reach the driver (measurement_timeout_s was validated, then ignored).
        self.driver: Driver = model.driver(DriverOptions(measurement_timeout_s=cfg.measurement_timeout_s))
        self.emit = emit
        self.clock = clock
        self.state: DeviceState | None = None
        self.last_status: DeviceStatus | None = None
        self.received = 0
        self.protocol_errors = 0
        self.last_data_at: float | None = None
        self._last_error_log = 0.0
        self._held: Reading | None = None  # the latest reading of a fast device, waiting for its slot
        self._last_published = float("-inf")
        self._wave: list[int] = []
        self._wave_rate = 0.0
        self._wave_since = 0.0
        self._next_measurement: float | None = None
        self._port: SerialPort | None = None
        self._device_status: DeviceStatus | None = None  # the driver's latest, to restore after no_data
        self._stale = False  # silent longer than stale_after_s (no_data said)
        self._wake: asyncio.Future[None] | None = None  # the chores' sleep, cut short when a reading is held
        self._sleep_until = 0.0
        # Drivers that never send (output-only devices) need no polling for outgoing commands.
        self._polling = self.driver if isinstance(self.driver, Polling) else None

    @property
    def key(self) -> str:
        return self.cfg.key

    def _status(self, status: DeviceStatus) -> None:
        if self.last_status == status:
            return
        self.last_status = status
        self.state = status.state
        log.info("%s: %s %s", self.key, status.state, status.detail)
        self.emit(self, status, self.clock())

    async def run(self) -> None:
        backoff = Backoff(0.2, 10.0)
        while True:
            try:
                async with SerialPort(self.cfg.port, self.spec.serial) as port:
                    backoff.reset()
                    self.driver.reset()
                    self._device_status = None
                    self._status(DeviceStatus(DeviceState.CONNECTED, detail=f"port {self.cfg.port} open"))
                    if self.cfg.measure_every_s is not None and self._next_measurement is None:
                        self._next_measurement = self.clock() + 5.0  # a first measurement soon after start
                    self._port = port
                    try:
                        await self._pump(port)
                    finally:
                        self._port = None
            except TransportError as exc:
                self._status(DeviceStatus(DeviceState.DISCONNECTED, detail=str(exc)))
                await asyncio.sleep(backoff.next())

    async def _pump(self, port: SerialPort) -> None:
        """Bytes are pushed to `data_received` as they come (from the event loop's readiness callback for a local
        tty: no task wakes up per chunk); this loop does the chores that time brings (commands to send, a scheduled
        measurement, what waits for its slot, silence) and returns only by the port's loss (TransportError)."""
        self._stale = False
        next_send = 0.0
        self.last_data_at = self.clock()  # silence is counted from the moment the port opened
        port.deliver_to(self.data_received)
        while True:
            now = self.clock()
            if self._next_measurement is not None and now >= self._next_measurement:
                self._scheduled_measurement(now)
            if self._polling is not None and now >= next_send:
                out = self._polling.outgoing(now)
                if out:
                    await port.write(out)
                next_send = now + 0.2
                self.handle(self._polling.poll(now), now)
            self.advance(now)
            if not self._stale and now - (self.last_data_at or 0.0) >= self.spec.stale_after_s:
                self._stale = True
                silent = self.spec.stale_after_s
                self._status(DeviceStatus(DeviceState.NO_DATA, detail=f"silent for {silent:g} s"))
            wait = self._wait_s(now, self._stale)
            self._sleep_until = now + wait
            wake = self._wake = asyncio.get_running_loop().create_future()
            await asyncio.wait([port.lost, wake], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            self._wake = None
            if port.lost.done():
                port.lost.result()  # TransportError (or what decoding raised)

    def data_received(self, data: bytes) -> None:
        """A chunk from the port: decode it and hand on what it held. Only decoded records count as data: a line
        spewing garbage is as good as silent."""
        now = self.clock()
        events = self.driver.feed(data, now)
        for event in events:
            if not isinstance(event, ProtocolError):
                self.last_data_at = now
                if self._stale and self._device_status is not None:
                    self._status(self._device_status)  # back from no_data: the device's own state again
                self._stale = False
                break
        self.handle(events, now)
        # Something now waits for its slot: the chores must not sleep on until the device would be stale.
        waiting = self._held is not None or bool(self._wave)
        wake = self._wake
        if waiting and self._sleep_until > now + HELD_WAIT_S and wake is not None and not wake.done():
            wake.set_result(None)

    def _wait_s(self, now: float, stale: bool) -> float:
        """How long the chores may sleep: until the device would be stale, or 0.2 s when something is due sooner
        (commands to send, a held reading or waveform, a measurement). An output-only device that talks once a
        second is not woken in between: at 200 devices that is most of the gateway's CPU."""
        wait = 1.0 if stale else (self.last_data_at or now) + self.spec.stale_after_s - now
        if self._polling is not None or self._held is not None or self._wave:
            wait = min(wait, HELD_WAIT_S)
        if self._next_measurement is not None:
            wait = min(wait, self._next_measurement - now)
        return max(0.05, wait)

    def handle(self, events: list[Event], now: float) -> None:
        """What the driver decoded from bytes received at `now`: statuses and (thinned) readings go out, protocol
        errors are counted, waveforms are batched (when the device opted in)."""
        for event in events:
            if isinstance(event, ProtocolError):
                self.protocol_errors += 1
                if now - self._last_error_log > 10:  # line noise must not flood the log
                    self._last_error_log = now
                    log.warning(
                        "%s: %s: %s (%d bytes dropped; %d errors so far)",
                        self.key,
                        event.kind,
                        event.detail,
                        len(event.dropped),
                        self.protocol_errors,
                    )
            elif isinstance(event, DeviceStatus):
                self._device_status = event
                self._status(event)
            elif isinstance(event, Waveform):
                if self.cfg.waveform:
                    self._collect_wave(event, now)
            else:
                self.received += 1
                if self.spec.publish_interval_s is None:
                    self.emit(self, event, now)
                else:
                    self._held = event
        self.advance(now)

    def advance(self, now: float) -> None:
        """Time passed: what waits for its slot goes out. Fast devices (60 records a second) are thinned to the
        latest reading per publish interval; waveforms go out in one batch a second."""
        interval = self.spec.publish_interval_s
        if self._held is not None and interval is not None and now - self._last_published >= interval:
            reading, self._held = self._held, None
            self._last_published = now
            self.emit(self, reading, now)
        if self._wave and now - self._wave_since >= 1.0:
            wave = Waveform("pleth", tuple(self._wave), self._wave_rate)
            self._wave = []
            self._wave_since = now
            self.emit(self, wave, now)

    def _collect_wave(self, event: Waveform, now: float) -> None:
        if not self._wave:
            self._wave_since = now
        self._wave.extend(event.samples)
        self._wave_rate = event.rate_hz

    # -- measurements (NIBP) -------------------------------------------------------------------------------------

    def _scheduled_measurement(self, now: float) -> None:
        assert self.cfg.measure_every_s is not None
        self._next_measurement = now + self.cfg.measure_every_s
        try:
            self.start_measurement(now)
        except CommandRejected as exc:
            log.warning("%s: scheduled measurement skipped: %s", self.key, exc)

    def start_measurement(self, now: float | None = None) -> None:
        """Start an NIBP measurement now (schedule or command). Raises CommandRejected with the reason."""
        if not isinstance(self.driver, Measuring):
            raise CommandRejected(f"{self.cfg.model} does not take measurements on request")
        if self._port is None:
            raise CommandRejected(f"port {self.cfg.port} is not open ({self.state})")
        if not self.driver.start_measurement(self.clock() if now is None else now):
            raise CommandRejected("a measurement is already running")
