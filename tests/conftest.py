"""Fixtures with real parts: a mosquitto broker and an influxd on free loopback ports, and real ptys.

A missing binary FAILS the test with the install command: a test that silently skips proves nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.localservices import Influxd, Mosquitto, ServiceUnavailable

_db_names = itertools.count(1)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    try:
        broker.start()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield broker
    broker.stop()


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[Influxd]:
    server = Influxd(tmp_path / "influxd")
    try:
        server.start()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def influx_db(influxd: Influxd) -> str:
    name = f"test_{next(_db_names)}"
    influxd.create_database(name)
    return name


@dataclass
class PtyPair:
    master_fd: int
    slave_fd: int
    slave_path: str
    link: Path


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    """A raw pseudo-terminal and a stable symlink to its slave side, as udev gives /dev/serial/by-id links."""
    master, slave = os.openpty()
    tty.setraw(slave)
    link = tmp_path / "serial-by-id"
    link.symlink_to(os.ttyname(slave))
    yield PtyPair(master, slave, os.ttyname(slave), link)
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)
