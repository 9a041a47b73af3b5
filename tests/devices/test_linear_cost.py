"""Decoding cost is linear in the bytes fed, whatever the read size (issue 13, observation 6).

contec-cms50 used to rescan its whole buffer from byte 0 on every read, so 1-byte reads of noise cost up to
4,096 byte-steps of Python per byte (one second of 115200-baud noise: 0.3-1.6 s of CPU on the shared event loop).
Wall or CPU time is never asserted here (it flakes on a loaded machine); two deterministic counts are:
- `FramedDriver.examined`: bytes copied into decode rounds plus bytes searched by resync scans, C-level searches
  included (find, regex), which a byte left waiting in the buffer costs again on every read;
- Python lines executed in devices/ (sys.settrace), which catches any Python-level rescan, counted or not.
Both per byte fed, for uniform noise, a line of zero bytes (no frame start at all: the worst case for a scan that
waits for one) and valid records, read 1, 7, 4,096 and 65,536 bytes at a time. A bound per byte that holds at
every size and split is linearity; the 1-byte / 4 KiB ratio of `examined` is guarded too. The CPU figures per MB
are `benchmarks/decode.py`'s (docs/benchmarks.md).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import devices
from devices.base import METRICS, Event, FramedDriver, ProtocolError, Sample, event_to_dict
from devices.registry import MODELS

SEED = 20261125
SIZE = 16_384
SPLITS = (1, 7, 4096, 65_536)
MAX_EXAMINED_PER_BYTE = 8.0  # measured at most 4.6 (nonin-df7, noise, 1-byte reads); contec before: ~1,000
MAX_EXAMINED_RATIO = 5.0  # 1-byte reads against 4 KiB reads; measured at most 2.3
TRACE_SIZE = 4096
MAX_LINES_PER_BYTE_1 = 150.0  # 1-byte reads: one call's overhead per byte; measured at most 85 (nonin-df8, noise)
MAX_LINES_PER_BYTE_4K = 40.0  # measured at most 25 (nonin-df8, valid records: about 100 lines a record)
DEVICES_DIR = str(Path(devices.__file__).parent)


def valid_stream(model_id: str, size: int) -> bytes:
    """Records of `model_id`, values varying, cut to `size` bytes."""
    model = MODELS[model_id]
    mid = {m: (METRICS[m].low + METRICS[m].high) / 2 for m in model.spec.metrics}
    out = bytearray()
    i = 0
    while len(out) < size:
        out += model.encode(Sample({k: v + (i % 7) for k, v in mid.items()}, device_time=datetime(2026, 1, 1)))
        i += 1
    return bytes(out[:size])


def inputs(model_id: str, size: int) -> dict[str, bytes]:
    return {
        "noise": random.Random(SEED).randbytes(size),
        "zeros": bytes(size),
        "valid": valid_stream(model_id, size),
    }


def feed(driver: FramedDriver, data: bytes, read: int) -> list[Event]:
    events: list[Event] = []
    for i in range(0, len(data), read):
        events += driver.feed(data[i : i + read], 1000.0)
    return events


def framed(model_id: str) -> FramedDriver:
    driver = MODELS[model_id].driver()
    assert isinstance(driver, FramedDriver), f"{model_id}: not a FramedDriver, its cost is not counted here"
    return driver


def lines_executed(run: Callable[[], Any]) -> int:
    """Python lines executed in devices/ while `run` runs (sys.settrace; the previous tracer is put back)."""
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(DEVICES_DIR) else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        run()
    finally:
        sys.settrace(previous)
    return count


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_bytes_examined_per_byte_fed_are_bounded_whatever_the_read_size(model_id: str) -> None:
    for kind, data in inputs(model_id, SIZE).items():
        per_byte: dict[int, float] = {}
        for read in SPLITS:
            driver = framed(model_id)
            feed(driver, data, read)
            assert driver.fed == len(data)
            per_byte[read] = driver.examined / driver.fed
        worst = max(per_byte, key=per_byte.__getitem__)
        assert per_byte[worst] <= MAX_EXAMINED_PER_BYTE, (
            f"{model_id}, {kind}: {per_byte[worst]:.1f} bytes examined per byte fed in {worst}-byte reads "
            f"(all: {per_byte}): bytes are looked at again on later reads"
        )
        ratio = per_byte[1] / per_byte[4096]
        assert ratio <= MAX_EXAMINED_RATIO, f"{model_id}, {kind}: 1-byte reads cost {ratio:.1f}x 4 KiB reads"


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_python_lines_per_byte_fed_are_bounded_whatever_the_read_size(model_id: str) -> None:
    for kind, data in inputs(model_id, TRACE_SIZE).items():
        for read, bound in ((1, MAX_LINES_PER_BYTE_1), (4096, MAX_LINES_PER_BYTE_4K)):
            driver = framed(model_id)
            per_byte = lines_executed(lambda: feed(driver, data, read)) / len(data)  # noqa: B023 (run at once)
            assert per_byte <= bound, (
                f"{model_id}, {kind}, {read}-byte reads: {per_byte:.0f} Python lines per byte fed (bound {bound:g})"
            )


def test_contec_noise_in_1_byte_reads_is_no_longer_rescanned() -> None:
    """The issue's case: one second of 115200-baud noise with no packet start, in 1-byte reads, on one driver."""
    data = bytes(11_520)
    driver = framed("contec-cms50")
    lines = lines_executed(lambda: feed(driver, data, 1))
    assert driver.examined <= 3 * len(data), f"{driver.examined} bytes examined for {len(data)} fed"
    assert lines <= 40 * len(data), f"{lines} Python lines for {len(data)} bytes (rescanning: about 2,000 a byte)"


