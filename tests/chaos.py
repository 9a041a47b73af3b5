"""`make chaos`: a seeded, bounded fault schedule against the real gateway, mosquitto and influxd (issue 15).

    python -m tests.chaos --seed 1 --minutes 3 --devices 10

D simulated Rad-8 oximeters (one line a second each, every line with a unique device time) talk to the real gateway
CLI over real ptys. A schedule drawn from the seed kills mosquitto, influxd and the gateway with SIGKILL and
restarts them after 2-20 s, and closes device ptys and recreates them at the same link, outages overlapping. The
broker restarts either from its own persistence file or wiped (it forgets every retained message and session).

After every fault and every recovery the gateway's word is checked against the truth, within SETTLE_S:
- `/health`: `links.mqtt` down exactly while the broker is down, `links.influx` down exactly while influxd is down,
  each device `ok` while its pty exists and `disconnected` while it does not, `state` online only when both sinks
  are up; once it matched, it is sampled twice a second until the next event and must not drift (issue 15, obs. 3);
- the broker's retained `infusion/<site>/+/+/status` (a fresh subscriber): every device's state, the gateway's own
  (`online`/`degraded` as `/health` says, `offline` once the gateway was killed with its link up), checked when the
  fault settles and again just before the next event (issue 15, obs. 1-2).
At the end every reading is counted by (device, device time): each one the device wrote while the gateway had held
its port open for OPEN_SETTLE_S, and kept it for READ_GRACE_S after, must be in InfluxDB exactly once and on MQTT at
least once (a persistent-session subscriber; repeats must carry the same `id`); no reading may be in InfluxDB twice.

Not a pytest module (no `test_` prefix): it runs for minutes and prints figures. Exit 0 when no violation was found,
1 with each violation named, 2 when the run itself could not be carried out (a service would not start).

How the harness keeps the count exact (test-side choices, not gateway behaviour):
- a device writes only while the gateway process has its pty open (read from /proc/<pid>/fd): what a device sends
  while nobody listens is lost at the UART, and pyserial flushes the input when it opens a port;
- a wiped broker would drop what the gateway publishes before the counting subscriber has subscribed again, so for
  a wiped restart the gateway is paused (SIGSTOP) from before the broker starts until the subscriber is back
  (SIGCONT): a stall of about a second that the gateway must survive too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt

from devices.base import Sample
from devices.registry import get_model
from devtools.localservices import HOST, Influxd, Mosquitto, ServiceUnavailable, find_free_port
from simulators.serve import PtyEndpoint
from tests.helpers import start_gateway, stop_gateway, write_gateway_config

MASIMO = get_model("masimo-ascii1")
SITE = "test-site"  # write_gateway_config's site
GATEWAY_ID = "gw-chaos"
START = datetime(2026, 1, 1, 8, 0, 0)  # device time of each device's first line; one second more per line

LINE_INTERVAL_S = 1.0  # a Rad-8's rate
TICK_S = 0.1  # how often the devices look at /proc and write
OPEN_SETTLE_S = 1.0  # a port open this long has been flushed by pyserial: later lines are owed
READ_GRACE_S = 2.0  # a line written this close before a SIGKILL or a pty close may not have been read: not owed
SETTLE_S = 30.0  # bound for the truth to show after an event: longest reconnect backoff 10 s + a start under load
SERVICE_START_S = 60.0  # influxd under load can take a while to open its shards
OBSERVER_BACK_S = 20.0  # bound for the counting subscriber to be subscribed again to a wiped broker
DELIVERY_S = 180.0  # bound for both sinks to drain once every fault is over
SAMPLE_S = 0.5  # /health sampling between events
FAULT_S = (2.0, 20.0)  # outage length, uniform
RATES = {"broker": 1.0, "influxd": 1.0, "gateway": 1.0, "pty": 1.5}  # faults a minute, each kind
MARGIN_S = 4.0  # between two faults on one target


class RunError(Exception):
    """The harness could not carry out the run (a service would not start): no verdict on the gateway."""


# --- the schedule -----------------------------------------------------------------------------------------------


@dataclass
class Fault:
    n: int
    kind: str  # broker | influxd | gateway | pty
    target: str  # the service, or the device key for a pty
    variant: str  # kill | wipe (broker) | close (pty)
    start: float  # planned, seconds after the run starts
    duration: float  # planned
    injected: float | None = None  # actual, seconds after the run starts
    restored: float | None = None

    def overlaps(self, other: Fault) -> bool:
        return self.start < other.start + other.duration and other.start < self.start + self.duration


@dataclass(order=True)
class Event:
    at: float
    order: int  # restores before injections at the same instant, then by fault number
    fault: Fault = field(compare=False)
    action: str = field(compare=False)  # inject | restore


def make_schedule(seed: int, seconds: float, devices: list[str]) -> list[Fault]:
    """Faults at random times in [5 s, end - 5 s]; two on one target never overlap, any others may."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    minutes = seconds / 60.0
    wanted = [kind for kind, rate in RATES.items() for _ in range(max(1, round(rate * minutes)))]
    rng.shuffle(wanted)
    for kind in wanted:
        for _ in range(200):
            duration = round(rng.uniform(*FAULT_S), 1)
            start = round(rng.uniform(5.0, max(5.0, seconds - duration - 5.0)), 1)
            target = rng.choice(devices) if kind == "pty" else kind
            variant = {"broker": rng.choice(("kill", "wipe")), "pty": "close"}.get(kind, "kill")
            fault = Fault(0, kind, target, variant, start, duration)
            same = [f for f in faults if f.target == target]
            if all(start > f.start + f.duration + MARGIN_S or start + duration + MARGIN_S < f.start for f in same):
                faults.append(fault)
                break
    faults.sort(key=lambda f: f.start)
    for i, fault in enumerate(faults, 1):
        fault.n = i
    return faults


