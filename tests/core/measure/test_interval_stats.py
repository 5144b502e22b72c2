"""IntervalAggregate: the interval maximum, mean and counts against a plain-Python reference, on both paths."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.core.measure._interval_stats import IntervalAggregate

values = st.one_of(
    st.floats(min_value=0.0, max_value=1e30, allow_nan=False),  # norms and losses: no cancellation in the sum
    st.sampled_from([math.nan, math.inf, -math.inf, -2.5]),
)


def reference(stream: list[float]) -> dict[str, float | int] | None:
    if not stream:
        return None
    finite = [v for v in stream if math.isfinite(v)]
    top = max(math.inf if math.isnan(v) else v for v in stream)
    return {
        "max": top,
        "mean": math.fsum(finite) / len(finite) if finite else math.nan,
        "count": len(stream),
        "nonfinite": len(stream) - len(finite),
    }


@pytest.fixture(params=[True, False], ids=["host_floats", "tensor_path"])
def host_path(request, monkeypatch):
    monkeypatch.setattr(IntervalAggregate, "host_fast_path", request.param)
    return request.param


@settings(max_examples=60, deadline=None)
@given(stream=st.lists(values, max_size=30), as_tensor=st.booleans())
def test_flush_matches_the_reference_on_both_paths(stream, as_tensor):
    for host in (True, False):
        IntervalAggregate.host_fast_path = host
        try:
            agg = IntervalAggregate()
            for v in stream:
                agg.update(torch.tensor(v, dtype=torch.float64) if as_tensor else v)
            got, want = agg.flush(), reference(stream)
        finally:
            IntervalAggregate.host_fast_path = True
        if want is None:
            assert got is None
            continue
        assert got is not None
        assert got["count"] == want["count"]
        assert got["nonfinite"] == want["nonfinite"]
        assert got["max"] == want["max"]
        if math.isnan(want["mean"]):
            assert math.isnan(got["mean"])
        else:
            assert got["mean"] == pytest.approx(want["mean"], rel=1e-9, abs=1e-300)


def test_a_nan_step_shows_as_the_maximum_and_flush_starts_a_new_interval(host_path):
    agg = IntervalAggregate()
    for v in (1.0, math.nan, 2.0):
        agg.update(torch.tensor(v))
    first = agg.flush()
    assert first is not None
    assert (first["max"], first["nonfinite"], first["mean"]) == (math.inf, 1, 1.5)
    assert agg.flush() is None
    agg.update(torch.tensor(0.5))
    assert agg.flush() == {"max": 0.5, "mean": 0.5, "sum": 0.5, "count": 1, "nonfinite": 0}
