"""Decode throughput of every driver: frames/s and MB/s of wire bytes, fed in 4 KiB chunks like a serial read;
and decoding cost per MB (CPU seconds, and bytes examined per byte fed) of uniform noise and of valid records, fed
1 byte and 4 KiB at a time: a driver's cost must not depend on how the port splits its reads (issue 13).

Run alone: `.venv/bin/python -m benchmarks.decode` (under a minute; prints both tables).
"""

from __future__ import annotations

import random
import time
from datetime import datetime
from typing import Any

from devices.base import METRICS, FramedDriver, Reading, Sample
from devices.registry import MODELS

SEED = 20261125
READS = (1, 4096)
COST_BYTES = {1: 128 * 1024, 4096: 1024 * 1024}  # 1-byte reads pay a call per byte: a smaller sample
REPEATS = 3  # the best of three: CPU time still moves with the machine's other load (caches, clock)


def valid_stream(model_id: str, size: int) -> bytes:
    """Records of `model_id` with values varying around the middle of their ranges, cut to `size` bytes."""
    model = MODELS[model_id]
    mid = {m: (METRICS[m].low + METRICS[m].high) / 2 for m in model.spec.metrics}
    out = bytearray()
    i = 0
    while len(out) < size:
        out += model.encode(Sample({k: v + (i % 7) for k, v in mid.items()}, device_time=datetime(2026, 1, 1)))
        i += 1
    return bytes(out[:size])


def measure(model_id: str, frames: int = 20_000) -> dict[str, Any]:
    model = MODELS[model_id]
    mid = {m: (METRICS[m].low + METRICS[m].high) / 2 for m in model.spec.metrics}
    stream = b"".join(
        model.encode(Sample({k: v + (i % 7) for k, v in mid.items()}, device_time=datetime(2026, 1, 1)))
        for i in range(frames)
    )
    driver = model.driver()
    start = time.perf_counter()
    readings = 0
    for i in range(0, len(stream), 4096):
        readings += sum(1 for e in driver.feed(stream[i : i + 4096], 0.0) if isinstance(e, Reading))
    elapsed = time.perf_counter() - start
    return {
        "model": model_id,
        "frames": frames,
        "readings": readings,
        "frames_per_s": round(frames / elapsed),
        "mb_per_s": round(len(stream) / elapsed / 1e6, 2),
        "bytes_per_frame": len(stream) // frames,
    }


def cost(model_id: str, data: bytes, read: int) -> tuple[float, float]:
    """CPU seconds per MB (process time, not wall, best of REPEATS) and bytes examined per byte fed
    (FramedDriver.examined), feeding `data` `read` bytes at a time into a fresh driver."""
    best = float("inf")
    for _ in range(REPEATS):
        driver = MODELS[model_id].driver()
        start = time.process_time()
        for i in range(0, len(data), read):
            driver.feed(data[i : i + read], 0.0)
        best = min(best, time.process_time() - start)
    examined = driver.examined / driver.fed if isinstance(driver, FramedDriver) else float("nan")
    return best / (len(data) / 1e6), examined


def measure_cost(model_id: str) -> dict[str, Any]:
    """The cost row of one driver: `noise_cpu_s_per_mb_1` is CPU seconds per MB of noise in 1-byte reads, etc."""
    row: dict[str, Any] = {}
    for read in READS:
        size = COST_BYTES[read]
        for kind, data in (("noise", random.Random(SEED).randbytes(size)), ("valid", valid_stream(model_id, size))):
            cpu, examined = cost(model_id, data, read)
            row[f"{kind}_cpu_s_per_mb_{read}"] = round(cpu, 3)
            row[f"{kind}_examined_per_byte_{read}"] = round(examined, 2)
    return row


def run() -> list[dict[str, Any]]:
    """One row per model: throughput (4 KiB reads of valid records) and the cost columns of `measure_cost`."""
    return [measure(m) | measure_cost(m) for m in sorted(MODELS)]


def table(rows: list[dict[str, Any]]) -> str:
    """The cost columns as printed: CPU s per MB (bytes examined per byte) for 1-byte / 4 KiB reads."""
    lines = ["model                noise 1 B          noise 4 KiB        valid 1 B          valid 4 KiB"]
    for row in rows:
        cells = [
            f"{row[f'{kind}_cpu_s_per_mb_{read}']:7.3f} s ({row[f'{kind}_examined_per_byte_{read}']:4.2f})"
            for kind in ("noise", "valid")
            for read in READS
        ]
        lines.append(f"{row['model']:20} " + "   ".join(f"{c:16}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    rows = run()
    for row in rows:
        print(f"{row['model']:20} {row['frames_per_s']:>9} frames/s {row['mb_per_s']:>6} MB/s")
    print("decoding cost per MB: CPU seconds (bytes examined per byte fed)")
    print(table(rows))
