"""Serving a model's bytes: real ptys read with pyserial, TCP, stdout, pacing and unplugging.

Wall-clock speed is never asserted tightly: tests count frames for a given scenario duration instead.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import serial

from devices.base import ProtocolError, Reading, Sample
from devices.registry import get_model
from simulators.scenarios import load_scenario
from simulators.serve import DeviceSimulator, PtyEndpoint, TcpEndpoint, serve
from tests.helpers import wait_for

MODEL_ID = "masimo-ascii1"
MODEL = get_model(MODEL_ID)
N = 25
SPEED = 50.0  # 1-s frames every 20 ms: N frames in about half a second


def readings_of(data: bytes) -> list[Reading]:
    events = MODEL.driver().feed(data, 0.0)
    assert [e for e in events if isinstance(e, ProtocolError)] == []
    return [e for e in events if isinstance(e, Reading)]


def assert_readings_match(readings: Sequence[Reading], samples: Sequence[Sample]) -> None:
    """Each reading carries its sample's values as the wire rounds them: integers, and PI to 0.01."""
    assert len(readings) == len(samples)
    for reading, sample in zip(readings, samples, strict=True):
        carried = set(MODEL.spec.metrics)  # a scenario may also drive other devices of the room (the cuff)
        assert set(reading.metrics) == {k for k, v in sample.metrics.items() if v is not None and k in carried}
        for name, value in reading.metrics.items():
            sampled = sample.metrics[name]
            assert sampled is not None
            step = 0.01 if name == "perfusion_index" else 1.0
            assert abs(value - sampled) <= step / 2 + 1e-9, (name, value, sampled)
            assert round(value / step, 6).is_integer()


def read_lines(port: serial.Serial, lines: int, within_s: float = 5.0) -> bytes:
    data = b""
    deadline = time.monotonic() + within_s
    while data.count(b"\n") < lines and time.monotonic() < deadline:
        data += port.read(4096)
    return data


async def test_pty_bytes_decode_into_every_frame_written(tmp_path: Path) -> None:
    link = tmp_path / "usb-Masimo-if00"
    sim = DeviceSimulator(MODEL, load_scenario("desaturation"), seed=5, speed=SPEED)
    written: list[bytes] = []
    with PtyEndpoint(link=link) as endpoint:
        assert link.resolve() == Path(endpoint.path).resolve()

        def write(frame: bytes) -> None:
            written.append(frame)
            endpoint.write(frame)

        # Open first: pyserial flushes what was sent before the port was opened, as a UART never received it.
        with serial.Serial(str(link), baudrate=9600, timeout=0.05) as port:
            reading = asyncio.create_task(asyncio.to_thread(read_lines, port, N))
            assert await sim.run(write, count=N) == N
            data = await reading
    assert data == b"".join(written)  # raw tty: CR LF and every byte unchanged
    assert sim.frames_written == endpoint.frames_written == N and endpoint.frames_dropped == 0
    readings = readings_of(data)
    assert_readings_match(readings, list(sim.samples))
    assert [r.raw for r in readings] == written


async def test_tcp_clients_get_the_stream_and_their_bytes_are_collected() -> None:
    received: list[bytes] = []
    async with TcpEndpoint(port=0, on_receive=received.append) as endpoint:
        assert endpoint.port != 0 and endpoint.url == f"socket://127.0.0.1:{endpoint.port}"
        endpoint.write(b"nobody is connected\r\n")
        assert (endpoint.frames_written, endpoint.frames_dropped) == (0, 1)

        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        await asyncio.wait_for(endpoint.wait_for_client(), 5)
        sim = DeviceSimulator(MODEL, load_scenario("baseline"), seed=2, speed=SPEED)
        await sim.run(endpoint.write, count=N)
        data = b""
        async with asyncio.timeout(5):
            while data.count(b"\n") < N:
                data += await reader.read(4096)
        assert_readings_match(readings_of(data), list(sim.samples))
        assert endpoint.frames_written == N

        writer.write(b"host command\r\n")
        await writer.drain()
        await wait_for(lambda: bytes(endpoint.received) == b"host command\r\n", 5)
        assert b"".join(received) == b"host command\r\n"
        writer.close()
        await writer.wait_closed()
        await wait_for(lambda: endpoint.clients == 0, 5)


