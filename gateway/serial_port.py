"""The pyserial adapter: the only module that imports serial.

Three kinds of port, one interface (`read()` the next chunk, `write()` bytes):
- a local tty (a device path, a USB adapter, a pty): pyserial opens and configures it (baud rate, framing, DTR/RTS),
  then the gateway reads and writes a duplicate of that file descriptor itself, on the event loop's epoll with
  `os.read`/`os.write`. pyserial's own read() calls `select.select()`, which fails for any descriptor past 1,023
  ("filedescriptor out of range in select()"): a site gateway with 1,000 ports has thousands of descriptors. The
  duplicate is all that is kept open, one descriptor a port, without pyserial's four abort pipes per port.
- `socket://host:port` (a serial device server: raw TCP), through asyncio's streams, for the same reason.
- other pyserial URLs (`rfc2217://`, `loop://`) have no file descriptor to watch: a worker thread reads them.
Every pyserial or OS error becomes a TransportError, so the session has one thing to catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import serial

from devices.base import SerialSettings
from gateway.errors import GatewayError

READ_SIZE = 4096
PAUSE_AT = 1 << 16  # bytes received but not yet read back: beyond this the port is not watched until they are


class TransportError(GatewayError):
    """The port cannot be opened, or was lost (adapter unplugged, pty closed, server gone)."""


def _serial_kwargs(settings: SerialSettings) -> dict[str, Any]:
    return {
        "baudrate": settings.baudrate,
        "bytesize": settings.bytesize,
        "parity": settings.parity,
        "stopbits": settings.stopbits,
        "xonxoff": settings.xonxoff,
        "rtscts": settings.rtscts,
    }


def open_tty(path: str, settings: SerialSettings) -> int:
    """A non-blocking descriptor of the tty at `path`, configured by pyserial (termios settings, modem lines).
    The settings belong to the device, not to the descriptor, so the duplicate keeps them after pyserial's own
    descriptors are closed (not the last close: DTR is not dropped)."""
    port = serial.Serial(path, timeout=0, write_timeout=0, **_serial_kwargs(settings))
    try:
        fd = os.dup(port.fileno())
    finally:
        port.close()
    os.set_blocking(fd, False)
    return fd


class _Tty:
    """A local tty read on the event loop: its descriptor is watched by the loop's epoll all the time the port is
    open, and each readiness is one `os.read`, handed to the waiting `read()` or kept until it asks."""

    def __init__(self, fd: int, url: str) -> None:
        self.fd = fd
        self.url = url
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[bytes] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self._watching = False
        self._on_data: Callable[[bytes], None] | None = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._watch()

    def deliver_to(self, on_data: Callable[[bytes], None]) -> None:
        """From now on each chunk goes to `on_data`, called from the loop's readiness callback: no task wakes up
        per chunk. What it raises ends the port (`lost`), so a bug is not a line in asyncio's log."""
        self._on_data = on_data
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            self._hand(on_data, data)
        if self._error is None:
            self._watch()

    def _hand(self, on_data: Callable[[bytes], None], data: bytes) -> None:
        try:
            on_data(data)
        except BaseException as exc:  # raised where the session awaits its port (Session.run), not swallowed here
            self._fail(exc)

    def _watch(self) -> None:
        if not self._watching:
            self._loop.add_reader(self.fd, self._readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self.fd)
            self._watching = False

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: the other end of a pty closed, the adapter was unplugged
            self._fail(TransportError(f"{self.url} lost: {exc}"))
            return
        if not data:
            self._fail(TransportError(f"{self.url} closed by the other end"))
            return
        on_data = self._on_data
        if on_data is not None:
            self._hand(on_data, data)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= PAUSE_AT:
            self._unwatch()  # nobody reads: stop taking more until read() comes back for it

    def _fail(self, error: BaseException) -> None:
        self._unwatch()
        if self._error is None:
            self._error = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if not self.lost.done():
            self.lost.set_exception(error)
            self.lost.exception()  # retrieved: whoever awaits it sees it; nobody may, after a clean close

    async def read(self) -> bytes:
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            if self._error is None and self._on_data is None:
                self._watch()
            return data
        if self._error is not None:
            raise self._error
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        self._waiter = waiter
        try:
            return await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = os.write(self.fd, view)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            except OSError as exc:
                raise TransportError(f"{self.url} write failed: {exc}") from exc
            view = view[sent:]

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def writable() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(self.fd, writable)
        try:
            await ready
        finally:
            self._loop.remove_writer(self.fd)

    def close(self) -> None:
        self._unwatch()
        self._fail(TransportError(f"{self.url} closed"))
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SerialPort:
    """An open port: `read()` returns the next chunk of bytes, b"" never (loss raises TransportError)."""

    def __init__(self, url: str, settings: SerialSettings) -> None:
        self.url = url
        self.settings = settings
        self._tty: _Tty | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._threaded: serial.SerialBase | None = None
        self._pump: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Self:
        try:
            if "://" not in self.url:
                self._tty = _Tty(open_tty(self.url, self.settings), self.url)
            elif self.url.startswith("socket://"):
                where = urlsplit(self.url)
                if where.hostname is None or where.port is None:
                    raise ValueError("socket:// needs a host and a port")
                self._reader, self._writer = await asyncio.open_connection(where.hostname, where.port)
            else:
                self._threaded = await asyncio.to_thread(
                    serial.serial_for_url, self.url, timeout=0.2, **_serial_kwargs(self.settings)
                )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise TransportError(f"cannot open {self.url}: {exc}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None
        if self._tty is not None:
            self._tty.close()
            self._tty = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None
        if self._threaded is not None:
            port, self._threaded = self._threaded, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(port.close)

    def deliver_to(self, on_data: Callable[[bytes], None]) -> None:
        """Push mode: every chunk read from now on is handed to `on_data` (a local tty calls it from the event loop's
        readiness callback; other ports from a reading task of their own). `lost` then says when it ends."""
        if self._tty is not None:
            self._tty.deliver_to(on_data)
            return
        lost = self._lost = asyncio.get_running_loop().create_future()

        async def pump() -> None:
            try:
                while True:
                    on_data(await self.read())
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if not lost.done():
                    lost.set_exception(exc)
                    lost.exception()  # retrieved: wait_lost raises it; nobody may, after a clean close

        self._pump = asyncio.create_task(pump(), name=f"read-{self.url}")

    @property
    def lost(self) -> asyncio.Future[None]:
        """Done when the port is lost (its exception: TransportError, or what `on_data` raised); after deliver_to."""
        lost = self._tty.lost if self._tty is not None else self._lost
        assert lost is not None, "deliver_to() first"
        return lost

    async def read(self) -> bytes:
        if self._tty is not None:
            return await self._tty.read()
        try:
            if self._threaded is not None:
                port = self._threaded
                while True:
                    data: bytes = await asyncio.to_thread(port.read, max(1, port.in_waiting))
                    if data:
                        return data
            assert self._reader is not None, "port is not open"
            data = await self._reader.read(READ_SIZE)
        except (serial.SerialException, OSError, ConnectionError) as exc:
            raise TransportError(f"{self.url} lost: {exc}") from exc
        if not data:
            raise TransportError(f"{self.url} closed by the other end")
        return data

    async def write(self, data: bytes) -> None:
        if self._tty is not None:
            await self._tty.write(data)
            return
        try:
            if self._threaded is not None:
                await asyncio.to_thread(self._threaded.write, data)
                return
            assert self._writer is not None, "port is not open"
            self._writer.write(data)
            await self._writer.drain()
        except (serial.SerialException, OSError, ConnectionError) as exc:
            raise TransportError(f"{self.url} write failed: {exc}") from exc
