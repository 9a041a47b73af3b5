"""Simulated bedside devices: physiological scenarios (TOML keyframes) served as a model's exact wire bytes.

Bytes are made only by the model's own `encode` (devices/<model>.py) and served on a real pseudo-terminal, a
TCP serial server or stdout, so the gateway, `decode` and the tests see what a real device would send ("same
bytes both ways"). Output is deterministic for a seed, so a failing run can be replayed byte for byte.
"""