def as_dicts(events: list[Event]) -> list[dict[str, Any]]:
    return [event_to_dict(e) for e in events]


@pytest.mark.parametrize("model_id", ["contec-cms50", "suntech-advantage"])
def test_long_noise_runs_are_reported_the_same_whatever_the_split(model_id: str) -> None:
    """Noise is held outside the buffer and reported in runs of max_buffer bytes: long runs no longer depend on
    where reads end (before, an overflow took whatever one read had buffered), and nothing is lost or repeated."""
    noise = bytes(10_000)
    stream = noise + valid_stream(model_id, 64)
    runs: list[list[dict[str, Any]]] = []
    for read in (1, 7, 4096, len(stream)):
        driver = framed(model_id)
        events = feed(driver, stream, read)
        runs.append(as_dicts(events))
        dropped = b"".join(e.dropped for e in events if isinstance(e, ProtocolError))
        assert dropped == noise, f"{read}-byte reads: the noise reported is not the noise fed"
    assert all(run == runs[0] for run in runs[1:])
    sizes = [len(e.get("dropped", "")) // 2 for e in runs[0] if e["type"] == "protocol_error"]
    assert sizes == [4096, 4096, 10_000 - 2 * 4096]


@pytest.mark.parametrize("model_id", ["contec-cms50", "suntech-advantage"])
def test_flush_reports_held_noise_with_the_truncated_frame(model_id: str) -> None:
    driver = framed(model_id)
    assert driver.feed(bytes(100), 0.0) == []  # a run is reported when it ends
    left = driver.flush()
    assert len(left) == 1 and isinstance(left[0], ProtocolError) and left[0].dropped == bytes(100)
    assert driver.flush() == []


def test_masimo_lines_after_an_overlong_one_in_the_same_read_are_read() -> None:
    """An overflow used to drop the whole rest of the read, good lines after the garbage included (and so depended
    on where reads ended); now it drops the overlong line up to its LF, and the next lines are read."""
    lines = valid_stream("masimo-ascii1", 127 * 3)
    stream = b"x" * 1000 + b"\r\n" + lines
    runs = []
    for read in (1, 7, 4096, len(stream)):
        events = feed(framed("masimo-ascii1"), stream, read)
        runs.append(as_dicts(events))
        errors = [e for e in events if isinstance(e, ProtocolError)]
        assert b"".join(e.dropped for e in errors) == b"x" * 1000 + b"\r\n", f"{read}-byte reads"
        assert sum(e["type"] == "reading" for e in runs[-1]) == 3, f"{read}-byte reads: {runs[-1]}"
    assert all(run == runs[0] for run in runs[1:])
