"""iso_utc formats the date and time of day once a second (every record is stamped by it): the text must stay what
datetime made of the same float, microseconds rounded half to even, for any time and in any order of calls."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from gateway.envelope import iso_utc, parse_iso_ns

TIMES = st.floats(min_value=0.0, max_value=4_102_444_800.0, allow_nan=False)  # 1970 to 2100


def _datetime_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@given(st.lists(TIMES, min_size=1, max_size=20))
def test_the_same_text_as_datetime_in_any_order(times: list[float]) -> None:
    for ts in times:  # alternating seconds: the cached second must never leak into another one
        assert iso_utc(ts) == _datetime_text(ts)


@given(st.integers(1_600_000_000, 1_900_000_000), st.integers(0, 999_999))
def test_half_microseconds_and_second_boundaries(second: int, micros: int) -> None:
    for ts in (second + micros / 1e6 + 5e-7, second + 0.9999996, second - 1e-7, float(second)):
        assert iso_utc(ts) == _datetime_text(ts)
        assert abs(parse_iso_ns(iso_utc(ts)) - ts * 1e9) <= 1_000  # within the microsecond it stands for
