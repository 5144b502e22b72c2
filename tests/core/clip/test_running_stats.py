"""Running statistics: exact against numpy references, poison-proof for any input (hypothesis), checkpoint-safe."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.core.clip._running_stats import DecayedHistogramQuantile, WindowQuantile

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=64)
NORM_LIKE = st.one_of(
    st.floats(min_value=0.0, max_value=3.4e38, allow_nan=False),
    st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3.4e38, 1e308]),
)
HYP = settings(max_examples=60, deadline=None)


def _roundtrip(state):
    """A state dict through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------------------------------- quantiles


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_window_quantile_matches_numpy_over_last_window(q):
    rng = np.random.default_rng(1)
    values = rng.lognormal(0.0, 1.0, size=57)
    wq = WindowQuantile(q=q, window=20)
    for v in values:
        wq.update(float(v))
    assert float(wq.compute()) == pytest.approx(np.quantile(values[-20:], q), rel=1e-12)
    assert int(wq.count) == 20


def test_window_quantile_partial_window_and_nonfinite_never_evict():
    wq = WindowQuantile(q=0.5, window=4)
    assert float(wq.compute()) == 0.0
    assert int(wq.count) == 0
    for v in (1.0, 2.0, float("nan"), 9.0, float("inf")):
        wq.update(v)
    assert int(wq.count) == 3
    assert float(wq.compute()) == 2.0
    wq.update(3.0)
    wq.update(4.0)  # evicts 1.0 only: window is [2, 9, 3, 4]
    assert float(wq.compute()) == pytest.approx(np.quantile([2.0, 9.0, 3.0, 4.0], 0.5))


def test_window_quantile_state_roundtrip_continues_identically():
    a = WindowQuantile(q=0.25, window=5)
    for v in (5.0, 1.0, 3.0):
        a.update(v)
    b = WindowQuantile(q=0.25, window=5)
    b.load_state_dict(_roundtrip(a.state_dict()))
    for v in (8.0, 2.0, 7.0, 6.0):
        a.update(v)
        b.update(v)
        assert float(a.compute()) == float(b.compute())
    c = WindowQuantile(q=0.25, window=6)  # a different window: starts afresh instead of mis-reading
    c.load_state_dict(a.state_dict())
    assert int(c.count) == 0


def test_histogram_quantile_within_bucket_resolution():
    rng = np.random.default_rng(2)
    values = rng.lognormal(0.0, 1.0, size=3000)
    h = DecayedHistogramQuantile(q=0.5, window=10**9)  # ~no decay: compare with the plain quantiles
    for v in values:
        h.update(float(v))
    bound = 10 ** (1 / 16)  # one bucket
    for q in (0.1, 0.5, 0.9):
        ref = np.quantile(values, q)
        assert ref / bound <= float(h.compute(q)) <= ref * bound, q


def test_histogram_quantile_forgets_with_window():
    h = DecayedHistogramQuantile(q=0.5, window=20)
    for _ in range(200):
        h.update(100.0)
    for _ in range(200):
        h.update(1.0)  # after 10 windows the old regime weighs e^-10
    assert float(h.compute()) == pytest.approx(1.0, rel=0.16)
    assert float(h.compute(0.0)) == pytest.approx(1.0, rel=0.16)


def test_histogram_zero_and_overflow_buckets():
    h = DecayedHistogramQuantile(q=0.5, window=100, min_value=1e-3, max_value=1e3)
    assert float(h.compute()) == 0.0  # empty
    for v in (0.0, 0.0, 0.0, 1e9, 1e9):
        h.update(v)
    assert float(h.compute(0.5)) == 0.0
    assert float(h.compute(1.0)) == 1e3  # clamped to the top of the range


def test_histogram_state_roundtrip():
    a = DecayedHistogramQuantile(q=0.3, window=50)
    for v in (1.0, 2.0, 4.0, 8.0):
        a.update(v)
    b = DecayedHistogramQuantile(q=0.3, window=50)
    b.load_state_dict(_roundtrip(a.state_dict()))
    for v in (3.0, 5.0):
        a.update(v)
        b.update(v)
    assert float(a.compute()) == float(b.compute())


@HYP
@given(st.lists(ANY_FLOAT, max_size=40), st.floats(min_value=0.0, max_value=1.0))
def test_quantile_estimators_stay_finite_for_any_sequence(values, q):
    wq = WindowQuantile(q=q, window=7)
    h = DecayedHistogramQuantile(q=q, window=10)
    for v in values:
        wq.update(torch.tensor(v, dtype=torch.float64))
        h.update(torch.tensor(v, dtype=torch.float64))
        assert torch.isfinite(wq.compute())
        assert torch.isfinite(h.compute())
    finite = [v for v in values if math.isfinite(v)]
    if finite:  # the window holds exactly the last 7 finite values (clamped to +-1e100)
        ref = np.quantile(np.clip(finite[-7:], -1e100, 1e100), q)
        assert float(wq.compute()) == pytest.approx(ref, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(
    ("factory", "match", "exc"),
    [
        (lambda: WindowQuantile(q=1.5), r"q must be in \[0, 1\], got 1.5", ValueError),
        (lambda: WindowQuantile(window=0), r"window must be an int >= 1, got 0", ValueError),
        (lambda: WindowQuantile(window=2.0), r"window must be an int", TypeError),
        (lambda: DecayedHistogramQuantile(window=1), r"window must be an int >= 2, got 1", ValueError),
        (lambda: DecayedHistogramQuantile(min_value=0.0), r"min_value must be finite and > 0, got 0.0", ValueError),
        (lambda: DecayedHistogramQuantile(min_value=2.0, max_value=1.0), r"0 < min_value < max_value", ValueError),
        (lambda: WindowQuantile(q="0.5"), r"q must be a number", TypeError),
        (lambda: DecayedHistogramQuantile(bins_per_decade=0), r"bins_per_decade must be an int >= 1", ValueError),
    ],
)
def test_validation(factory, match, exc):
    with pytest.raises(exc, match=match):
        factory()


def test_update_rejects_non_scalars():
    with pytest.raises(ValueError, match="expected a scalar"):
        WindowQuantile().update(torch.ones(3))
