"""Serve a model's byte stream, paced like the real device, on a pty, a TCP serial server or stdout.

Bytes come only from `model.encode(sample)`, so what the gateway reads here is what `decode` and the driver
tests see ("same bytes both ways"). Endpoints behave like the hardware they stand in for: a device never waits
for a reader, so a frame nobody can take is dropped and counted, never queued or blocking.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import math
import os
import random
import signal
import sys
import termios
import tty
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from devices.base import Emulator, Model, Sample
from devices.registry import MODELS, get_model
from simulators.scenarios import Scenario, load_scenario

Write = Callable[[bytes], None]
Frames = AsyncGenerator[bytes, None]


class EndpointClosedError(Exception):
    """The reader went away for good (stdout's pipe closed): stop serving."""


# --- pacing -------------------------------------------------------------------------------------------------


class DeviceSimulator:
    """One simulated device: scenario samples fed to the model's emulator, paced in scenario time.

    The emulator (devices/*: the device side of the protocol) decides what goes on the wire: an output-only
    device sends one `encode(sample)` per frame interval; an interactive one (a cuff, a Contec oximeter) stays
    silent until the host's commands, passed in through `receive`, start it. Ticks come every
    `tick_s` scenario seconds (the frame interval for output-only devices), so scenario time, and the bytes for
    a seed, are the same at any speed; `speed` only changes how fast the wall clock goes by. Successive `run`
    calls continue the same scenario and random stream (a device that was unplugged keeps its clock).
    """

    def __init__(
        self, model: Model, scenario: Scenario, *, seed: int = 1, speed: float = 1.0, keep: int = 10_000
    ) -> None:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number, not {speed}")
        self.model = model
        self.scenario = scenario
        self.seed = seed
        self.speed = speed
        self.frame_interval_s = model.spec.frame_interval_s
        self.emulator: Emulator = model.make_emulator()
        self.tick_s = self.frame_interval_s if model.emulator is None else min(self.frame_interval_s, 0.1)
        self.frames_written = 0  # non-empty outputs handed to `write` by run()
        # Bounded, because the demo runs for days; tests read the recent ones.
        self.samples: collections.deque[Sample] = collections.deque(maxlen=keep)
        self.last_sample: Sample | None = None
        self._rng = random.Random(seed)
        self._k = 0  # ticks made so far; scenario time is k * tick_s (no float drift from summing)
        self._write: Write | None = None
        self._kind = str(model.spec.kind)
        self._fault_rng = random.Random(seed ^ 0x5EED)  # faults do not disturb the values' random stream
        self.unplugged = False
        self.on_unplug: Callable[[bool], None] | None = None  # the endpoint closes and reopens the pty
        self.frames_lost = 0  # outputs the scenario's faults kept from the wire (unplug, silence)

    @property
    def t(self) -> float:
        """Scenario time of the next tick, in seconds."""
        return self._k * self.tick_s

    @property
    def finished(self) -> bool:
        """True once the scenario's own duration_s is used up (scenarios without one never finish)."""
        end = self.scenario.duration_s
        return end is not None and self.t >= end - 1e-9

    def step(self) -> tuple[Sample, bytes]:
        """Make the next tick now, without waiting: the sample and what reaches the wire (maybe b"")."""
        t = self.t
        sample = self.scenario.sample(t, self._rng)
        out = self.emulator.tick(t, sample)
        self._k += 1
        self.samples.append(sample)
        self.last_sample = sample
        return sample, self._apply_faults(t, out)

    def _apply_faults(self, t: float, out: bytes) -> bytes:
        faults = self.scenario.faults_at(t, self._kind) if self.scenario.file.faults else ()
        unplugged = any(f.kind == "unplug" for f in faults)
        if unplugged != self.unplugged:
            self.unplugged = unplugged
            if self.on_unplug is not None:
                self.on_unplug(unplugged)
        if not out:
            return out
        if unplugged or any(f.kind == "silence" for f in faults):
            self.frames_lost += 1
            return b""
        for fault in faults:
            out = damage(out, fault.garbage, fault.drop, fault.corrupt, self._fault_rng)
        return out

    def receive(self, data: bytes) -> None:
        """Bytes from the host (commands): the emulator's immediate reply goes out on the running writer."""
        sample = self.last_sample or self.scenario.sample(self.t, random.Random(self.seed))
        reply = self.emulator.receive(data, max(0.0, self.t - self.tick_s), sample)
        if reply and self._write is not None:
            self._write(reply)

    async def frames(self, duration_s: float | None = None, count: int | None = None) -> Frames:
        """Device output at its wall-clock times: ticks at `start + k * tick_s / speed`.

        Stops after `count` non-empty outputs, after `duration_s` scenario seconds from here, or when the
        scenario ends; otherwise runs for ever. Deadlines are fixed, so timing does not drift; after a stall of
        more than one tick (and at least 0.25 s: suspend, blocked loop) the schedule is re-anchored instead of
        bursting to catch up, as a real device would not send a backlog.
        """
        loop = asyncio.get_running_loop()
        interval = self.tick_s / self.speed
        start = loop.time()
        k = 0
        made = 0
        while not self.finished:
            if count is not None and made >= count:
                return
            if duration_s is not None and k * self.tick_s >= duration_s - 1e-9:
                return
            delay = start + k * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -max(interval, 0.25):
                start = loop.time() - k * interval
            elif k % 64 == 0:
                await asyncio.sleep(0)  # at very high speeds, still let readers and servers run
            out = self.step()[1]
            k += 1
            if out:
                made += 1
                yield out

    async def run(self, write: Write, duration_s: float | None = None, count: int | None = None) -> int:
        """Write each output as `frames` yields it, and replies to host commands as they come; returns the
        number of outputs written by this call."""
        written = 0
        self._write = write
        try:
            async with contextlib.aclosing(self.frames(duration_s=duration_s, count=count)) as frames:
                async for frame in frames:
                    write(frame)
                    written += 1
                    self.frames_written += 1
        finally:
            self._write = None
        return written


def damage(frame: bytes, garbage: float, drop: float, corrupt: float, rng: random.Random) -> bytes:
    """A bad line: random bytes before the frame, bytes lost, bits flipped (what breaks checksums)."""
    out = bytearray()
    if garbage and rng.random() < garbage:
        out += rng.randbytes(rng.randint(1, 12))
    for byte in frame:
        if drop and rng.random() < drop:
            continue
        if corrupt and rng.random() < corrupt:
            byte ^= 1 << rng.randrange(8)
        out.append(byte)
    return bytes(out)


# --- endpoints ----------------------------------------------------------------------------------------------


class PtyEndpoint:
    """A pseudo-terminal the gateway opens like a serial port; `close()` is the cable being pulled.

    The slave side is set raw, so CR LF reaches the reader unchanged (a cooked tty maps CR to NL and echoes).
    We keep our own slave fd open for the endpoint's whole life, for three reasons: the gateway opening and
    closing the port must not look like an unplug (with no slave open the master reads EIO and polls as hung
    up, which would spin our reader); the raw settings stay put between the gateway's opens; and the only way
    the gateway loses the port is `close()`, which closes the master, so its next read gets end-of-file at
    once, exactly like a USB adapter pulled out. Bytes written while no one has the port open wait in the tty
    buffer; pyserial flushes them when it opens the port, as a real UART would never have received them.

    Host-to-device bytes (commands some models answer) are read from the master when a loop is running and
    passed to `on_receive`; reading them also keeps the gateway's writes from blocking on a full buffer.
    """

    def __init__(self, link: Path | None = None, *, on_receive: Write | None = None) -> None:
        self.on_receive = on_receive
        self.received = bytearray()
        self.frames_written = 0
        self.frames_dropped = 0  # buffer full (nobody reading) or already closed
        self.closed = False
        self._master, self._slave = os.openpty()
        try:
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.path = os.ttyname(self._slave)
            self.link = link
            if link is not None:
                _replace_symlink(link, self.path)
        except BaseException:
            os.close(self._master)
            os.close(self._slave)
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: write-only, nothing is read back
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._master, self._read_master)

    def __repr__(self) -> str:
        return f"PtyEndpoint({self.path!r}, link={self.link!s})"

    def _read_master(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._stop_reading()
            return
        if data:
            self.received += data
            if self.on_receive is not None:
                self.on_receive(data)

    def _stop_reading(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):  # the loop may already be closed at interpreter exit
                self._loop.remove_reader(self._master)
            self._loop = None

    def write(self, frame: bytes) -> None:
        """Send one frame now, never waiting. A frame that does not fit whole is dropped (a truncated tail is
        lost, like a UART overrun), so a stalled reader sees damaged or missing lines, never a delay."""
        if self.closed:
            self.frames_dropped += 1
            return
        try:
            n = os.write(self._master, frame)
        except BlockingIOError:
            n = 0
        if n == len(frame):
            self.frames_written += 1
        else:
            self.frames_dropped += 1

    def pending(self) -> int:
        """Bytes waiting for the reader. Bytes written in the last few milliseconds may not be counted yet:
        the kernel moves them to the reader's queue in a deferred work item."""
        if self.closed:
            return 0
        buf = bytearray(4)
        fcntl.ioctl(self._slave, termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)

    async def drain(self, max_wait_s: float = 1.0) -> bool:
        """Wait (up to `max_wait_s`) until the reader has taken every byte, so closing does not lose the last
        frames: bytes still in the tty buffer when the master closes are discarded. False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        await asyncio.sleep(0.02)  # let the kernel queue what was just written (see `pending`)
        while self.pending() > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def close(self) -> None:
        """Unplug: close both sides and remove the link (if it still points at us). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._stop_reading()
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.link is not None:
            with contextlib.suppress(OSError):
                if os.readlink(self.link) == self.path:
                    self.link.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically, replacing an older symlink but never a real file."""
    if os.path.lexists(link) and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink; not replacing it")
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


class TcpEndpoint:
    """A TCP serial device server (the gateway's `socket://HOST:PORT`): every client gets the stream.

    Like a real device server it does not buffer for absent or slow clients: a frame written while no client
    is connected is dropped and counted, and a client whose unsent backlog exceeds `max_backlog` bytes misses
    frames until it catches up. Bytes clients send are collected in `received` and passed to `on_receive`.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        on_receive: Write | None = None,
        max_backlog: int = 64 * 1024,
    ) -> None:
        self.host = host
        self.port = port  # the real port once started, when 0 asked for a free one
        self.on_receive = on_receive
        self.max_backlog = max_backlog
        self.received = bytearray()
        self.frames_written = 0  # reached at least one client
        self.frames_dropped = 0  # reached no client
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._client_tasks: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()

    @property
    def url(self) -> str:
        return f"socket://{self.host}:{self.port}"

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def wait_for_client(self) -> None:
        """Return once at least one client is connected (its first frame will not be dropped)."""
        while not self._clients:
            self._connected.clear()
            await self._connected.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._client_tasks.add(task)
        self._clients.add(writer)
        self._connected.set()
        try:
            while data := await reader.read(4096):
                self.received += data
                if self.on_receive is not None:
                    self.on_receive(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(writer)
            if task is not None:
                self._client_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def write(self, frame: bytes) -> None:
        """Send one frame to every client now, never waiting."""
        delivered = False
        for writer in list(self._clients):
            if writer.is_closing() or writer.transport.get_write_buffer_size() > self.max_backlog:
                continue
            writer.write(frame)
            delivered = True
        if delivered:
            self.frames_written += 1
        else:
            self.frames_dropped += 1

    async def close(self) -> None:
        """Stop listening and disconnect every client (queued bytes are still sent first)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.close()
        if self._client_tasks:
            await asyncio.wait(set(self._client_tasks), timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class StdoutEndpoint:
    """Raw frames on stdout, flushed per frame so a pipe (`| infusion-telemetry decode`) sees them live.

    Writing blocks while the pipe is full: the downstream reader sets the pace, which is what a pipe is for.
    """

    def __init__(self) -> None:
        self.frames_written = 0

    def write(self, frame: bytes) -> None:
        try:
            sys.stdout.buffer.write(frame)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # The reader left (`| head`). Point stdout at /dev/null so the interpreter's last flush is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            raise EndpointClosedError("stdout closed") from None
        self.frames_written += 1


@contextlib.contextmanager
def _sigterm_stops_this_task() -> Iterator[list[int]]:
    """While inside, SIGTERM cancels the current task (instead of killing the process) so endpoints close and
    the link is removed, as for Ctrl-C. Yields a list that gets an item once SIGTERM arrived. Only in the main
    thread, where asyncio can install signal handlers; elsewhere a no-op."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    hits: list[int] = []

    def on_sigterm() -> None:
        hits.append(signal.SIGTERM)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):
        yield hits
        return
    try:
        yield hits
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# --- the CLI's entry points --------------------------------------------------------------------------------


class _PtySlot:
    """The pty of one device, replaced by a new one at the same link after an `unplug` fault ends."""

    def __init__(self, link: Path | None, on_receive: Write, ready: Callable[[str], None], label: str) -> None:
        self.link = link
        self.on_receive = on_receive
        self.ready = ready
        self.label = label
        self.endpoint = self._open()

    def _open(self) -> PtyEndpoint:
        endpoint = PtyEndpoint(link=self.link, on_receive=self.on_receive)
        self.ready(f"{self.label} on {endpoint.path}" + (f" (link {self.link})" if self.link is not None else ""))
        return endpoint

    def write(self, frame: bytes) -> None:
        self.endpoint.write(frame)

    def unplug(self, unplugged: bool) -> None:
        if unplugged:
            self.endpoint.close()
        elif self.endpoint.closed:
            self.endpoint = self._open()


async def _serve_sim(
    sim: DeviceSimulator,
    label: str,
    *,
    pty: bool,
    link: Path | None,
    tcp_port: int | None,
    stdout: bool,
    duration_s: float | None,
    ready: Callable[[str], None],
    tcp_host: str = "127.0.0.1",
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        writers: list[Write] = []
        slot: _PtySlot | None = None
        if pty:
            slot = _PtySlot(link, sim.receive, ready, label)
            stack.callback(lambda: slot.endpoint.close() if slot else None)
            writers.append(slot.write)
            sim.on_unplug = slot.unplug
        if tcp_port is not None:
            tcp = await stack.enter_async_context(TcpEndpoint(port=tcp_port, host=tcp_host, on_receive=sim.receive))
            writers.append(tcp.write)
            ready(f"{label} on {tcp.url}")
        if stdout:
            writers.append(StdoutEndpoint().write)
            ready(f"{label} on stdout")

        def write(frame: bytes) -> None:
            for w in writers:
                w(frame)

        await sim.run(write, duration_s=duration_s)
        if slot is not None:
            # Let a connected reader take the last frame before the cable is "pulled".
            await slot.endpoint.drain(max_wait_s=1.0)


async def _until_sigterm(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro`; SIGTERM (like Ctrl-C) ends it cleanly, closing endpoints and removing links."""
    with _sigterm_stops_this_task() as sigterm:
        try:
            await coro
        except EndpointClosedError:
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not sigterm or task is None:
                raise
            task.uncancel()  # our own stop, not the caller's: return normally


async def serve(
    model_id: str,
    scenario: Scenario | str | Path,
    *,
    pty: bool = False,
    link: Path | None = None,
    tcp_port: int | None = None,
    stdout: bool = False,
    speed: float = 1.0,
    duration_s: float | None = None,
    seed: int = 1,
    on_ready: Callable[[str], None] | None = None,
) -> DeviceSimulator:
    """Serve `model_id` on every endpoint asked for, until `duration_s` scenario seconds (or the scenario's
    own end, cancellation or SIGTERM); returns the simulator with its counters. Endpoints are closed (the
    pty's link removed) on every way out.

    `on_ready` gets one human line per endpoint once it accepts readers, before the first frame, e.g.
    "masimo-ascii1 on /dev/pts/5 (link /tmp/room1-spo2)" or "masimo-ascii1 on socket://127.0.0.1:4001".
    Every endpoint gets the same frames. Bad arguments raise UnknownModelError, ScenarioError or ValueError.
    """
    model = get_model(model_id)
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if not (pty or tcp_port is not None or stdout):
        raise ValueError("choose at least one endpoint: pty, tcp_port or stdout")
    if link is not None and not pty:
        raise ValueError("link needs pty")
    sim = DeviceSimulator(model, scenario, seed=seed, speed=speed)
    await _until_sigterm(
        _serve_sim(
            sim,
            model_id,
            pty=pty,
            link=link,
            tcp_port=tcp_port,
            stdout=stdout,
            duration_s=duration_s,
            ready=on_ready or (lambda _line: None),
        )
    )
    return sim


@dataclass(frozen=True)
class RoomDevice:
    """One device of a simulated room: its name in the room (the link's file name) and model."""

    name: str
    model_id: str


DEFAULT_ROOM = tuple(
    d
    for d in (RoomDevice("oximeter", "masimo-ascii1"), RoomDevice("cuff", "suntech-advantage"))
    if d.model_id in MODELS  # the cuff joins the room once its driver is registered
)


async def serve_room(
    room: str,
    scenario: Scenario | str | Path,
    link_dir: Path,
    *,
    devices: tuple[RoomDevice, ...] = DEFAULT_ROOM,
    speed: float = 1.0,
    duration_s: float | None = None,
    seed: int = 1,
    on_ready: Callable[[str], None] | None = None,
    pty: bool = True,
    tcp_port_base: int | None = None,
    tcp_host: str = "127.0.0.1",
) -> list[DeviceSimulator]:
    """A whole room at once: every device on its own pty, linked as `link_dir/room-<room>/<name>`, and/or on TCP
    port `tcp_port_base + i` (device i of the room: for gateways in another container, where ptys cannot reach),
    all following the same scenario (the oximeter takes its SpO2 from it, the cuff its pressures)."""
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    folder = link_dir / f"room-{room}"
    folder.mkdir(parents=True, exist_ok=True)
    sims = [DeviceSimulator(get_model(d.model_id), scenario, seed=seed + i, speed=speed) for i, d in enumerate(devices)]

    async def all_devices() -> None:
        async with asyncio.TaskGroup() as group:
            for i, (device, sim) in enumerate(zip(devices, sims, strict=True)):
                group.create_task(
                    _serve_sim(
                        sim,
                        f"room {room} {device.name} ({device.model_id})",
                        pty=pty,
                        link=folder / device.name if pty else None,
                        tcp_port=None if tcp_port_base is None else tcp_port_base + i,
                        tcp_host=tcp_host,
                        stdout=False,
                        duration_s=duration_s,
                        ready=on_ready or (lambda _line: None),
                    )
                )

    await _until_sigterm(all_devices())
    return sims