async def test_bytes_are_the_same_at_any_speed_and_duration_counts_scenario_seconds() -> None:
    slow = DeviceSimulator(MODEL, load_scenario("probe_off"), seed=9)
    expected = [slow.step()[1] for _ in range(10)]
    sim = DeviceSimulator(MODEL, load_scenario("probe_off"), seed=9, speed=200.0)
    got: list[bytes] = []
    assert await sim.run(got.append, duration_s=10) == 10  # t = 0..9
    assert got == expected
    assert sim.t == 10
    await sim.run(got.append, duration_s=2.5)  # continues the scenario: t = 10, 11, 12
    assert len(got) == 13 and sim.frames_written == 13


async def test_speed_20_is_about_20_frames_per_wall_second() -> None:
    sim = DeviceSimulator(MODEL, load_scenario("baseline"), seed=1, speed=20.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await sim.run(lambda frame: None)
    elapsed = time.monotonic() - started
    # Deadlines are start + k/20 s, so there can never be more than elapsed * 20 + 1 frames; fewer only when
    # the machine is very busy, hence the loose lower bound.
    assert 3 <= sim.frames_written <= elapsed * 20 + 1


async def test_scenario_duration_ends_the_run(tmp_path: Path) -> None:
    path = tmp_path / "short.toml"
    path.write_text("duration_s = 4\n[[keyframes]]\nt = 0\nspo2 = 97\npulse_rate = 70\n")
    sim = DeviceSimulator(MODEL, load_scenario(path), seed=1, speed=500.0)
    assert await sim.run(lambda frame: None) == 4
    assert sim.finished and await sim.run(lambda frame: None) == 0


def test_speed_must_be_positive() -> None:
    with pytest.raises(ValueError, match="speed"):
        DeviceSimulator(MODEL, load_scenario("baseline"), speed=0)


async def test_closing_the_pty_is_an_unplug(tmp_path: Path) -> None:
    link = tmp_path / "room1-spo2"
    endpoint = PtyEndpoint(link=link)
    path = endpoint.path
    with serial.Serial(str(link), timeout=1) as port:
        endpoint.close()
        assert not os.path.lexists(link) and not os.path.exists(path)
        with pytest.raises(serial.SerialException):
            port.read(1)  # the gateway's next read fails at once, as with a USB adapter pulled out
    endpoint.close()  # twice is harmless
    endpoint.write(b"x\r\n")
    assert endpoint.frames_dropped == 1  # a device still talking into a pulled cable


def test_link_replaces_an_old_symlink_but_never_a_file(tmp_path: Path) -> None:
    link = tmp_path / "by-id"
    link.symlink_to("/dev/pts/nowhere")
    with PtyEndpoint(link=link) as first:
        assert os.readlink(link) == first.path
        with PtyEndpoint(link=link) as second:
            assert os.readlink(link) == second.path
        # the newer endpoint removed its link; the older one must not remove someone else's
        assert not os.path.lexists(link)
        link.symlink_to(second.path)
    assert os.readlink(link) == second.path
    link.unlink()
    link.write_text("a real file")
    with pytest.raises(FileExistsError):
        PtyEndpoint(link=link)
    assert link.read_text() == "a real file"


def test_a_full_pty_drops_frames_instead_of_blocking() -> None:
    frame = MODEL.encode(load_scenario("baseline").sample(0, random.Random(1)))
    with PtyEndpoint() as endpoint:  # nobody reads it
        for _ in range(500):
            endpoint.write(frame)
        assert endpoint.frames_dropped > 0
        assert endpoint.frames_written + endpoint.frames_dropped == 500
        deadline = time.monotonic() + 2
        while endpoint.pending() == 0 and time.monotonic() < deadline:  # the kernel queues it in a moment
            time.sleep(0.01)
        assert endpoint.pending() > 0


async def test_pty_collects_bytes_the_host_sends() -> None:
    received: list[bytes] = []
    with PtyEndpoint(on_receive=received.append) as endpoint, serial.Serial(endpoint.path, timeout=1) as port:
        port.write(b"\x02START\x03")
        await wait_for(lambda: bytes(endpoint.received) == b"\x02START\x03", 5)
        assert b"".join(received) == b"\x02START\x03"


async def test_serve_on_a_pty_announces_the_path_and_unplugs_at_the_end(tmp_path: Path) -> None:
    link = tmp_path / "room3-spo2"
    lines: list[str] = []
    reading: list[asyncio.Task[bytes]] = []

    def read_until_unplugged(port: serial.Serial) -> bytes:
        data = b""
        with port:
            try:
                while True:
                    data += port.read(4096)
            except serial.SerialException:
                return data

    def ready(line: str) -> None:
        lines.append(line)
        port = serial.Serial(str(link), timeout=0.05)  # the gateway opens the port as soon as it appears
        reading.append(asyncio.create_task(asyncio.to_thread(read_until_unplugged, port)))

    sim = await serve(MODEL_ID, "probe_off", pty=True, link=link, speed=SPEED, duration_s=8, on_ready=ready)
    assert re.fullmatch(rf"masimo-ascii1 on /dev/pts/\d+ \(link {re.escape(str(link))}\)", lines[0])
    assert sim.frames_written == 8
    assert not os.path.lexists(link)
    data = await asyncio.wait_for(reading[0], 5)  # every frame, then the unplug
    assert_readings_match(readings_of(data), list(sim.samples))


async def test_serve_on_tcp_announces_a_socket_url() -> None:
    lines: list[str] = []
    connected: list[asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = []

    def ready(line: str) -> None:
        lines.append(line)
        port = int(line.rsplit(":", 1)[1])
        connected.append(asyncio.create_task(asyncio.open_connection("127.0.0.1", port)))

    serving = asyncio.create_task(serve("masimo-ascii1", "baseline", tcp_port=0, speed=SPEED, on_ready=ready))
    await wait_for(lambda: bool(connected) and connected[0].done(), 5)
    reader, writer = connected[0].result()
    data = await asyncio.wait_for(reader.readuntil(b"\n"), 5)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    writer.close()
    assert re.fullmatch(r"masimo-ascii1 on socket://127\.0\.0\.1:\d+", lines[0])
    assert len(readings_of(data)) == 1


async def test_serve_on_stdout_writes_the_exact_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    lines: list[str] = []
    await serve(MODEL_ID, "baseline", stdout=True, speed=500, duration_s=3, seed=6, on_ready=lines.append)
    reference = DeviceSimulator(MODEL, load_scenario("baseline"), seed=6)
    assert out.getvalue() == b"".join(reference.step()[1] for _ in range(3))
    assert lines == ["masimo-ascii1 on stdout"]


async def test_serve_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one endpoint"):
        await serve("masimo-ascii1", "baseline")
    with pytest.raises(ValueError, match="link needs pty"):
        await serve("masimo-ascii1", "baseline", stdout=True, link=Path("/tmp/x"))


async def test_sigterm_stops_serve_cleanly_and_removes_the_link(tmp_path: Path) -> None:
    link = tmp_path / "room2-spo2"
    code = (
        "import asyncio, pathlib, sys\n"
        "from simulators.serve import serve\n"
        "ready = lambda line: print(line, flush=True)\n"
        f"asyncio.run(serve('masimo-ascii1', 'baseline', pty=True, link=pathlib.Path({str(link)!r}), on_ready=ready))\n"
        "print('returned', flush=True)\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert line.startswith(b"masimo-ascii1 on /dev/pts/") and os.path.lexists(link)
    proc.terminate()
    rest = await asyncio.wait_for(proc.stdout.read(), 10)
    assert await proc.wait() == 0 and rest == b"returned\n"
    assert not os.path.lexists(link)
