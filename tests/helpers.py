"""Small helpers shared by tests (conftest holds the fixtures; this module holds what tests import)."""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.base import DeviceState, DeviceStatus, Reading, Waveform
from devtools import localservices
from gateway.alarms import AlarmEvent
from gateway.envelope import (
    Origin,
    Record,
    alarm_record,
    encode,
    reading_record,
    status_record,
    waveform_record,
)
from gateway.outbox import Item


@dataclass(frozen=True)
class PtyPair:
    """The `pty_pair` fixture: the test plays the device on `master_fd`; the code under test opens `link`."""

    master_fd: int
    slave_fd: int  # held open so the master never sees a hang-up while the code under test reopens the port
    slave_path: str
    link: Path


def _describe(predicate: Callable[[], bool]) -> str:
    code = getattr(predicate, "__code__", None)
    where = f"{Path(code.co_filename).name}:{code.co_firstlineno}: " if code is not None else ""
    try:
        return where + inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return where + repr(predicate)


async def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    """Poll until predicate() is true; after `timeout` seconds fail, quoting the predicate's source line."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:g} s: {_describe(predicate)}")
        await asyncio.sleep(interval)


def read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    """Read n bytes from a (pty) fd, which hands them over in pieces; fail with what came within `timeout`."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"read {len(data)} of {n} bytes within {timeout:g} s: {data[-64:]!r}")
        data += os.read(fd, n - len(data))
    return data


def start_gateway(config: Path, log: Path | None = None) -> subprocess.Popen[bytes]:
    """The real CLI, as clinic IT runs it: `python -m gateway run --config FILE`."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stdout=subprocess.PIPE if log is None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log is None else log.open("ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def stop_gateway(proc: subprocess.Popen[bytes], timeout: float = 20) -> str:
    """SIGTERM, as systemd and docker stop it; returns what it printed (when its output was piped)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    return (out or b"").decode(errors="replace")


def write_gateway_config(
    tmp_path: Path,
    gateway_id: str,
    mqtt_port: int,
    influx_url: str,
    db: str,
    devices: str,
    health_port: int = 0,
    gateway_extra: str = "",
) -> Path:
    """tmp_path/gateway.toml for the real services of the fixtures (site "test-site"), with the given [[devices]]
    (and what follows them), `gateway_extra` lines in [gateway], and a free health port unless one is given."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[gateway]
site = "test-site"
id = "{gateway_id}"
data_dir = "{tmp_path / "data"}"
health_port = {health_port or localservices.find_free_port()}
{gateway_extra}
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
[influx]
api = "v1"
url = "{influx_url}"
database = "{db}"
{devices}
"""
    )
    return path


def fill(directory: Path) -> Path:
    """Write a file until the file system refuses another byte."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    handle.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


def health(port: int) -> dict[str, Any]:
    """The gateway's /health body, or {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except OSError:
        return {}


def as_items(records: Sequence[Record], first_id: int = 1) -> list[Item]:
    """Records as committed outbox items (the body as the outbox stores it): what a sink's `write` takes."""
    return [Item(first_id + i, r, encode(r)) for i, r in enumerate(records)]


def record_for(key: str, seq: int, kind: str = "reading", pad: int = 0, at: float | None = None) -> Record:
    """A record of `kind` (reading, status, alarm or waveform) for the outbox key `key` ("room/device"), as the
    gateway builds it; `pad` makes its body about that many characters longer (a large record)."""
    room, device = key.split("/")
    origin: Origin = {"site": "s", "room": room, "device": device, "model": "masimo-ascii1", "kind": "pulse_oximeter"}
    t = 1_700_000_000.0 + seq if at is None else at
    if kind == "status":
        return status_record(origin, seq, t, DeviceStatus(DeviceState.OK, detail="x" * pad))
    if kind == "waveform":
        return waveform_record(origin, seq, t, Waveform("pleth", tuple(range(pad)), 75.0))
    if kind == "alarm":
        event = AlarmEvent(
            f"{key}/spo2-low", room, device, "spo2-low", "physiological", "high", "raised", True, t, "spo2", 85.0,
            message="x" * pad,
        )  # fmt: skip
        return alarm_record(origin, seq, event, "test", False)
    return reading_record(origin, seq, t, Reading({"spo2": 90.0 + seq % 9}, ("x" * pad,) if pad else ()))
