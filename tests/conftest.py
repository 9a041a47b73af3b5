"""Fixtures with real parts: a mosquitto broker and an influxd on free loopback ports, and real ptys.

A missing binary FAILS the test with the install command: a test that silently skips proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tty
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.localservices import Influxd, Mosquitto, ServiceUnavailable
from tests.helpers import PtyPair


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
