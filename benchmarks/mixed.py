"""Mixed rooms at their real rates: per room a Masimo Rad-8 (1 line/s), a Nonin in DF2 (75 frames/s), a Nonin in
DF8 (1 record/s), a Contec CMS50 (60 packets/s after its start command) and a SunTech cuff (a measurement a minute),
each from its emulator on a real pty, answering the gateway's commands. Gateway CPU and RSS over a steady window;
every reading the gateway published counted in InfluxDB."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import collector, rig, wait_until
from benchmarks.load import cpu_seconds, rss_mb
from devices.registry import get_model
from simulators.scenarios import load_scenario
from simulators.serve import DeviceSimulator

ROOM = (
    ("masimo", "masimo-ascii1"),
    ("nonin2", "nonin-df2"),
    ("nonin8", "nonin-df8"),
    ("contec", "contec-cms50"),
    ("cuff", "suntech-advantage"),
)


async def measure(workdir: Path, rooms: int = 4, warmup_s: float = 10, window_s: float = 30) -> dict[str, Any]:
    devices = [(str(r + 1), name, model) for r in range(rooms) for name, model in ROOM]
    with rig(workdir) as r:
        endpoints = r.open_ptys(devices)
        extra = "\n".join(
            f'[[devices]]\nroom = "{room}"\nname = "{name}"\nmodel = "{model}"\nport = "{workdir}/room-{room}-{name}"'
            + ("\nmeasure_every_s = 60" if model == "suntech-advantage" else "")
            for room, name, model in devices
        )
        config = r.config([])
        config.write_text(config.read_text() + extra + "\n")
        scenario = load_scenario("ketamine")
        sims = []
        for i, ((_room, _name, model), endpoint) in enumerate(zip(devices, endpoints, strict=True)):
            sim = DeviceSimulator(get_model(model), scenario, seed=i)
            endpoint.on_receive = sim.receive
            sims.append(sim)
        async with collector(r.broker.port, ["infusion/bench/+/+/reading"]) as got:
            gw = r.start_gateway(config)  # after the subscriber, so every published reading is seen
            tasks = [asyncio.create_task(sim.run(ep.write)) for sim, ep in zip(sims, endpoints, strict=True)]
            await asyncio.sleep(warmup_s)
            t0, c0 = time.monotonic(), cpu_seconds(gw.pid)
            rss: list[float] = []
            while time.monotonic() - t0 < window_s:
                await asyncio.sleep(1)
                rss.append(rss_mb(gw.pid)[0])
            window = time.monotonic() - t0
            cpu = cpu_seconds(gw.pid) - c0
            peak = rss_mb(gw.pid)[1]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(2)  # what was in flight when the devices stopped
            published = len(got)
            await wait_until(lambda: r.count('SELECT count("seq") FROM "vitals"') >= published, 30)
            stored = r.count('SELECT count("seq") FROM "vitals"')
    return {
        "rooms": rooms,
        "devices": len(devices),
        "wire_frames_per_s": round(rooms * (1 + 75 + 1 + 60), 1),
        "gateway_cpu_pct": round(100 * cpu / window, 1),
        "gateway_rss_mb_steady": round(sum(rss) / len(rss), 1),
        "gateway_rss_mb_peak": round(peak, 1),
        "readings_published": published,
        "readings_in_influx": stored,
        "nibp_results": sum(1 for _t, _topic, m in got if "nibp_systolic" in m.get("metrics", {})),
    }
