"""A whole room served at once: every device on a pty at its link and on TCP, following one scenario."""

from __future__ import annotations

import asyncio
from pathlib import Path

from devices.base import Reading
from devices.registry import get_model
from devtools.localservices import find_free_port
from simulators.serve import RoomDevice, serve_room
from tests.helpers import wait_for


async def test_room_devices_on_pty_links_and_tcp(tmp_path: Path) -> None:
    base = find_free_port()
    devices = (RoomDevice("oximeter", "masimo-ascii1"), RoomDevice("spare", "masimo-ascii1"))
    task = asyncio.create_task(
        serve_room("4", "baseline", tmp_path, devices=devices, speed=20, duration_s=10, tcp_port_base=base)
    )
    await wait_for(lambda: (tmp_path / "room-4" / "oximeter").is_symlink(), 5)
    assert (tmp_path / "room-4" / "spare").is_symlink()
    reader, writer = await asyncio.open_connection("127.0.0.1", base + 1)
    data = b""
    while data.count(b"\r\n") < 3:
        data += await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    readings = [e for e in get_model("masimo-ascii1").driver().feed(data, 0.0) if isinstance(e, Reading)]
    assert len(readings) >= 2 and all(90 <= r.metrics["spo2"] <= 100 for r in readings)
    sims = await asyncio.wait_for(task, 10)
    assert [s.frames_written for s in sims] == [10, 10]  # ten scenario seconds, one line a second each
    assert not (tmp_path / "room-4" / "oximeter").exists()  # links go with the ptys
