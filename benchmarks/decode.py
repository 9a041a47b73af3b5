"""Decode throughput of every driver: frames/s and MB/s of wire bytes, fed in 4 KiB chunks like a serial read."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from devices.base import METRICS, Reading, Sample
from devices.registry import MODELS


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


def run() -> list[dict[str, Any]]:
    return [measure(m) for m in sorted(MODELS)]


if __name__ == "__main__":
    for row in run():
        print(row)
