"""Ports past descriptor 1,023: a site gateway with 1,000 serial ports holds thousands of descriptors, and a read
path built on select() (pyserial's read) fails for every one of them ("filedescriptor out of range in select()").
These tests fill the descriptor table past 1,024 first, then read and write a real pty through the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import select
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.base import DeviceStatus, Reading, Waveform
from devices.registry import get_model
from gateway.cli import raise_open_files_limit
from gateway.config import DeviceConfig
from gateway.serial_port import SerialPort, TransportError
from gateway.session import DeviceSession
from tests.helpers import wait_for

LINE = b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n"
SELECT_LIMIT = 1024  # FD_SETSIZE: select() refuses any descriptor at or above it
NEEDED = 2048


def read_exactly(fd: int, n: int, timeout: float = 5.0) -> bytes:
    """tests.helpers.read_exactly with poll() in place of select(): this fd is past select()'s range too."""
    data = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise AssertionError(f"read {len(data)} of {n} bytes within {timeout:g} s: {data[-64:]!r}")
        data += os.read(fd, n - len(data))
    return data


@pytest.fixture
def high_fds() -> Iterator[None]:
    """The process holds every descriptor up to past SELECT_LIMIT (the soft limit raised for it, as a site gateway's
    start-up does): the lowest free number is taken first, so every descriptor opened in the test is above
    select()'s range, the port's own among them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED:
        pytest.fail(f"the hard limit on open files is {hard}: this test needs {NEEDED} (ulimit -Hn)", pytrace=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, NEEDED), hard))
    filler: list[int] = []
    try:
        while not filler or filler[-1] < SELECT_LIMIT + 8:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def high_pty(high_fds: None, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A raw pty opened after the filler: (master fd, stable link to the slave)."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        link = tmp_path / "serial-by-id"
        link.symlink_to(os.ttyname(slave))
        yield master, link
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


async def test_port_past_descriptor_1023_reads_writes_and_reports_loss(high_pty: tuple[int, Path]) -> None:
    master, link = high_pty
    spec = get_model("masimo-ascii1").spec
    async with SerialPort(str(link), spec.serial) as port:
        os.write(master, LINE)
        received = b""
        try:
            async with asyncio.timeout(5):  # a select()-based read never returns: fail here, saying what arrived
                while len(received) < len(LINE):
                    received += await port.read()
        except TimeoutError:
            raise AssertionError(f"read {len(received)} of {len(LINE)} bytes within 5 s: {received!r}") from None
        assert received == LINE
        await port.write(b"\x02ping\x03")
        assert read_exactly(master, 6) == b"\x02ping\x03"
        os.close(master)  # the device's side is gone: a loss, not an endless wait
        with pytest.raises(TransportError):
            async with asyncio.timeout(5):
                await port.read()


async def test_session_reads_a_port_past_descriptor_1023(high_pty: tuple[int, Path]) -> None:
    master, link = high_pty
    seen: list[Reading | DeviceStatus | Waveform] = []
    cfg = DeviceConfig(room="1", name="ox", model="masimo-ascii1", port=str(link))
    session = DeviceSession(cfg, lambda _s, event, _t: seen.append(event))
    task = asyncio.create_task(session.run())
    try:
        await wait_for(lambda: any(isinstance(e, DeviceStatus) for e in seen), 5)
        for _ in range(3):
            os.write(master, LINE)
            await asyncio.sleep(0.05)
        await wait_for(lambda: sum(isinstance(e, Reading) for e in seen) == 3, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_start_up_raises_the_soft_open_files_limit() -> None:
    """`infusion-telemetry run` lifts a shell's 1,024 to the hard limit before any port opens."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        raised = raise_open_files_limit(1000)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised == hard or (hard == resource.RLIM_INFINITY and raised >= 1 << 16)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
