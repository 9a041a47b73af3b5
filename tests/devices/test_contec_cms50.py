"""Contec: the start command, the keep-alive every 5 s, restart when the stream stops; the emulator behaves so."""

from __future__ import annotations

from devices.base import DeviceState, DeviceStatus, Reading, Sample, event_to_dict
from devices.contec_cms50 import KEEPALIVE, START, STOP, ContecDriver, ContecEmulator, command, encode

SAMPLE = Sample({"spo2": 97, "pulse_rate": 150, "perfusion_index": 2.5})


def test_command_bytes_are_the_documented_ones() -> None:
    assert bytes.fromhex("7D 81 A1 80 80 80 80 80 80") == START
    assert bytes.fromhex("7D 81 AF 80 80 80 80 80 80") == KEEPALIVE
    assert command(0xAA) == bytes.fromhex("7D 81 AA 80 80 80 80 80 80")


def test_driver_and_emulator_start_keep_alive_and_restart() -> None:
    driver, emulator = ContecDriver(), ContecEmulator()
    readings = 0
    sent: list[tuple[float, bytes]] = []
    t = 0.0
    while t < 40.0:
        out = driver.outgoing(t)
        if out:
            sent.append((round(t, 2), out))
            emulator.receive(out, t, SAMPLE)
        events = driver.feed(emulator.tick(t, SAMPLE), t)
        readings += sum(isinstance(e, Reading) for e in events)
        t = round(t + 0.1, 3)
    assert sent[0] == (0.0, START)
    assert [c for _, c in sent[1:4]] == [KEEPALIVE] * 3 and sent[1][0] == 5.0
    assert 60 * 39 <= readings <= 60 * 40 + 1  # 60 packets a second, kept alive past the device's 30 s
    emulator.receive(STOP, t, SAMPLE)
    assert emulator.tick(t + 1, SAMPLE) == b""
    later = driver.outgoing(t + 3)  # the stream stopped: the driver starts it again
    assert later == START


def test_values_survive_the_high_bit_encoding() -> None:
    from devices.contec_cms50 import encode

    events = ContecDriver().feed(encode(SAMPLE), 0.0)
    reading = next(e for e in events if isinstance(e, Reading))
    assert reading.metrics == {"spo2": 97, "pulse_rate": 150, "perfusion_index": 2.5}  # 150 needs bit 7
    off = ContecDriver().feed(encode(Sample({"spo2": 97}, conditions=frozenset({"probe_off"}))), 0.0)
    assert isinstance(off[0], DeviceStatus) and off[0].state == DeviceState.PROBE_OFF


def test_noise_ending_in_0x01_is_reported_the_same_whatever_the_split() -> None:
    """Found by hypothesis in CI: a read that ended on a 0x01 (a packet start, or noise) reported the noise before it
    early, so a split stream gave two resync errors where a whole one gave one."""
    packet = encode(Sample({"spo2": 97, "pulse_rate": 72}))
    stream = b"\x00" * 4 + packet + b"\x00" * 4 + b"\x01" + packet

    def events(*chunks: bytes) -> list[dict[str, object]]:
        driver = ContecDriver()
        return [event_to_dict(e) for chunk in chunks for e in driver.feed(chunk, 0.0)]

    whole = events(stream)
    assert events(stream[:18], stream[18:]) == whole
    assert [e["dropped"] for e in whole if e["type"] == "protocol_error"] == ["00000000", "0000000001"]
    assert sum(e["type"] == "reading" for e in whole) == 2
