"""What every gateway benchmark needs: real mosquitto and influxd, simulated devices on ptys, the real gateway
process, and an MQTT subscriber that timestamps what arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.localservices import Influxd, Mosquitto
from gateway.config import MqttSection
from gateway.sinks.mqtt import subscribe
from simulators.serve import PtyEndpoint


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds."""
    if not values:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


@dataclass
class Rig:
    workdir: Path
    broker: Mosquitto
    influx: Influxd
    database: str = "bench"
    endpoints: list[PtyEndpoint] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None

    def config(self, devices: list[tuple[str, str, str]], extra: str = "") -> Path:
        """devices: (room, name, model); each on the pty link workdir/room-<room>-<name>."""
        lines = [
            "[gateway]",
            'site = "bench"',
            'id = "bench-gw"',
            f'data_dir = "{self.workdir / "gateway"}"',
            'log_level = "WARNING"',
            "health_port = 0",
            "[mqtt]",
            'host = "127.0.0.1"',
            f"port = {self.broker.port}",
            "[influx]",
            'api = "v1"',
            f'url = "{self.influx.url}"',
            f'database = "{self.database}"',
            extra,
        ]
        for room, name, model in devices:
            link = self.workdir / f"room-{room}-{name}"
            lines += ["[[devices]]", f'room = "{room}"', f'name = "{name}"', f'model = "{model}"', f'port = "{link}"']
        path = self.workdir / "gateway.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def open_ptys(self, devices: list[tuple[str, str, str]]) -> list[PtyEndpoint]:
        self.endpoints = [PtyEndpoint(link=self.workdir / f"room-{r}-{n}") for r, n, _ in devices]
        return self.endpoints

    def start_gateway(self, config: Path) -> subprocess.Popen[bytes]:
        log = (self.workdir / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self.gateway

    def stop_gateway(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
        self.gateway = None

    @property
    def pids(self) -> dict[str, int]:
        return {
            "gateway": self.gateway.pid if self.gateway else 0,
            "influxd": self.influx.pid,
            "mosquitto": self.broker.pid,
        }

    def count(self, query: str) -> int:
        rows = self.influx.query(self.database, query)
        return int(rows[0]["values"][0][1]) if rows else 0


@contextlib.contextmanager
def rig(workdir: Path) -> Iterator[Rig]:
    with Mosquitto(workdir / "mosquitto") as broker, Influxd(workdir / "influxd") as influx:
        r = Rig(workdir, broker, influx)
        influx.create_database(r.database)
        try:
            yield r
        finally:
            r.stop_gateway()
            for endpoint in r.endpoints:
                endpoint.close()


@contextlib.asynccontextmanager
async def collector(
    port: int, topics: list[str], parse: bool = True
) -> AsyncIterator[list[tuple[float, str, dict[str, Any]]]]:
    """Everything that arrives on `topics`, stamped with time.time() on arrival (payloads left unparsed, as {},
    with parse=False: a counter that does not slow down the other collectors in the same process)."""
    got: list[tuple[float, str, dict[str, Any]]] = []
    ready = asyncio.Event()

    async def run() -> None:
        async with subscribe(MqttSection(host="127.0.0.1", port=port), topics, f"bench-{time.time_ns()}") as msgs:
            ready.set()
            async for topic, payload in msgs:
                now = time.time()
                if payload:
                    got.append((now, topic, json.loads(payload) if parse else {}))

    task = asyncio.create_task(run())
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def wait_until(predicate: Any, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