def events_of(faults: list[Fault]) -> list[Event]:
    events = [Event(f.start, 1_000 + f.n, f, "inject") for f in faults]
    events += [Event(f.start + f.duration, f.n, f, "restore") for f in faults]
    return sorted(events)


# --- the devices --------------------------------------------------------------------------------------------------


@dataclass
class Line:
    t: float  # monotonic time it was written
    device_time: str
    settled: bool  # the gateway had held the port open for OPEN_SETTLE_S


class Device:
    """A Rad-8 on a pty that talks only while the gateway holds the port (see the module's docstring)."""

    def __init__(self, room: str, link: Path, offset: float) -> None:
        self.room = room
        self.key = f"{room}/oximeter"
        self.link = link
        self.endpoint: PtyEndpoint | None = PtyEndpoint(link=link)
        self.k = 0
        self.next_at = time.monotonic() + offset
        self.open_since: float | None = None
        self.lines: list[Line] = []
        self.disruptions: list[float] = []  # monotonic times of a SIGKILL of the gateway or a pty close

    @property
    def present(self) -> bool:
        return self.endpoint is not None

    def tick(self, now: float, open_ttys: set[str]) -> None:
        ep = self.endpoint
        if ep is None or ep.path not in open_ttys:
            self.open_since = None
            return
        if self.open_since is None:
            self.open_since = now
        if now < self.next_at:
            return
        self.next_at = max(self.next_at + LINE_INTERVAL_S, now)
        when = START + timedelta(seconds=self.k)
        self.k += 1
        values = {"spo2": 93 + self.k % 6, "pulse_rate": 60 + self.k % 40, "perfusion_index": 3.5}
        before = ep.frames_written
        ep.write(MASIMO.encode(Sample(values, device_time=when)))
        if ep.frames_written > before:
            self.lines.append(Line(now, when.strftime("%Y-%m-%dT%H:%M:%S"), now - self.open_since >= OPEN_SETTLE_S))

    def owed(self, line: Line) -> bool:
        return line.settled and not any(line.t <= d <= line.t + READ_GRACE_S for d in self.disruptions)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


