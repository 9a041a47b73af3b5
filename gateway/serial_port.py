"""The pyserial adapter: the only module that imports serial or serial_asyncio_fast.

Local ports, USB adapters and `socket://` serial servers go through pyserial-asyncio-fast (event-loop readiness).
`rfc2217://` ports have no file descriptor to watch, so they are read by a worker thread. Every pyserial or OS
error becomes a TransportError, so the session has one thing to catch.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, Self

import serial
import serial_asyncio_fast

from devices.base import SerialSettings
from gateway.errors import GatewayError


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


class SerialPort:
    """An open port: `read()` returns the next chunk of bytes, b"" never (loss raises TransportError)."""

    def __init__(self, url: str, settings: SerialSettings) -> None:
        self.url = url
        self.settings = settings
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._threaded: serial.SerialBase | None = None

    async def __aenter__(self) -> Self:
        kwargs = _serial_kwargs(self.settings)
        try:
            if self.url.startswith("rfc2217://"):
                self._threaded = await asyncio.to_thread(serial.serial_for_url, self.url, timeout=0.2, **kwargs)
            else:
                self._reader, self._writer = await serial_asyncio_fast.open_serial_connection(url=self.url, **kwargs)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise TransportError(f"cannot open {self.url}: {exc}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None
        if self._threaded is not None:
            port, self._threaded = self._threaded, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(port.close)

    async def read(self) -> bytes:
        try:
            if self._threaded is not None:
                port = self._threaded
                while True:
                    data: bytes = await asyncio.to_thread(port.read, max(1, port.in_waiting))
                    if data:
                        return data
            assert self._reader is not None, "port is not open"
            data = await self._reader.read(4096)
        except (serial.SerialException, OSError, ConnectionError) as exc:
            raise TransportError(f"{self.url} lost: {exc}") from exc
        if not data:
            raise TransportError(f"{self.url} closed by the other end")
        return data

    async def write(self, data: bytes) -> None:
        try:
            if self._threaded is not None:
                await asyncio.to_thread(self._threaded.write, data)
                return
            assert self._writer is not None, "port is not open"
            self._writer.write(data)
            await self._writer.drain()
        except (serial.SerialException, OSError, ConnectionError) as exc:
            raise TransportError(f"{self.url} write failed: {exc}") from exc
