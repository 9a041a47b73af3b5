"""The serial adapter's other ports, in the push mode sessions use (`deliver_to`, `lost`): a serial device server
(`socket://`, raw TCP through asyncio) and a pyserial URL read by a worker thread (`loop://`, what it is written
comes back). Each hands over what arrives, and a server that goes away is a TransportError, not a silence."""

from __future__ import annotations

import asyncio

import pytest

from devices.registry import get_model
from gateway.serial_port import SerialPort, TransportError
from tests.helpers import wait_for

LINE = b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n"
SETTINGS = get_model("masimo-ascii1").spec.serial


async def _received(chunks: list[bytes], size: int) -> None:
    await wait_for(lambda: sum(map(len, chunks)) >= size, 5)


async def test_a_serial_device_server_is_read_and_its_going_away_is_a_loss() -> None:
    clients: list[asyncio.StreamWriter] = []

    async def device(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.append(writer)
        writer.write(LINE)
        await writer.drain()

    server = await asyncio.start_server(device, "127.0.0.1", 0)
    port_number = server.sockets[0].getsockname()[1]
    chunks: list[bytes] = []
    try:
        async with SerialPort(f"socket://127.0.0.1:{port_number}", SETTINGS) as port:
            port.deliver_to(chunks.append)
            await _received(chunks, len(LINE))
            assert b"".join(chunks) == LINE
            clients[0].close()  # the device server drops the connection
            with pytest.raises(TransportError):
                async with asyncio.timeout(5):
                    await port.lost
    finally:
        server.close()
        await server.wait_closed()


async def test_a_port_read_by_a_thread_hands_over_what_it_reads() -> None:
    chunks: list[bytes] = []
    async with SerialPort("loop://", SETTINGS) as port:
        port.deliver_to(chunks.append)
        await port.write(LINE)
        await _received(chunks, len(LINE))
        assert b"".join(chunks) == LINE
        assert not port.lost.done()


async def test_what_the_receiver_raises_ends_the_port_loudly() -> None:
    """A decoding bug must reach the session's task (and stop the gateway), not a line in asyncio's log."""

    async def device(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(LINE)
        await writer.drain()

    def broken(_data: bytes) -> None:
        raise RuntimeError("decoder bug")

    server = await asyncio.start_server(device, "127.0.0.1", 0)
    port_number = server.sockets[0].getsockname()[1]
    try:
        async with SerialPort(f"socket://127.0.0.1:{port_number}", SETTINGS) as port:
            port.deliver_to(broken)
            with pytest.raises(RuntimeError, match="decoder bug"):
                async with asyncio.timeout(5):
                    await port.lost
    finally:
        server.close()
        await server.wait_closed()
