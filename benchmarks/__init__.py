"""Benchmarks: they print figures (and write JSON); they never pass or fail. `make bench` runs them."""
