"""Every registered model against its vectors and the properties every driver must have.

Vectors live in tests/vectors/<model>.json, copied from the protocol notes with their sources; a model without
vectors fails here. The hypothesis properties hold for every model: feed is total, any split gives the same
events, encode-then-feed round-trips, readings lie within the plausible ranges, random bytes make no reading.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.base import METRICS, DeviceKind, Event, Model, ProtocolError, Reading, Sample, event_to_dict
from devices.registry import MODELS

VECTORS = Path(__file__).parent.parent / "vectors"
GARBAGE = b"\x00\xff\x13 garbage \xfe\r\n"


def vector_file(model_id: str) -> Path:
    return VECTORS / f"{model_id.replace('-', '_')}.json"


def cases() -> Iterator[Any]:
    for model_id in sorted(MODELS):
        path = vector_file(model_id)
        if not path.exists():
            yield pytest.param(model_id, None, id=f"{model_id}-NO-VECTORS")
            continue
        for case in json.loads(path.read_text())["cases"]:
            yield pytest.param(model_id, case, id=f"{model_id}-{case['name']}")


def case_bytes(case: dict[str, Any]) -> bytes:
    if "hex" in case:
        return bytes.fromhex(case["hex"])
    return str(case["text"]).encode("latin-1")


def decode(model: Model, chunks: list[bytes]) -> list[dict[str, Any]]:
    driver = model.driver()
    events: list[Event] = []
    for chunk in chunks:
        events += driver.feed(chunk, 1000.0)
    return [event_to_dict(e) for e in events]


def matches(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    if len(actual) != len(expected):
        return False
    return all(all(a.get(k) == v for k, v in e.items()) for a, e in zip(actual, expected, strict=True))


def without_errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] != "protocol_error"]


@pytest.mark.parametrize(("model_id", "case"), list(cases()))
def test_vectors_whole_split_bytewise_and_in_garbage(model_id: str, case: dict[str, Any] | None) -> None:
    assert case is not None, f"{model_id} has no {vector_file(model_id).name}: copy vectors from the protocol notes"
    assert case.get("source"), "every vector names its source"
    model = MODELS[model_id]
    data = case_bytes(case)
    expected = case["expect"]
    whole = decode(model, [data])
    assert matches(whole, expected), f"whole: {whole}"
    for cut in range(1, len(data)):
        assert decode(model, [data[:cut], data[cut:]]) == whole, f"split at {cut}"
    assert decode(model, [data[i : i + 1] for i in range(len(data))]) == whole, "byte by byte"
    wrapped = decode(model, [GARBAGE, data, GARBAGE])
    assert without_errors(wrapped) == without_errors(whole), "garbage around must add only protocol errors"
    assert all(e["type"] == "protocol_error" for e in decode(model, [GARBAGE]))


MODEL_IDS = sorted(MODELS)


@pytest.mark.parametrize("model_id", MODEL_IDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_random_bytes_never_raise_and_never_read(model_id: str, data: bytes) -> None:
    spec = MODELS[model_id].spec
    readings = [e for e in MODELS[model_id].driver().feed(data, 0.0) if isinstance(e, Reading)]
    if spec.self_validating:
        assert not readings, "random bytes passed a checksum or the record structure"
    for reading in readings:  # no checksum (Nonin DF8): at least every value is one a device can report
        assert all(METRICS[k].low <= v <= METRICS[k].high for k, v in reading.metrics.items())


@pytest.mark.parametrize("model_id", MODEL_IDS)
@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_split_gives_the_same_events(model_id: str, data: st.DataObject) -> None:
    model = MODELS[model_id]
    sample = data.draw(samples(model))
    stream = data.draw(st.binary(max_size=20)) + model.encode(sample) + data.draw(st.binary(max_size=20))
    stream += model.encode(sample)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode(model, chunks) == decode(model, [stream])


def samples(model: Model) -> st.SearchStrategy[Sample]:
    if model.spec.kind == DeviceKind.NIBP:  # a result has every value, and diastolic < mean < systolic
        return st.builds(
            lambda d, gap1, gap2, pr: Sample(
                {"nibp_diastolic": d, "nibp_mean": d + gap1, "nibp_systolic": d + gap1 + gap2, "nibp_pulse_rate": pr}
            ),
            st.integers(30, 140),
            st.integers(2, 40),
            st.integers(2, 60),
            st.integers(30, 200),
        )
    metrics = {
        name: st.one_of(st.none(), st.floats(model.spec.range_of(name)[0] + 1, model.spec.range_of(name)[1] - 1))
        for name in model.spec.metrics
    }
    return st.builds(lambda m: Sample(metrics=m), st.fixed_dictionaries(metrics))


@pytest.mark.parametrize("model_id", MODEL_IDS)
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_encode_then_feed_round_trips(model_id: str, data: st.DataObject) -> None:
    model = MODELS[model_id]
    sample = data.draw(samples(model))
    events = model.driver().feed(model.encode(sample), 0.0)
    assert not [e for e in events if isinstance(e, ProtocolError)]
    readings = [e for e in events if isinstance(e, Reading)]
    assert len(readings) == 1
    for name, value in sample.metrics.items():
        got = readings[0].metrics.get(name)
        if value is None:
            assert got is None
        else:
            assert got is not None and abs(got - value) <= 0.5 + 1e-9, (name, got, value)
    for name, value in readings[0].metrics.items():
        assert METRICS[name].low <= value <= METRICS[name].high
