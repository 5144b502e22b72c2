"""Threshold rules against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_gradguard.core.thresholds import (
    agc_max_norms,
    fallback_threshold,
    percentile_threshold,
    unitwise_norm,
    zscore,
    zscore_clip_target,
    zscore_threshold,
)

T = torch.tensor


def test_zscore_threshold_hand_computed():
    # mean 4, var 2.25 (std 1.5), z 2.5 -> 4 + 3.75 = 7.75
    assert float(zscore_threshold(T(4.0), T(2.25), 2.5)) == 7.75
    assert float(zscore_threshold(T(4.0), T(-1e-18), 2.5)) == 4.0  # rounding noise below 0 is treated as 0


def test_zscore_hand_computed_and_flat_stream():
    assert float(zscore(T(10.0), T(4.0), T(2.25))) == 4.0  # (10 - 4) / 1.5
    z = zscore(
        T(4.0 + 1e-3, dtype=torch.float64), T(4.0, dtype=torch.float64), T(0.0, dtype=torch.float64)
    )  # zero var: std floored at 1e-6 * 4, no 0/0
    assert torch.isfinite(z)
    assert float(z) == pytest.approx(1e-3 / (4e-6 + 1e-12))


def test_zscore_clip_targets():
    assert float(zscore_clip_target(T(4.0), T(2.25), 2.0, "threshold")) == 7.0
    assert float(zscore_clip_target(T(4.0), T(2.25), 2.0, "mean")) == 4.0
    with pytest.raises(ValueError, match=r"clip_to must be 'threshold' or 'mean', got 'median'"):
        zscore_clip_target(T(4.0), T(2.25), 2.0, "median")


def test_percentile_threshold_hand_computed():
    # sorted [1, 2, 3, 4, 10]: 10th percentile at rank 0.4 -> 1 + 0.4 * (2 - 1) = 1.4; 50th = 3; 100th = 10
    values = T([3.0, 10.0, 1.0, 4.0, 2.0])
    assert float(percentile_threshold(values, 10.0)) == pytest.approx(1.4)
    assert float(percentile_threshold(values, 50.0)) == 3.0
    assert float(percentile_threshold(values, 100.0)) == 10.0
    with_gaps = T([3.0, float("nan"), 10.0, float("inf"), 1.0, 4.0, 2.0])  # unused slots and non-finite ignored
    assert float(percentile_threshold(with_gaps, 10.0)) == pytest.approx(1.4)
    assert math.isnan(float(percentile_threshold(T([float("nan")]), 50.0)))
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\], got 101"):
        percentile_threshold(values, 101)


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    v = rng.lognormal(size=101)
    for q in (1, 10, 37.5, 90):
        assert float(percentile_threshold(torch.from_numpy(v), q)) == pytest.approx(np.percentile(v, q), rel=1e-12)


def test_fallback_threshold():
    assert float(fallback_threshold(T(2.0), T(True), 10.0, None)) == 20.0
    assert float(fallback_threshold(T(2.0), T(True), 10.0, 5.0)) == 5.0  # the fixed cap wins
    assert float(fallback_threshold(T(0.0), T(False), 10.0, 5.0)) == 5.0  # nothing seen: the cap
    assert float(fallback_threshold(T(0.0), T(False), 10.0, None)) == math.inf  # nothing seen, no cap: no clip


def test_unitwise_norm_shapes_and_values():
    w = T([[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]])
    assert unitwise_norm(w).shape == (3, 1)
    assert unitwise_norm(w).flatten().tolist() == [5.0, 10.0, 0.0]
    conv = torch.ones(2, 3, 2, 2)  # each output channel: sqrt(12)
    assert unitwise_norm(conv).shape == (2, 1, 1, 1)
    assert unitwise_norm(conv).flatten().tolist() == pytest.approx([math.sqrt(12)] * 2)
    bias = T([3.0, 4.0])  # a vector is one unit
    assert unitwise_norm(bias).shape == (1,)
    assert float(unitwise_norm(bias)) == 5.0
    assert float(unitwise_norm(T(-2.0))) == 2.0
    assert unitwise_norm(T(-2.0)).shape == ()


def test_agc_max_norms_hand_computed():
    w = T([[3.0, 4.0], [0.0, 0.0]])
    # clipping 0.1: row 0 -> 0.1 * 5 = 0.5; row 1 -> 0.1 * max(0, eps=1e-3) = 1e-4
    assert agc_max_norms(w, 0.1, 1e-3).flatten().tolist() == pytest.approx([0.5, 1e-4])


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 3, 3)])
def test_unitwise_norm_of_a_stack_is_each_tensors_own(shape):
    xs = [torch.randn(shape, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    stacked = unitwise_norm(torch.stack(xs), stacked=True)
    for k, x in enumerate(xs):
        assert stacked[k].shape == unitwise_norm(x).shape
        torch.testing.assert_close(stacked[k], unitwise_norm(x))
        torch.testing.assert_close(
            agc_max_norms(torch.stack(xs), 0.1, 1e-3, stacked=True)[k], agc_max_norms(x, 0.1, 1e-3)
        )
