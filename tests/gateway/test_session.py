"""A device session over a real pty: decoded records, the no_data watchdog, a lost port, and reopening."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from pathlib import Path

from devices.base import DeviceState, DeviceStatus, Reading, Waveform
from gateway.config import DeviceConfig
from gateway.session import DeviceSession
from tests.helpers import wait_for

LINE = b"02/22/16 22:47:45 SN=0000056661 SPO2=098% BPM=097 PI=03.60% SPCO=--.-% SPMET=--.-% DESAT=-- PIDELTA=+-- ALARM=0000 EXC=000800\r\n"
PROBE_OFF = LINE.replace(b"EXC=000800", b"EXC=000820")


def open_pty(link: Path) -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.ttyname(slave))
    return master, slave


async def test_session_decodes_watches_silence_and_survives_unplug(tmp_path: Path) -> None:
    link = tmp_path / "by-id-oximeter"
    master, slave = open_pty(link)
    seen: list[Reading | DeviceStatus | Waveform] = []
    cfg = DeviceConfig(room="1", name="ox", model="masimo-ascii1", port=str(link), stale_after_s=0.6)
    session = DeviceSession(cfg, lambda _s, event, _t: seen.append(event))
    task = asyncio.create_task(session.run())

    def states() -> list[DeviceState]:
        return [e.state for e in seen if isinstance(e, DeviceStatus)]

    try:
        await wait_for(lambda: DeviceState.CONNECTED in states(), 5)
        os.write(master, b"\x00\xffnoise\r\n" + LINE + PROBE_OFF[:40])
        os.write(master, PROBE_OFF[40:])
        await wait_for(lambda: sum(isinstance(e, Reading) for e in seen) == 2, 5)
        readings = [e for e in seen if isinstance(e, Reading)]
        assert readings[0].metrics == {"spo2": 98, "pulse_rate": 97, "perfusion_index": 3.6}
        assert "probe_off" in readings[1].flags
        assert states()[-1] == DeviceState.PROBE_OFF
        assert session.protocol_errors == 1  # the noise line, counted, never a reading

        await wait_for(lambda: states()[-1] == DeviceState.NO_DATA, 3)  # silence is a state

        os.write(master, LINE)  # the device talks again: its own status is announced again
        await wait_for(lambda: states()[-1] == DeviceState.OK, 3)

        os.close(master)  # cable pulled: the pty's other side is gone
        os.close(slave)
        link.unlink()
        await wait_for(lambda: states()[-1] == DeviceState.DISCONNECTED, 3)

        master, slave = open_pty(link)  # plugged back: a new pty at the same stable path
        await wait_for(lambda: states()[-1] == DeviceState.CONNECTED, 15)
        os.write(master, LINE)
        await wait_for(lambda: sum(isinstance(e, Reading) for e in seen) == 4, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)
