"""Fixtures with real parts: a mosquitto broker and an influxd on free loopback ports, and real ptys.

A missing binary FAILS the test with the install command: a test that silently skips proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import tty
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import localservices
from devtools.localservices import HOST, Influxd, Mosquitto, ServiceUnavailable
from tests.helpers import PtyPair


class WorkerPorts:
    """Free ports for one pytest-xdist worker: its own slice of the ports below the kernel's ephemeral range.

    A port is chosen some time before it is bound (a gateway's health port is bound a second later, by another
    process). The kernel's "any free port" comes from the ephemeral range at random, so another worker could be given
    the same port in between, or take it for an outgoing connection: with a slice each below that range, no worker
    can. Each port is still checked free (bind) before it is handed out, and taken in turn, never twice in a run.
    """

    FIRST = 10_000

    def __init__(self, worker: int, workers: int) -> None:
        ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        size = (int(ephemeral[0]) - self.FIRST) // workers
        if size < 500:
            raise RuntimeError(f"the ports below the ephemeral range {ephemeral} are too few for {workers} workers")
        self.ports = range(self.FIRST + worker * size, self.FIRST + (worker + 1) * size)
        self._next = random.randrange(len(self.ports))  # a run right after another does not meet its closing sockets

    @classmethod
    def from_env(cls) -> WorkerPorts | None:
        """For an xdist worker (PYTEST_XDIST_WORKER=gwN), else None: a single process keeps the kernel's choice."""
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
        if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()):
            return None
        return cls(int(worker[2:]), int(count))

    def take(self) -> int:
        for _ in range(len(self.ports)):
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((HOST, port))
                except OSError:
                    continue  # in use (or still closing): the next one
            return port
        raise RuntimeError(f"no free port in {self.ports}")


# Installed before any test module is imported, so their `from devtools.localservices import find_free_port` and the
# services' own choice of ports (Mosquitto, Influxd) both take this worker's.
_worker_ports = WorkerPorts.from_env()
if _worker_ports is not None:
    localservices.find_free_port = _worker_ports.take


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own; the test may stop(), restart() or kill() it, teardown copes."""
    broker = Mosquitto(tmp_path / "mosquitto")
    try:
        broker.start()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[Influxd]:
    """An influxd of the test's own, data in tmp_path; the test may stop(), restart() or kill() it."""
    server = Influxd(tmp_path / "influxd")
    try:
        server.start()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def influx_db(influxd: Influxd) -> str:
    """A fresh, empty database on the `influxd` fixture; returns its name."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    influxd.create_database(name)
    return name


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    """A raw pseudo-terminal and a stable symlink to its slave side, as udev gives /dev/serial/by-id links."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # no echo, no CR/LF translation, no line editing: bytes pass unchanged
        slave_path = os.ttyname(slave)
        link = tmp_path / "serial-by-id"
        link.symlink_to(slave_path)
        yield PtyPair(master_fd=master, slave_fd=slave, slave_path=slave_path, link=link)
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs at tmp_path/data (the gateway's data_dir in write_config), to fill and free."""
    mount = tmp_path / "data"
    mount.mkdir()
    sudo: list[str] = []
    if os.geteuid() != 0:
        if subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False).returncode != 0:
            pytest.fail("this test mounts a tmpfs: run the tests as root or with passwordless sudo", pytrace=False)
        sudo = ["sudo", "-n"]
    options = f"size=8m,mode=0700,uid={os.getuid()},gid={os.getgid()}"
    subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run([*sudo, "umount", "-l", str(mount)], check=False)


# Fixtures that start or need a real service (broker, database, pseudo-terminal, file system): a test that uses one,
# or lives in tests/integration, is an integration test; `pytest -m "not integration"` is the fast loop.
SERVICE_FIXTURES = frozenset({"mosquitto", "influxd", "influx_db", "pty_pair", "small_fs"})
SERVICE_MODULES = (
    "test_serve.py",
    "test_rooms.py",
    "test_session.py",
    "test_sink_worker.py",
    "test_compose.py",
    "test_dashboards.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        uses = set(getattr(item, "fixturenames", ()))
        if "integration" in path.parts or uses & SERVICE_FIXTURES or path.name in SERVICE_MODULES:
            item.add_marker(pytest.mark.integration)
    # The slow ones first (each module's tests stay together, in order): the workers start on the long waits and
    # fill the gaps with the quick tests, instead of finding the long ones left at the end.
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)
