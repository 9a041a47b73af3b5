"""`make demo`: the main job on one machine, with nothing but Debian's mosquitto and influxd installed.

Starts a local broker and database (as the tests do), three simulated rooms on real pseudo-terminals, the real
gateway against them, and the live wall until Ctrl-C; then stops everything and says what InfluxDB stored. The
rooms show what a nurse needs to see within the first minutes:

- room 1: a resting patient with a Masimo Rad-8 and a SunTech cuff; the gateway starts the first blood pressure
  5 s after it opens the cuff's port, so a pressure is on the wall within the first minute (then every 3 min);
- room 2: a desaturation (SpO2 falls from the first minute on; the example profile's SpO2 alarms come about 2 min in);
- room 3: the probe comes off the finger 20 s in for a minute (the sensor alarm comes 15 s later), every 2 min.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from clients.watch import run_watch
from devices.registry import get_model
from devtools.localservices import Influxd, Mosquitto, ServiceUnavailable
from gateway.app import Gateway
from gateway.config import Config
from simulators.scenarios import load_scenario
from simulators.serve import DeviceSimulator, PtyEndpoint

SITE = "demo-clinic"
DATABASE = "infusion"
CUFF_EVERY_S = 180.0  # the cuff measures every 3 min (the first one 5 s after its port opens)


@dataclass(frozen=True)
class DemoDevice:
    name: str
    model: str
    label: str  # what the console says is simulated


@dataclass(frozen=True)
class DemoRoom:
    room: str
    scenario: str
    seed: int
    devices: tuple[DemoDevice, ...]


OXIMETER = DemoDevice("oximeter", "masimo-ascii1", "Masimo Rad-8")
CUFF = DemoDevice("cuff", "suntech-advantage", "SunTech Advantage cuff")
log = logging.getLogger(__name__)
ROOMS = (
    DemoRoom("1", "baseline", 11, (OXIMETER, CUFF)),
    DemoRoom("2", "desaturation", 22, (OXIMETER,)),
    DemoRoom("3", "probe_off_long", 33, (OXIMETER,)),
)


def _link(workdir: Path, room: str, device: str) -> Path:
    return workdir / f"room{room}-{device}"


def demo_config(workdir: Path, mqtt_port: int, influx_url: str) -> Config:
    """The gateway's defaults (example alarm profile included) with the local services and the rooms' ptys."""
    return Config(
        gateway={"site": SITE, "id": "demo-gw", "data_dir": workdir / "gateway"},
        mqtt={"host": "127.0.0.1", "port": mqtt_port},
        influx={"api": "v1", "url": influx_url, "database": DATABASE},
        devices=[
            {
                "room": room.room,
                "name": device.name,
                "model": device.model,
                "port": str(_link(workdir, room.room, device.name)),
                **({"measure_every_s": CUFF_EVERY_S} if device.model == CUFF.model else {}),
            }
            for room in ROOMS
            for device in room.devices
        ],
    )


@dataclass
class Demo:
    """The running demo's parts, for the wall and for tests that watch what reaches MQTT and InfluxDB."""

    workdir: Path
    broker: Mosquitto
    influx: Influxd
    cfg: Config
    gateway: asyncio.Task[None]
    simulators: dict[str, DeviceSimulator] = field(default_factory=dict)  # "room/device" -> simulator


