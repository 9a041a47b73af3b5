"""A subscriber in its own process that counts messages: `python -m benchmarks.counter PORT TOPIC K`.

Prints "ready" once subscribed, then the monotonic time (system-wide on Linux) at which the K-th non-empty message
arrived, and exits. Counting a replay of tens of thousands of messages in the benchmark's own process would share
its event loop with the subscriber that timestamps live readings, and delay those stamps."""

from __future__ import annotations

import asyncio
import sys
import time

from gateway.config import MqttSection
from gateway.sinks.mqtt import subscribe


async def count(port: int, topic: str, k: int) -> float:
    seen = 0
    async with subscribe(MqttSection(host="127.0.0.1", port=port), [topic], f"bench-count-{time.time_ns()}") as msgs:
        print("ready", flush=True)
        async for _topic, payload in msgs:
            if payload:
                seen += 1
                if seen >= k:
                    return time.monotonic()
    raise RuntimeError(f"the subscription ended after {seen} of {k} messages")


if __name__ == "__main__":
    print(asyncio.run(count(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))), flush=True)
