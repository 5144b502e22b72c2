"""Threshold rules against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_gradguard.core.clip._thresholds import (
    MAX_GROWTH,
    STD_FLOOR,
    agc_max_norms,
    ema_step,
    fallback_threshold,
    limit_growth,
    maximum,
    minimum,
    sqrt,
    unitwise_norm,
    zscore,
    zscore_threshold,
)

T = torch.tensor


def test_zscore_threshold_hand_computed():
    # mean 4, var 2.25 (std 1.5), z 2.5 -> 4 + 3.75 = 7.75, on floats and on tensors alike
    assert zscore_threshold(4.0, 2.25, 2.5) == 7.75
    assert float(zscore_threshold(T(4.0), T(2.25), 2.5)) == 7.75
    # rounding noise below 0 is treated as 0, and the std is floored at STD_FLOOR of the mean
    assert zscore_threshold(4.0, -1e-18, 2.5) == pytest.approx(4.0 * (1 + 2.5 * STD_FLOOR))
    assert float(zscore_threshold(T(4.0), T(0.0), 2.0)) == pytest.approx(4.0 * (1 + 2.0 * STD_FLOOR))


def test_zscore_hand_computed_and_flat_stream():
    assert zscore(10.0, 4.0, 2.25) == 4.0  # (10 - 4) / 1.5
    z = zscore(T(4.0 + 1e-3, dtype=torch.float64), T(4.0, dtype=torch.float64), T(0.0, dtype=torch.float64))
    assert float(z) == pytest.approx(1e-3 / (STD_FLOOR * 4.0 + 1e-12))  # zero var: no 0/0


def test_ema_step_is_welford_with_weight_one_over_n():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    mean = var = 0.0
    for n, v in enumerate(values, start=1):
        mean, var = ema_step(mean, var, v, 1.0 / n)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert var == pytest.approx(np.var(values), rel=1e-12)
    tm, tv = ema_step(T(1.0, dtype=torch.float64), T(0.0, dtype=torch.float64), T(3.0, dtype=torch.float64), 0.5)
    assert (float(tm), float(tv)) == ema_step(1.0, 0.0, 3.0, 0.5) == (2.0, 1.0)


def test_fallback_threshold_and_growth_limit():
    assert fallback_threshold(2.0, 10.0, math.inf) == 20.0
    assert fallback_threshold(2.0, 10.0, 5.0) == 5.0  # the fixed cap wins
    assert float(fallback_threshold(T(2.0), 10.0, 5.0)) == 5.0
    assert limit_growth(50.0, 10.0) == pytest.approx(10.0 * (1 + MAX_GROWTH))
    assert limit_growth(5.0, 10.0) == 5.0  # falling is never limited
    assert limit_growth(5.0, math.inf) == 5.0
    assert float(limit_growth(T(50.0), T(10.0))) == pytest.approx(10.1)
    assert float(limit_growth(T(50.0), 10.0)) == pytest.approx(10.1)


def test_float_and_tensor_helpers_agree():
    for a, b in ((1.0, 2.0), (3.0, -1.0), (0.0, 0.0)):
        assert minimum(a, b) == float(minimum(T(a), b)) == float(minimum(T(a), T(b))) == float(minimum(a, T(b)))
        assert maximum(a, b) == float(maximum(T(a), b)) == float(maximum(T(a), T(b))) == float(maximum(a, T(b)))
    assert sqrt(4.0) == float(sqrt(T(4.0))) == 2.0
    assert sqrt(-1e-20) == float(sqrt(T(-1e-20))) == 0.0


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


def test_unitwise_norm_of_complex_tensors_is_the_modulus_norm():
    z = torch.tensor([[3 + 4j, 0j], [1j, 1 + 0j]], dtype=torch.complex64)
    assert unitwise_norm(z).flatten().tolist() == pytest.approx([5.0, math.sqrt(2)])
    assert float(unitwise_norm(torch.tensor([3 + 4j]))) == pytest.approx(5.0)
    assert unitwise_norm(torch.stack([z, z]), stacked=True).shape == (2, 2, 1)
