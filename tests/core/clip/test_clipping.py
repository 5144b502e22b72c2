"""On-device clipping against torch's own clipping and an independently written AGC."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_gradguard.core.clip._ops import (
    clip_by_agc_,
    clip_by_global_norm_,
    clip_by_param_norm_,
    clip_by_value_,
    clip_coefficient,
)
from lightning_gradguard.core.measure._grad_stats import compute_grad_stats


def _params(scale: float = 10.0, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (6,), (3, 2, 3, 3), (1,), ()]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


def _clone(params):
    return [copy.deepcopy(p) for p in params]


def _grads(params):
    return [p.grad for p in params]


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_global_norm_clip_matches_torch(max_norm, norm_type):
    ours, ref = _params(), _params()
    stats = compute_grad_stats(ours, norm_type=norm_type)
    coef, clipped = clip_by_global_norm_(stats.grads, stats.total_norm, max_norm)
    total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type, foreach=True)
    assert float(stats.total_norm) == pytest.approx(float(total), rel=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    assert bool(clipped) == (float(total) > max_norm)
    post = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, norm_type) for g in _grads(ours)]), norm_type
    )
    assert float(post) <= max_norm * (1 + 1e-6)
    assert float(post) == pytest.approx(float(stats.total_norm * coef), rel=1e-5)


def test_global_clip_leaves_nonfinite_grads_alone():
    params = _params()
    params[1].grad[0] = float("inf")
    before = [p.grad.clone() for p in params]
    stats = compute_grad_stats(params)
    coef, clipped = clip_by_global_norm_(stats.grads, stats.total_norm, 1.0)
    assert float(coef) == 1.0
    assert not bool(clipped)
    for b, p in zip(before, params):
        assert torch.equal(b, p.grad)  # torch's clip_grad_norm_ would have turned these into NaN


def test_infinite_threshold_means_no_clip():
    params = _params()
    before = [p.grad.clone() for p in params]
    stats = compute_grad_stats(params)
    coef, clipped = clip_by_global_norm_(stats.grads, stats.total_norm, torch.tensor(math.inf))
    assert float(coef) == 1.0
    assert not bool(clipped)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, params))


def test_clip_coefficient_values():
    coef = clip_coefficient(torch.tensor([4.0, 1.0, float("nan"), float("inf")]), 2.0, eps=0.0)
    assert coef.tolist() == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("clip_value", [0.1, 2.0, 100.0])
def test_value_clip_matches_torch(clip_value):
    ours, ref = _params(), _params()
    stats = compute_grad_stats(ours)
    clipped = clip_by_value_(stats.grads, clip_value)
    had_big = any(float(p.grad.abs().max()) > clip_value for p in ref)
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)
    assert bool(clipped) == had_big


def test_value_clip_spares_nonfinite_gradients():
    params = _params()
    params[0].grad[0, 0] = float("nan")
    bad = params[0].grad.clone()
    stats = compute_grad_stats(params)
    clip_by_value_(stats.grads, 0.5)  # the NaN tensor is spared, whatever the norms say
    assert torch.equal(params[0].grad.nan_to_num(7.0), bad.nan_to_num(7.0))
    assert all(float(p.grad.abs().max()) <= 0.5 for p in params[1:])


@pytest.mark.parametrize("max_norm", [0.5, 5.0])
def test_per_parameter_clip_matches_clip_grad_norm_per_tensor(max_norm):
    ours, ref = _params(), _params()
    stats = compute_grad_stats(ours)
    coef, clipped = clip_by_param_norm_(stats.grads, stats.param_norms, max_norm)
    for p in ref:
        torch.nn.utils.clip_grad_norm_([p], max_norm)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
        assert float(a.grad.norm()) <= max_norm * (1 + 1e-6)
    assert coef.shape == (len(ours),)
    assert bool(clipped) == bool((stats.param_norms > max_norm).any())


def reference_agc(params, clipping, eps=1e-3):
    """timm-style AGC, written here independently: unit = dims 1.. reduced; vectors/scalars as a whole."""

    def unit_norm(x):
        if x.ndim <= 1:
            return x.norm(2)
        return x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in params:
        g = p.grad.detach()
        max_norm = unit_norm(p.detach()).clamp(min=eps) * clipping
        grad_norm = unit_norm(g)
        clipped_grad = g * (max_norm / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm < max_norm, g, clipped_grad))


@pytest.mark.parametrize("clipping", [0.01, 0.1, 10.0])
def test_agc_matches_independent_reference(clipping):
    ours, ref = _params(scale=1.0), _params(scale=1.0)
    with torch.no_grad():
        ours[2][0].zero_()  # a zero unit: its bound is clipping * eps
        ref[2][0].zero_()
    stats = compute_grad_stats(ours)
    clipped_units, total_units = clip_by_agc_(stats.params, stats.grads, clipping, eps=1e-3)
    reference_agc(ref, clipping)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    assert int(total_units) == 6 + 1 + 3 + 1 + 1
    assert 0 <= int(clipped_units) <= int(total_units)
    if clipping == 0.01:
        assert int(clipped_units) == int(total_units)  # grads ~ weights: every unit is over 1%
    if clipping == 10.0:
        assert int(clipped_units) < int(total_units)


def test_agc_spares_nonfinite_units():
    params = _params(scale=1.0)
    params[0].grad[2, 1] = float("inf")
    stats = compute_grad_stats(params)
    clip_by_agc_(stats.params, stats.grads, 0.01)
    assert math.isinf(float(params[0].grad[2, 1]))  # that unit untouched (scaling inf makes NaN)
    assert torch.isfinite(params[0].grad[[0, 1, 3, 4, 5]]).all()
    w_rows = params[0].detach().norm(dim=1)
    g_rows = params[0].grad[[0, 1, 3, 4, 5]].norm(dim=1)
    assert (g_rows <= 0.01 * w_rows[[0, 1, 3, 4, 5]] * (1 + 1e-5)).all()


def test_half_precision_grads_are_scaled_in_place():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = torch.full((4,), 10.0, dtype=torch.bfloat16)
    stats = compute_grad_stats([p])
    clip_by_global_norm_(stats.grads, stats.total_norm, 1.0)
    assert p.grad.dtype == torch.bfloat16
    assert float(p.grad.float().norm()) == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("clipping", [0.01, 1.0])
def test_agc_same_shape_tensors_stacked_match_reference(clipping):
    """Many small tensors of a few shapes (handled on their stacks), a lone shape and a large tensor (one by one):
    the same result as the independent per-tensor reference, with NaN/inf units spared and counted right."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 3, 3)] * 5 + [(7, 5)] * 6 + [(7,)] * 6 + [()] * 4 + [(2, 9)] + [(300, 300)]

    def make():
        ps = []
        for s in shapes:
            p = torch.nn.Parameter(torch.randn(s, generator=g))
            p.grad = torch.randn(s, generator=g)
            ps.append(p)
        return ps

    g.manual_seed(3)
    ours = make()
    g.manual_seed(3)
    ref = make()
    ours[6].grad[2, 1] = float("nan")  # one unit of one stacked (7, 5) tensor
    ref[6].grad[2, 1] = float("nan")
    expected = 0  # units over their bound, counted from the definition before anything is clipped
    for p in ref:
        units_w = [p.detach().reshape(-1)] if p.ndim <= 1 else list(p.detach().flatten(1))
        units_g = [p.grad.reshape(-1)] if p.ndim <= 1 else list(p.grad.flatten(1))
        for w, gr in zip(units_w, units_g):
            gn = float(gr.norm())
            expected += math.isfinite(gn) and gn > clipping * max(float(w.norm()), 1e-3)
    assert expected > 0
    clipped_units, total_units = clip_by_agc_(ours, [p.grad for p in ours], clipping, eps=1e-3)
    reference_agc([p for i, p in enumerate(ref) if i != 6], clipping)
    for i, (a, b) in enumerate(zip(ours, ref)):
        if i == 6:
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert math.isnan(float(ours[6].grad[2, 1]))  # the NaN unit untouched...
    assert torch.isfinite(ours[6].grad[[0, 1, 3, 4, 5, 6]]).all()  # ...its tensor's other units clipped normally
    rows = [0, 1, 3, 4, 5, 6]
    w_rows, g_rows = ours[6].detach()[rows].norm(dim=1), ours[6].grad[rows].norm(dim=1)
    assert (g_rows <= clipping * w_rows * (1 + 1e-5)).all()
    assert int(total_units) == 5 * 4 + 6 * 7 + 6 + 4 + 2 + 300
    assert int(clipped_units) == expected
