"""Every clipping method on finite gradients of any magnitude (1e-30 ... 1e30) and dtype: the result is finite and
obeys the method's bound, also when the gradient's float32 norm would overflow (true norm above 3.4e38).

Bounds are checked against norms recomputed here in float64 (an independent reference), never the clipper's own.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_gradguard.core.clip import CLIPPERS, ZScoreClipper
from lightning_gradguard.core.measure._grad_stats import compute_grad_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SHAPES = [(6, 4), (6,), (3, 2, 3, 3), ()]
OPTIONS = {
    "zscore": {"warmup_steps": 3, "fallback_max_norm": 1.0},
    "percentile": {"warmup_steps": 3, "fallback_max_norm": 1.0, "percentile": 50.0, "window": 8},
    "norm": {"max_norm": 0.5},
    "per_parameter": {"max_norm": 0.5},
    "value": {"clip_value": 0.25},
    "agc": {"clipping": 0.01},
}


def _params(dtype, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)
        params.append(p)
    return params


def _units(t):
    t = t.detach().to(torch.float64)
    return t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)


def _check(method, clipper, record, params, before, tol):
    for p in params:
        assert torch.isfinite(p.grad).all(), method
    norms = torch.stack([torch.linalg.vector_norm(p.grad.to(torch.float64)) for p in params])
    if method in ("zscore", "percentile", "norm"):
        bound = float(record.threshold)
        total_before = float(torch.linalg.vector_norm(torch.stack(before)))
        assert float(torch.linalg.vector_norm(norms)) <= bound * (1 + tol) + 1e-300
        assert bool(record.clipped) == (total_before > bound)
    elif method == "per_parameter":
        assert (norms <= clipper.max_norm * (1 + tol)).all()
    elif method == "value":
        assert max(float(p.grad.to(torch.float64).abs().max()) for p in params) <= clipper.clip_value * (1 + tol)
    else:  # agc: every unit within clipping * max(weight norm, eps)
        for p in params:
            w = torch.linalg.vector_norm(_units(p), dim=1).clamp_min(clipper.eps)
            gn = torch.linalg.vector_norm(_units(p.grad), dim=1)
            assert (gn <= clipper.clipping * w * (1 + tol) + 1e-300).all()


@pytest.mark.parametrize("host", [True, False])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(sorted(CLIPPERS)),
    dtype=st.sampled_from(sorted(DTYPES)),
    exponent=st.floats(-30.0, 30.0),
    seed=st.integers(0, 2**16),
    warm=st.booleans(),
)
def test_every_method_clips_finite_gradients_of_any_magnitude(host, method, dtype, exponent, seed, warm):
    dt = DTYPES[dtype]
    magnitude = min(10.0**exponent, torch.finfo(dt).max / 20)  # elements stay finite in their own dtype
    ZScoreClipper.host_fast_path = host
    try:
        clipper = CLIPPERS[method](**OPTIONS[method])
        if warm:  # statistics learned from ordinary steps first, so the adaptive bound is the learned one
            for k in range(6):
                warm_params = _params(dt, 0.3, seed + 1000 + k)
                clipper.clip_(compute_grad_stats(warm_params))
                clipper.commit()
        params = _params(dt, magnitude, seed)
        if not all(torch.isfinite(p.grad).all() for p in params):
            return
        before = [torch.linalg.vector_norm(p.grad.to(torch.float64)) for p in params]
        record = clipper.clip_(compute_grad_stats(params))
    finally:
        ZScoreClipper.host_fast_path = True
    tol = 1e-9 if dt == torch.float64 else 1e-5 if dt == torch.float32 else 2e-2
    _check(method, clipper, record, params, before, tol)


@pytest.mark.parametrize("method", sorted(CLIPPERS))
def test_float32_norm_overflow_is_clipped_not_passed_through(method):
    """Elements ~1e30 in float32: each fine, but the float32 sum of squares overflows (true norm ~6e30 per tensor)."""
    params = _params(torch.float32, 1e30, seed=1)
    stats = compute_grad_stats(params)
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert math.isfinite(float(stats.total_norm64))
    assert float(stats.total_norm64) > 1e30
    clipper = CLIPPERS[method](**OPTIONS[method])
    before = [torch.linalg.vector_norm(p.grad.to(torch.float64)) for p in params]
    record = clipper.clip_(stats)
    assert bool(record.clipped)
    _check(method, clipper, record, params, before, 1e-5)


def test_nonfinite_gradients_are_left_to_the_guard():
    for method, options in OPTIONS.items():
        params = _params(torch.float32, 1.0, seed=2)
        params[1].grad[0] = math.inf
        kept = params[1].grad.clone()
        record = CLIPPERS[method](**options).clip_(compute_grad_stats(params))
        assert torch.equal(params[1].grad, kept), method  # no inf -> NaN from scaling or clamping
        if method in ("zscore", "percentile", "norm"):
            assert not bool(record.clipped), method


@pytest.mark.parametrize("method", ["agc", "zscore", "norm", "per_parameter"])
def test_complex_parameters_are_clipped_by_their_modulus(method):
    g = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g))
    w.grad = torch.randn(4, 3, dtype=torch.complex64, generator=g) * 100
    b = torch.nn.Parameter(torch.randn(4, generator=g))
    b.grad = torch.randn(4, generator=g) * 100
    params = [w, b]
    options = {**OPTIONS[method], **({"warmup_steps": 0} if method == "zscore" else {})}
    record = CLIPPERS[method](**options).clip_(compute_grad_stats(params))
    assert bool(record.clipped)
    assert all(torch.isfinite(torch.view_as_real(p.grad) if p.is_complex() else p.grad).all() for p in params)
    if method == "agc":  # each complex row within clipping * max(|row| of the weight, eps)
        rows = torch.linalg.vector_norm(w.grad, dim=1)
        assert (rows <= 0.01 * torch.linalg.vector_norm(w.detach(), dim=1) * (1 + 1e-5)).all()
    else:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        bound = float(record.threshold) * (1 + 1e-5)
        assert (
            float(total if method != "per_parameter" else max(torch.linalg.vector_norm(p.grad) for p in params))
            <= bound
        )