@contextlib.asynccontextmanager
async def running_demo(workdir: Path, console: Console) -> AsyncIterator[Demo]:
    """Services, simulated rooms and the gateway, running until the block ends; then all stopped in reverse and
    what InfluxDB stored printed (while influxd still runs)."""
    with Mosquitto(workdir / "mosquitto") as broker, Influxd(workdir / "influxd") as influx:
        influx.create_database(DATABASE)
        console.print(f"mosquitto on {broker.url}, influxd on {influx.url}, data in {workdir}")
        cfg = demo_config(workdir, broker.port, influx.url)
        endpoints: list[PtyEndpoint] = []
        sim_tasks: list[asyncio.Task[int]] = []
        gateway: asyncio.Task[None] | None = None
        stop = asyncio.Event()
        try:
            sims: dict[str, DeviceSimulator] = {}
            for room in ROOMS:
                for i, device in enumerate(room.devices):
                    scenario = load_scenario(room.scenario)
                    sim = DeviceSimulator(get_model(device.model), scenario, seed=room.seed + i, speed=1.0)
                    # A cuff answers the gateway's commands: what the gateway writes goes to its emulator.
                    endpoint = PtyEndpoint(link=_link(workdir, room.room, device.name), on_receive=sim.receive)
                    endpoints.append(endpoint)
                    sims[f"{room.room}/{device.name}"] = sim
                    console.print(f"room {room.room}: simulated {device.label} ({room.scenario}) on {endpoint.path}")
            gateway = asyncio.create_task(Gateway(cfg).run(stop))
            sim_tasks = [
                asyncio.create_task(sim.run(endpoint.write))
                for sim, endpoint in zip(sims.values(), endpoints, strict=True)
            ]
            yield Demo(workdir, broker, influx, cfg, gateway, sims)
        finally:
            for task in sim_tasks:
                task.cancel()
            stop.set()
            if gateway is not None:
                try:
                    await gateway
                except Exception as exc:  # the demo is ending anyway: say what the gateway ended with
                    log.error("demo gateway ended with %r", exc)
            await asyncio.gather(*sim_tasks, return_exceptions=True)
            for endpoint in endpoints:
                endpoint.close()
            console.print()
            _print_stored(influx, console)


def _print_stored(influx: Influxd, console: Console) -> None:
    """What InfluxDB holds per room: readings, blood pressures and alarm transitions."""
    counts: dict[str, dict[str, int]] = {}
    queries = {
        "readings": 'SELECT count("seq") FROM "vitals" GROUP BY "room"',
        "blood pressures": 'SELECT count("nibp_systolic") FROM "vitals" GROUP BY "room"',
        "alarms raised": 'SELECT count("alarm_id") FROM "alarms" WHERE "transition" = \'raised\' GROUP BY "room"',
    }
    for what, query in queries.items():
        try:
            series = influx.query(DATABASE, query)
        except Exception as exc:  # the summary is a courtesy: a stopped influxd must not hide how the demo ended
            console.print(f"InfluxDB: could not count {what}: {exc}")
            return
        for s in series:
            counts.setdefault(s["tags"]["room"], {})[what] = int(s["values"][0][1])
    for room in sorted(counts):
        said = ", ".join(f"{what} {counts[room].get(what, 0)}" for what in queries)
        console.print(f"InfluxDB: room {room}: {said}")


async def run_demo(workdir: Path, duration: float | None, console: Console) -> None:
    async with running_demo(workdir, console) as demo:
        console.print("gateway running; the wall follows (Ctrl-C to stop)\n")
        watch_task = asyncio.create_task(run_watch(demo.cfg.mqtt, SITE, None, console, profile=demo.cfg.alarms.build()))
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_requested.set)
        waiter = asyncio.create_task(stop_requested.wait())
        try:
            await asyncio.wait(
                [watch_task, waiter, demo.gateway], timeout=duration, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            pass
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            waiter.cancel()
            watch_task.cancel()
            await asyncio.gather(watch_task, waiter, return_exceptions=True)
        if demo.gateway.done() and not demo.gateway.cancelled() and demo.gateway.exception() is not None:
            console.print(f"the gateway stopped: {demo.gateway.exception()!r}; see {workdir / 'gateway.log'}")


def demo_main(args: argparse.Namespace) -> int:
    console = Console()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="infusion-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        logging.getLogger().handlers.clear()
        logging.basicConfig(filename=workdir / "gateway.log", level=logging.INFO, force=True)
        logging.Formatter.converter = time.gmtime
        try:
            asyncio.run(run_demo(workdir, args.duration, console))
        except KeyboardInterrupt:
            pass
        except ServiceUnavailable as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        console.print(f"stopped; gateway log was {workdir / 'gateway.log'}")
    return 0
