"""The health endpoint cannot stop or slow the gateway (issue 12, observation 5), with the real CLI.

- 1,100 connections that never send a byte, under the default `ulimit -n 1024`: the gateway ran out of file
  descriptors (EMFILE in a task), and exited 0. Now it keeps running, health answers, readings keep flowing.
- Each request ran count(*) over the outbox on its reader thread (110 ms with 306k records owed; 20 clients: p50
  2 s). Now the counters come from memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from devices.base import Reading
from devices.registry import get_model
from devtools.localservices import Influxd, Mosquitto, find_free_port
from gateway.envelope import origin_for, reading_record
from gateway.outbox import Outbox
from simulators.scenarios import load_scenario
from simulators.serve import DeviceSimulator, PtyEndpoint
from tests.helpers import stop_gateway, wait_for, write_gateway_config
from tests.integration.test_gateway_e2e import Collector

HALF_OPEN = 1100
GATEWAY_NOFILE = 1024  # the default soft limit of a login shell and of many service managers


def _health(port: int, timeout: float = 5.0) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as resp:
        body = json.loads(resp.read())
    return resp.status, body, time.monotonic() - t0


def _gateway(config: Path, log: Path, nofile: int | None = None) -> subprocess.Popen[bytes]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=limit,
    )


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_1100_half_open_connections_under_ulimit_1024_do_not_stop_the_gateway(
    tmp_path: Path, mosquitto: Mosquitto, influxd: Influxd, influx_db: str
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HALF_OPEN + 512
    assert hard >= need, f"this test opens {HALF_OPEN} sockets: raise the hard limit (ulimit -Hn {need})"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))

    link = tmp_path / "serial-by-id-room7"
    endpoint = PtyEndpoint(link=link)
    health_port = find_free_port()
    device = f'[[devices]]\nroom = "7"\nname = "oximeter"\nmodel = "masimo-ascii1"\nport = "{link}"\n'
    config = write_gateway_config(
        tmp_path, "gw-health", mosquitto.port, influxd.url, influx_db, device, health_port, "status_interval_s = 1"
    )
    collector = Collector()
    collecting = asyncio.create_task(collector.run(mosquitto.port))
    sim = DeviceSimulator(get_model("masimo-ascii1"), load_scenario("baseline"), seed=3, speed=5.0)
    feeding = asyncio.create_task(sim.run(endpoint.write))
    log = tmp_path / "gateway.log"
    proc = _gateway(config, log, nofile=GATEWAY_NOFILE)
    held: list[asyncio.StreamWriter] = []
    try:
        await wait_for(lambda: len(collector.of_type("reading")) >= 5, 30)
        for _ in range(HALF_OPEN):
            _, writer = await asyncio.open_connection("127.0.0.1", health_port)
            held.append(writer)
        await asyncio.sleep(1.0)

        code, body, took = await asyncio.to_thread(_health, health_port)
        assert code == 200 and body["links"]["7/oximeter"] == "ok", body
        fds = _fds(proc.pid)
        print(f"{HALF_OPEN} idle connections held: health {took * 1000:.1f} ms, the gateway holds {fds} fds")
        assert fds < GATEWAY_NOFILE // 4, f"the gateway holds {fds} file descriptors"

        before = len(collector.of_type("reading"))
        await asyncio.sleep(8.0)  # the connections are still held by this test
        assert proc.poll() is None, f"the gateway exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert len(collector.of_type("reading")) >= before + 20, "readings stopped flowing"
        code, body, _ = await asyncio.to_thread(_health, health_port)
        assert code == 200 and body["state"] == "online", body
    finally:
        for writer in held:
            writer.close()
        output = stop_gateway(proc)
        feeding.cancel()
        collecting.cancel()
        await asyncio.gather(feeding, collecting, return_exceptions=True)
        endpoint.close()
    assert proc.returncode == 0, output + log.read_text()[-3000:]
    assert "Too many open files" not in log.read_text()


async def _fill(path: Path, n: int) -> None:
    """An outbox owing both sinks `n` readings, as after a long outage."""
    box = Outbox(path, sinks=("mqtt", "influx"))
    await box.open()
    origin = origin_for("test-site", "7", "oximeter", get_model("masimo-ascii1").spec)
    reading = Reading({"spo2": 97.0, "pulse_rate": 72.0})
    t0 = time.time() - n
    for start in range(0, n, 20_000):
        for i in range(start, min(n, start + 20_000)):
            seq = box.next_seq("7/oximeter")
            box.put("7/oximeter", seq, reading_record(origin, seq, t0 + i, reading))
        await box.flush()
    await box.close()


async def test_health_answers_from_memory_with_306k_records_owed_and_20_clients(tmp_path: Path) -> None:
    """Both sinks unreachable (closed ports), so the backlog stays owed while 20 clients ask at once."""
    data = tmp_path / "data"
    await _fill(data / "outbox.sqlite3", 306_000)
    health_port = find_free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{data}"\nhealth_port = {health_port}\n[mqtt]\nhost = "127.0.0.1"\nport = 9\n'
        '[influx]\napi = "v1"\nurl = "http://127.0.0.1:9"\ndatabase = "x"\n'
    )
    log = tmp_path / "gateway.log"
    proc = _gateway(config, log)
    try:

        def answering() -> bool:
            try:
                return _health(health_port, timeout=1.0)[0] == 200
            except OSError:
                return False

        await wait_for(answering, 30)
        await asyncio.sleep(2.0)  # the backlog renderer's start-up is not what is measured

        def client() -> list[float]:
            times = []
            for _ in range(10):
                code, body, took = _health(health_port, timeout=10.0)
                assert code == 200 and body["counters"]["backlog_influx"] >= 306_000
                times.append(took)
            return times

        results = await asyncio.gather(*(asyncio.to_thread(client) for _ in range(20)))
        times = sorted(t for r in results for t in r)
        p50, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
        print(f"health with 306k owed, 20 clients x 10: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        # A figure, not a test (tests/gateway/test_health.py proves the answer never queues behind the outbox).
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop_gateway(proc, timeout=30)