def open_ttys(pid: int | None) -> set[str]:
    """The ptys the gateway process holds open now."""
    if pid is None:
        return set()
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/pts/"):
                    found.add(target)
    return found


# --- what the gateway says ------------------------------------------------------------------------------------------


class Observer:
    """A persistent-session subscriber counting every reading by (room, device time), with its ids."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.readings: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.messages = 0
        self.subscribed_at = 0.0  # monotonic time of the last completed subscription
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(HOST, self.port, identifier="chaos-observer", clean_session=False) as c:
                    await c.subscribe(f"infusion/{SITE}/+/+/reading", qos=1)
                    self.subscribed_at = time.monotonic()
                    async for msg in c.messages:
                        if isinstance(msg.payload, bytes) and msg.payload:
                            body = json.loads(msg.payload)
                            self.messages += 1
                            self.readings[(body["room"], body["device_time"])].append(body["id"])
            except aiomqtt.MqttError:
                self.subscribed_at = 0.0
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def get_health(port: int) -> dict[str, Any] | None:
    """GET /health without blocking the loop; None when nothing answers 200 within 2 s."""
    try:
        async with asyncio.timeout(2.0):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                await writer.drain()
                data = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    doc: dict[str, Any] = json.loads(body)
    return doc


async def read_retained(port: int, expect: int) -> dict[str, dict[str, Any]] | None:
    """The retained `infusion/<site>/+/+/status` messages a fresh subscriber gets now (None: no broker answered).
    Stops once `expect` topics came or nothing more came for 0.5 s."""
    found: dict[str, dict[str, Any]] = {}
    try:
        async with aiomqtt.Client(HOST, port, identifier=f"chaos-retained-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"infusion/{SITE}/+/+/status", qos=1)
            messages = aiter(client.messages)
            deadline = time.monotonic() + 3.0
            while len(found) < expect:
                wait = min(0.5 if found else 1.5, deadline - time.monotonic())
                if wait <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(anext(messages), wait)
                except TimeoutError:
                    break
                if msg.retain and isinstance(msg.payload, bytes) and msg.payload:
                    found[str(msg.topic)] = json.loads(msg.payload)
    except aiomqtt.MqttError:
        return None
    return found


# --- the run --------------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    checkpoints: int = 0
    health_checks: int = 0
    health_passed: int = 0
    health_settle: list[float] = field(default_factory=list)
    health_samples: int = 0  # steady-state samples between events
    health_drift: int = 0
    retained_checks: int = 0
    retained_passed: int = 0
    retained_settle: list[float] = field(default_factory=list)
    will_unknowable: int = 0  # gateway down, but its last will could not have reached the broker that holds now
    freezes: int = 0
    unexpected_exits: int = 0


class Chaos:
    def __init__(self, workdir: Path, seed: int, minutes: float, n_devices: int, settle_s: float) -> None:
        self.workdir = workdir
        self.seed = seed
        self.seconds = minutes * 60.0
        self.settle_s = settle_s
        self.mosquitto = Mosquitto(workdir / "mosquitto")
        self.mosquitto.persistence = True  # the counting subscriber's session survives a SIGKILL of the broker
        self.influxd = Influxd(workdir / "influxd")
        self.db = "chaos"
        self.health_port = find_free_port()
        self.devices: list[Device] = []
        self.n_devices = n_devices
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = workdir / "gateway.toml"
        self.broker_up = True
        self.influx_up = True
        self.gateway_up = False
        self.will_expected = False  # the broker holds the gateway's last will ("offline") as retained
        self.gen = 0  # bumped at every event; steady-state samples of an older generation are discarded
        self.steady_gen = -1  # the generation whose truth /health has shown
        self.violations: list[str] = []
        self.figures = Figures()
        self.faults: list[Fault] = []
        self.t0 = 0.0
        self.stopping = False
        self.observer: Observer | None = None
        self.label = "start"  # the last event, for messages
        self.drifting: dict[int, tuple[float, int, int]] = {}  # gen -> (first seen, samples, index in violations)

    # truth --------------------------------------------------------------------------------------------------------

    def device_truth(self, d: Device) -> str:
        return "ok" if d.present else "disconnected"

    def health_diffs(self, doc: dict[str, Any] | None) -> list[str]:
        if doc is None:
            return ["/health did not answer 200"]
        links = doc.get("links", {})
        want = {"mqtt": "up" if self.broker_up else "down", "influx": "up" if self.influx_up else "down"}
        want |= {"storage": "up"} | {d.key: self.device_truth(d) for d in self.devices}
        diffs = [f"links.{k}={links.get(k)!r} (truth {v!r})" for k, v in want.items() if links.get(k) != v]
        state = "online" if self.broker_up and self.influx_up else "degraded"
        if doc.get("state") != state:
            diffs.append(f"state={doc.get('state')!r} (truth {state!r})")
        return diffs

    def retained_diffs(self, held: dict[str, dict[str, Any]] | None) -> list[str]:
        if held is None:
            return ["the broker did not answer the retained read"]
        diffs = []
        gw_topic = f"infusion/{SITE}/_gateway/{GATEWAY_ID}/status"
        gw = held.get(gw_topic, {}).get("state")
        if self.gateway_up:
            state = "online" if self.influx_up else "degraded"
            if gw != state:
                diffs.append(f"gateway status {gw!r} (truth {state!r})")
            for d in self.devices:
                got = held.get(f"infusion/{SITE}/{d.key}/status", {}).get("state")
                if got != self.device_truth(d):
                    diffs.append(f"{d.key} status {got!r} (truth {self.device_truth(d)!r})")
        elif self.will_expected and gw != "offline":
            diffs.append(f"gateway status {gw!r} while the gateway is dead (truth 'offline', its last will)")
        return diffs

    def now(self) -> float:
        return time.monotonic() - self.t0

    # services -------------------------------------------------------------------------------------------------------

    async def start_service(self, service: Mosquitto | Influxd) -> None:
        try:
            await asyncio.to_thread(service.start, SERVICE_START_S)
        except ServiceUnavailable as exc:
            raise RunError(f"{service.name} would not start again: {exc}") from exc

    def start_gateway(self) -> None:
        self.proc = start_gateway(self.config, log=self.workdir / "gateway.log")
        self.gateway_up = True

    def gateway_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.gateway_up else None

    # background tasks ----------------------------------------------------------------------------------------------

    async def talk(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            ttys = open_ttys(self.gateway_pid())
            for d in self.devices:
                d.tick(now, ttys)
            await asyncio.sleep(TICK_S)

    async def monitor(self) -> None:
        """Between events: the gateway is alive when it should be, and /health does not drift from the truth."""
        while not self.stopping:
            await asyncio.sleep(SAMPLE_S)
            if self.gateway_up and self.proc is not None and self.proc.poll() is not None:
                self.violations.append(
                    f"t={self.now():.0f}s: the gateway exited on its own with code {self.proc.returncode} "
                    f"(see {self.workdir / 'gateway.log'}); restarted"
                )
                self.figures.unexpected_exits += 1
                for d in self.devices:
                    d.disruptions.append(time.monotonic())
                self.start_gateway()
                self.gen += 1
                continue
            gen = self.gen
            if not self.gateway_up or self.steady_gen != gen:
                continue
            doc = await get_health(self.health_port)
            if self.gen != gen or self.steady_gen != gen:
                continue
            self.figures.health_samples += 1
            diffs = self.health_diffs(doc)
            if diffs:
                self.figures.health_drift += 1
                self.drift(diffs)

    def drift(self, diffs: list[str]) -> None:
        """One violation per steady period, updated with its span and count (not one line per sample)."""
        now = self.now()
        first, count, index = self.drifting.get(self.gen, (now, 0, len(self.violations)))
        if count == 0:
            self.violations.append("")
        self.drifting[self.gen] = (first, count + 1, index)
        self.violations[index] = (
            f"t={first:.0f}-{now:.0f}s, after {self.label}: /health drifted from the truth in {count + 1} "
            f"sample(s): {'; '.join(diffs)}"
        )

    # events ----------------------------------------------------------------------------------------------------------

    async def inject(self, f: Fault) -> None:
        if f.kind == "broker":
            self.broker_up = False
            self.mosquitto.kill()
            if not self.gateway_up:
                self.will_expected = False  # the will it held may or may not be in its last autosave
        elif f.kind == "influxd":
            self.influx_up = False
            self.influxd.kill()
        elif f.kind == "gateway":
            doc = await get_health(self.health_port)
            link_up = doc is not None and doc.get("links", {}).get("mqtt") == "up"
            assert self.proc is not None
            self.gateway_up = False  # first: the monitor must not take this death for one of its own
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 30)
            for d in self.devices:
                d.disruptions.append(time.monotonic())
            self.will_expected = self.broker_up and link_up
        else:
            d = next(d for d in self.devices if d.key == f.target)
            d.disruptions.append(time.monotonic())
            d.close()

    async def restore(self, f: Fault) -> None:
        if f.kind == "broker":
            frozen = f.variant == "wipe" and self.gateway_up and self.proc is not None
            if frozen:
                assert self.proc is not None
                self.proc.send_signal(signal.SIGSTOP)
                self.figures.freezes += 1
            try:
                if f.variant == "wipe":
                    with contextlib.suppress(FileNotFoundError):
                        (self.mosquitto.workdir / "mosquitto.db").unlink()
                    self.will_expected = False
                t = time.monotonic()
                await self.start_service(self.mosquitto)
                self.broker_up = True
                deadline = time.monotonic() + OBSERVER_BACK_S
                assert self.observer is not None
                while self.observer.subscribed_at < t:
                    if time.monotonic() > deadline:
                        raise RunError(f"the counting subscriber did not subscribe within {OBSERVER_BACK_S:g} s")
                    await asyncio.sleep(0.05)
            finally:
                if frozen:
                    assert self.proc is not None
                    self.proc.send_signal(signal.SIGCONT)
        elif f.kind == "influxd":
            await self.start_service(self.influxd)
            self.influx_up = True
        elif f.kind == "gateway":
            self.start_gateway()
        else:
            d = next(d for d in self.devices if d.key == f.target)
            d.endpoint = PtyEndpoint(link=d.link)

    async def checkpoint(self, label: str) -> None:
        """Wait (SETTLE_S at most) until /health and the retained statuses say what is true."""
        self.figures.checkpoints += 1
        self.label = label
        start = time.monotonic()
        deadline = start + self.settle_s
        health_left = self.gateway_up
        retained_left = self.broker_up
        self.figures.health_checks += health_left
        self.figures.retained_checks += retained_left
        if self.broker_up and not self.gateway_up and not self.will_expected:
            self.figures.will_unknowable += 1
        health_diffs: list[str] = []
        retained_diffs: list[str] = []
        while health_left or retained_left:
            if health_left:
                health_diffs = self.health_diffs(await get_health(self.health_port))
                if not health_diffs:
                    health_left = False
                    self.figures.health_passed += 1
                    self.figures.health_settle.append(time.monotonic() - start)
                    self.steady_gen = self.gen
            if retained_left:
                retained_diffs = self.retained_diffs(await read_retained(self.mosquitto.port, self.n_devices + 1))
                if not retained_diffs:
                    retained_left = False
                    self.figures.retained_passed += 1
                    self.figures.retained_settle.append(time.monotonic() - start)
            if time.monotonic() > deadline:
                break
            if health_left or retained_left:
                await asyncio.sleep(0.5)
        if health_left:
            self.violations.append(f"{label}: /health not true within {self.settle_s:g} s: {'; '.join(health_diffs)}")
        if retained_left:
            self.violations.append(
                f"{label}: retained statuses not true within {self.settle_s:g} s: {'; '.join(retained_diffs)}"
            )

    async def recheck_retained(self, label: str) -> None:
        """Just before the next event: the retained statuses still say what is true."""
        if not self.broker_up:
            return
        self.figures.retained_checks += 1
        diffs = self.retained_diffs(await read_retained(self.mosquitto.port, self.n_devices + 1))
        if diffs:
            self.violations.append(f"{label}: retained statuses drifted before the next event: {'; '.join(diffs)}")
        else:
            self.figures.retained_passed += 1

    # the whole run ------------------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        try:
            await asyncio.to_thread(self.mosquitto.start, SERVICE_START_S)
            await asyncio.to_thread(self.influxd.start, SERVICE_START_S)
            await asyncio.to_thread(self.influxd.create_database, self.db)
        except ServiceUnavailable as exc:
            raise RunError(str(exc)) from exc
        rooms = [str(i + 1) for i in range(self.n_devices)]
        self.devices = [
            Device(room, self.workdir / f"tty-room{room}", i * LINE_INTERVAL_S / self.n_devices)
            for i, room in enumerate(rooms)
        ]
        device_tables = "".join(
            f'[[devices]]\nroom = "{d.room}"\nname = "oximeter"\nmodel = "masimo-ascii1"\nport = "{d.link}"\n'
            for d in self.devices
        )
        self.config = write_gateway_config(
            self.workdir,
            GATEWAY_ID,
            self.mosquitto.port,
            self.influxd.url,
            self.db,
            device_tables,
            self.health_port,
            gateway_extra="status_interval_s = 1",
        )
        self.faults = make_schedule(self.seed, self.seconds, [d.key for d in self.devices])
        self.observer = Observer(self.mosquitto.port)
        tasks = [asyncio.create_task(self.talk()), asyncio.create_task(self.monitor())]
        try:
            self.start_gateway()
            self.t0 = time.monotonic()
            await self.checkpoint("start")
            lag = 0.0
            for ev in events_of(self.faults):
                due = self.t0 + ev.at + lag
                if time.monotonic() < due - 2.0:
                    await asyncio.sleep(due - time.monotonic() - 2.0)
                    await self.recheck_retained(f"before fault {ev.fault.n} {ev.action}")
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                lag = max(lag, time.monotonic() - self.t0 - ev.at)
                self.gen += 1
                self.steady_gen = -1
                if ev.action == "inject":
                    ev.fault.injected = self.now()
                    await self.inject(ev.fault)
                else:
                    await self.restore(ev.fault)
                    ev.fault.restored = self.now()
                f = ev.fault
                await self.checkpoint(f"t={self.now():.0f}s fault {f.n} ({f.kind} {f.variant} {f.target}) {ev.action}")
            await asyncio.sleep(5)  # traffic with everything up
            await self.recheck_retained("after the last fault")
            self.stopping = True
            await asyncio.gather(*tasks)
            return await self.finish()
        finally:
            self.stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
                stop_gateway(self.proc)
            if self.observer is not None:
                await self.observer.close()
            for d in self.devices:
                d.close()
            self.mosquitto.stop()
            self.influxd.stop()

    def stored(self) -> dict[tuple[str, str], list[int]]:
        rows: dict[tuple[str, str], list[int]] = defaultdict(list)
        for d in self.devices:
            q = f'SELECT "device_time", "seq" FROM "vitals" WHERE "room" = \'{d.room}\''
            for series in self.influxd.query(self.db, q):
                for _, device_time, seq in series["values"]:
                    rows[(d.room, device_time)].append(int(seq))
        return rows

    async def finish(self) -> dict[str, Any]:
        """Drain, stop cleanly, count."""
        owed = {(d.room, line.device_time) for d in self.devices for line in d.lines if d.owed(line)}
        deadline = time.monotonic() + DELIVERY_S
        stored: dict[tuple[str, str], list[int]] = {}
        while True:
            doc = await get_health(self.health_port) or {}
            counters = doc.get("counters", {})
            if counters.get("backlog_mqtt") == 0 and counters.get("backlog_influx") == 0:
                stored = await asyncio.to_thread(self.stored)
                if self.observer is not None and owed <= set(self.observer.readings) and owed <= set(stored):
                    break
            if time.monotonic() > deadline:
                stored = await asyncio.to_thread(self.stored)
                break
            await asyncio.sleep(2)
        assert self.proc is not None
        output = await asyncio.to_thread(stop_gateway, self.proc, 30)
        self.gateway_up = False
        if self.proc.returncode != 0:
            self.violations.append(f"the gateway's clean stop exited {self.proc.returncode}: {output[-300:]}")
        held = await read_retained(self.mosquitto.port, self.n_devices + 1) or {}
        final = held.get(f"infusion/{SITE}/_gateway/{GATEWAY_ID}/status", {}).get("state")
        if final != "offline":
            self.violations.append(f"after a clean stop the retained gateway status is {final!r}, not 'offline'")

        written = {(d.room, line.device_time) for d in self.devices for line in d.lines}
        assert self.observer is not None
        seen = self.observer.readings
        missing_mqtt = sorted(owed - set(seen))
        missing_influx = sorted(owed - set(stored))
        influx_twice = sorted(k for k, seqs in stored.items() if len(seqs) > 1)
        unknown = sorted((set(stored) | set(seen)) - written)
        two_ids = sorted(k for k, ids in seen.items() if len(set(ids)) > 1)
        for what, keys in (
            ("owed readings missing on MQTT", missing_mqtt),
            ("owed readings missing in InfluxDB", missing_influx),
            ("readings stored more than once in InfluxDB", influx_twice),
            ("readings no device wrote", unknown),
            ("readings published with more than one id (read twice)", two_ids),
        ):
            if keys:
                shown = ", ".join(f"{room}@{t}" for room, t in keys[:6]) + (" ..." if len(keys) > 6 else "")
                self.violations.append(f"{len(keys)} {what}: {shown}")
        log = (self.workdir / "gateway.log").read_text(errors="replace")
        not_owed = written - owed
        return {
            "written": len(written),
            "owed": len(owed),
            "not_owed": len(not_owed),
            "not_owed_arrived_influx": len(not_owed & set(stored)),
            "mqtt_messages": self.observer.messages,
            "mqtt_distinct": len(seen),
            "mqtt_owed_seen": len(owed & set(seen)),
            "mqtt_duplicates": self.observer.messages - len(seen),
            "mqtt_max_copies": max((len(v) for v in seen.values()), default=0),
            "influx_rows": sum(len(v) for v in stored.values()),
            "influx_distinct": len(stored),
            "influx_owed_stored": len(owed & set(stored)),
            "log_tracebacks": log.count("Traceback"),
            "log_leaked_semaphores": log.count("leaked semaphore"),
            "log_errors": sum(" ERROR " in line or " CRITICAL " in line for line in log.splitlines()),
        }


# --- report ---------------------------------------------------------------------------------------------------------


def overlapping(f: Fault, faults: list[Fault]) -> list[int]:
    return [g.n for g in faults if g is not f and f.overlaps(g)]


def report(chaos: Chaos, counts: dict[str, Any], elapsed: float) -> str:
    fig = chaos.figures
    lines = [
        f"chaos: seed {chaos.seed}, {chaos.seconds / 60:g} min schedule, {chaos.n_devices} devices, "
        f"{elapsed:.0f} s run, work dir {chaos.workdir}",
        "",
        " #  fault            target         planned  injected  restored  out (s)  overlaps",
    ]
    for f in chaos.faults:
        out = f"{f.restored - f.injected:7.1f}" if f.injected is not None and f.restored is not None else "      -"
        lines.append(
            f"{f.n:2d}  {f.kind + ' ' + f.variant:15s}  {f.target:12s}  {f.start:7.1f}  "
            f"{f.injected or 0:8.1f}  {f.restored or 0:8.1f}  {out}  {overlapping(f, chaos.faults) or ''}"
        )
    kinds = Counter(f"{f.kind} {f.variant}" for f in chaos.faults)
    n_overlap = sum(bool(overlapping(f, chaos.faults)) for f in chaos.faults)

    def spread(values: list[float]) -> str:
        return f"median {sorted(values)[len(values) // 2]:.1f} s, max {max(values):.1f} s" if values else "-"

    lines += [
        "",
        f"faults: {len(chaos.faults)} ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
        f"{n_overlap} overlap another; {fig.freezes} SIGSTOP pauses for wiped-broker restarts",
        f"checkpoints: {fig.checkpoints}; /health true {fig.health_passed}/{fig.health_checks} "
        f"(settled {spread(fig.health_settle)}), steady samples {fig.health_samples}, drifted {fig.health_drift}; "
        f"retained true {fig.retained_passed}/{fig.retained_checks} (settled {spread(fig.retained_settle)}); "
        f"gateway-down checks where its last will could not be held: {fig.will_unknowable}",
    ]
    if counts:
        lines += [
            f"readings written {counts['written']}, owed {counts['owed']} "
            f"(not owed, near a kill/close or a fresh open: {counts['not_owed']}, "
            f"{counts['not_owed_arrived_influx']} of them arrived anyway)",
            f"MQTT: {counts['mqtt_owed_seen']}/{counts['owed']} owed seen; {counts['mqtt_messages']} messages for "
            f"{counts['mqtt_distinct']} readings: {counts['mqtt_duplicates']} repeats (at most "
            f"{counts['mqtt_max_copies']} copies of one)",
            f"InfluxDB: {counts['influx_owed_stored']}/{counts['owed']} owed stored; {counts['influx_rows']} rows for "
            f"{counts['influx_distinct']} readings",
            f"gateway log: {counts['log_tracebacks']} tracebacks, {counts['log_errors']} ERROR/CRITICAL lines, "
            f"{counts['log_leaked_semaphores']} leaked-semaphore warnings; {fig.unexpected_exits} unexpected exits",
        ]
    lines.append("")
    if chaos.violations:
        lines.append(f"VIOLATIONS ({len(chaos.violations)}):")
        lines += [f"  - {v}" for v in chaos.violations]
    else:
        lines.append("no violation")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the fault schedule")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="bound for the truth to show after an event")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (kept anyway on a violation)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.minutes <= 0 or not 1 <= args.devices <= 200:
        parser.error("--minutes must be positive and --devices within 1-200")
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    chaos = Chaos(workdir, args.seed, args.minutes, args.devices, args.settle)
    began = time.monotonic()
    try:
        counts = asyncio.run(chaos.run())
    except RunError as exc:
        print(f"chaos: the run could not be carried out: {exc}", file=sys.stderr)
        print(report(chaos, {}, time.monotonic() - began), file=sys.stderr)
        return 2
    print(report(chaos, counts, time.monotonic() - began))
    if args.json is not None:
        fig = chaos.figures
        args.json.write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "minutes": args.minutes,
                    "devices": args.devices,
                    "faults": [vars(f) for f in chaos.faults],
                    "figures": {k: v for k, v in vars(fig).items()},
                    "counts": counts,
                    "violations": chaos.violations,
                },
                indent=1,
            )
        )
    if chaos.violations or args.keep:
        print(f"work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if chaos.violations else 0


if __name__ == "__main__":
    sys.exit(main())
