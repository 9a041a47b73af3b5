"""`make demo`: the main job on one machine, with nothing but Debian's mosquitto and influxd installed.

Starts a local broker and database (as the tests do), three simulated rooms on real pseudo-terminals (room 3 goes
through a desaturation), the real gateway against them, and the live wall until Ctrl-C; then stops everything.
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
from pathlib import Path

from rich.console import Console

from gateway.app import Gateway
from gateway.config import Config
from gateway.localservices import Influxd, Mosquitto, ServiceUnavailable
from gateway.watch import run_watch

ROOMS = (("1", "baseline", 11), ("2", "baseline", 22), ("3", "desaturation", 33))


def demo_config(workdir: Path, mqtt_port: int, influx_url: str) -> Config:
    return Config(
        gateway={"site": "demo-clinic", "id": "demo-gw", "data_dir": workdir / "gateway"},
        mqtt={"host": "127.0.0.1", "port": mqtt_port},
        influx={"api": "v1", "url": influx_url, "database": "infusion"},
        devices=[
            {
                "room": room,
                "name": "oximeter",
                "model": "masimo-ascii1",
                "port": str(workdir / f"room{room}-spo2"),
            }
            for room, _, _ in ROOMS
        ],
    )


async def run_demo(workdir: Path, duration: float | None, console: Console) -> None:
    from devices.registry import get_model
    from simulators.scenarios import load_scenario
    from simulators.serve import DeviceSimulator, PtyEndpoint

    with Mosquitto(workdir / "mosquitto") as broker, Influxd(workdir / "influxd") as influx:
        influx.create_database("infusion")
        console.print(f"mosquitto on {broker.url}, influxd on {influx.url}, data in {workdir}")
        cfg = demo_config(workdir, broker.port, influx.url)
        model = get_model("masimo-ascii1")
        endpoints, sims = [], []
        for room, scenario, seed in ROOMS:
            endpoint = PtyEndpoint(link=workdir / f"room{room}-spo2")
            endpoints.append(endpoint)
            sims.append(DeviceSimulator(model, load_scenario(scenario), seed=seed, speed=1.0))
            console.print(f"room {room}: simulated Masimo Rad-8 ({scenario}) on {endpoint.path}")
        stop = asyncio.Event()
        gateway_task = asyncio.create_task(Gateway(cfg).run(stop))
        sim_tasks = [
            asyncio.create_task(sim.run(ep.write, duration_s=None, count=None))
            for sim, ep in zip(sims, endpoints, strict=True)
        ]
        console.print("gateway running; the wall follows (Ctrl-C to stop)\n")
        watch_task = asyncio.create_task(run_watch(cfg.mqtt, cfg.gateway.site, None, console))
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_requested.set)
        waiter = asyncio.create_task(stop_requested.wait())
        try:
            await asyncio.wait([watch_task, waiter], timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            waiter.cancel()
            watch_task.cancel()
            for task in sim_tasks:
                task.cancel()
            stop.set()
            with contextlib.suppress(Exception):
                await gateway_task
            for endpoint in endpoints:
                endpoint.close()
            console.print()
            rows = influx.query("infusion", 'SELECT count("seq") FROM "vitals" GROUP BY "room"')
            for series in rows:
                console.print(f"InfluxDB: room {series['tags']['room']}: {series['values'][0][1]} readings stored")


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
