"""Jittered exponential backoff, shared by every reconnect loop (sinks and serial sessions)."""

from __future__ import annotations

import random


class Backoff:
    """Full jitter (delay uniform in [base/2, cap]): many gateways restarting together do not reconnect in step."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        high = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return self._rng.uniform(min(self.base / 2, high), high)

    def reset(self) -> None:
        self.attempt = 0
