"""GradStats against independent references (torch.linalg.vector_norm on concatenated gradients)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradguard.core.measure._grad_stats import (
    GradStats,
    compute_grad_stats,
    float32_value,
    layer_name_of,
    norms_of,
    vanished_share,
)
from lightning_gradguard.core.measure._step_cache import StepStatsCache


@pytest.fixture(autouse=True, params=[True, False], ids=["host_fast_path", "general_path"])
def measure_path(request, monkeypatch):
    """Every test runs on the CPU fast path of compute_grad_stats and on the general path accelerators use."""
    monkeypatch.setattr(GradStats, "host_fast_path", request.param)
    return request.param


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))
    m(torch.randn(11, 5)).pow(2).sum().backward()
    return m


def _ref_total(grads, p):
    return torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads]), p)


def _close(a, b, rel=1e-6):
    a, b = float(a), float(b)
    return abs(a - b) <= rel * max(abs(b), 1e-30)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_total_and_param_norms_match_reference(p):
    m = _model()
    names, params = zip(*m.named_parameters())
    s = compute_grad_stats(params, names, p)
    assert _close(s.total_norm, _ref_total([q.grad for q in params], p))
    for q, n in zip(params, s.param_norms):
        assert _close(n, torch.linalg.vector_norm(q.grad.double(), p))
    assert s.total_norm.dtype == torch.float32


def test_none_grads_are_skipped():
    m = _model()
    m[2].weight.grad = None
    m[4].bias.grad = None
    names, params = zip(*m.named_parameters())
    s = compute_grad_stats(params, names)
    assert s.names == ["0.weight", "0.bias", "2.bias", "4.weight"]
    ref = _ref_total([q.grad for q in params if q.grad is not None], 2)
    assert _close(s.total_norm, ref)


def test_no_grads_at_all_gives_zero_norm():
    m = nn.Linear(2, 2)
    s = compute_grad_stats(list(m.parameters()))
    assert s.names == []
    assert float(s.total_norm) == 0.0
    assert bool(s.all_finite)


def test_bf16_and_fp16_grads_reduced_in_fp32():
    torch.manual_seed(1)
    params = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        p = nn.Parameter(torch.zeros(300, dtype=dtype))
        p.grad = (torch.randn(300) * 40).to(dtype)
        params.append(p)
    s = compute_grad_stats(params)
    assert s.param_norms.dtype == torch.float32
    # reference: the same low-precision values, summed in float64
    assert _close(s.total_norm, _ref_total([q.grad for q in params], 2))
    # a bf16 sum of squares would overflow/round badly: values of 3e4 squared exceed fp16's range
    big = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    big.grad = torch.full((4,), 3e4, dtype=torch.float16)
    assert _close(compute_grad_stats([big]).total_norm, 6e4)


def test_nan_in_one_parameter_is_reported_on_it():
    m = _model()
    m[2].weight.grad[1, 2] = float("nan")
    m[4].bias.grad[0] = float("inf")
    names, params = zip(*m.named_parameters())
    s = compute_grad_stats(params, names)
    assert not bool(s.all_finite)
    assert s.nonfinite_names() == ["2.weight", "4.bias"]
    assert s.finite.tolist() == [True, True, False, True, True, False]
    assert math.isnan(float(s.total_norm))


def test_layer_norms_group_by_owning_module():
    m = _model()
    names, params = zip(*m.named_parameters())
    s = compute_grad_stats(params, names)
    assert s.layer_names == ["0", "2", "4"]
    for i, layer in enumerate([m[0], m[2], m[4]]):
        grads = [layer.weight.grad, layer.bias.grad]
        weights = [layer.weight.detach(), layer.bias.detach()]
        assert _close(s.layer_norms[i], _ref_total(grads, 2))
        assert _close(s.layer_weight_norms[i], _ref_total(weights, 2))
        assert _close(s.layer_update_ratio[i], _ref_total(grads, 2) / _ref_total(weights, 2), 1e-5)


def test_layer_norms_inf():
    m = _model()
    names, params = zip(*m.named_parameters())
    s = compute_grad_stats(params, names, math.inf)
    assert _close(s.layer_norms[1], torch.cat([m[2].weight.grad.flatten(), m[2].bias.grad]).abs().max())


def test_layer_name_of():
    assert layer_name_of("encoder.layers.0.weight") == "encoder.layers.0"
    assert layer_name_of("scale") == "scale"


def test_sparse_gradients_rejected_with_clear_error():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        compute_grad_stats([emb.weight], ["emb.weight"])


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_norm_type(bad):
    with pytest.raises(ValueError, match="norm_type"):
        compute_grad_stats([nn.Parameter(torch.ones(1))], norm_type=bad)


def test_names_length_checked():
    with pytest.raises(ValueError, match="one entry per parameter"):
        compute_grad_stats([nn.Parameter(torch.ones(1))], ["a", "b"])


def test_mixed_dtypes_keep_order():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    c = nn.Parameter(torch.zeros(1))
    a.grad, b.grad, c.grad = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([3.0, 4.0], dtype=torch.float64), torch.ones(1)
    assert norms_of([a.grad, b.grad, c.grad]).tolist() == [3.0, 5.0, 1.0]


def test_step_cache_computes_once_per_step():
    cache = StepStatsCache()
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    calls = []

    def compute():
        calls.append(1)
        return compute_grad_stats([p])

    a = cache.get("opt", 5, compute)
    b = cache.get("opt", 5, compute)
    assert a is b
    assert cache.computations == 1
    cache.get("other", 5, compute)
    cache.get("opt", 6, compute)
    assert cache.computations == 3


# ---------------------------------------------------------------- norms that cannot overflow (issue 15)


def _fsum_norm(values, p=2.0):
    """Independent reference: the p-norm of Python floats by math.fsum, scaled by the largest magnitude."""
    mags = [abs(complex(v)) for v in values]
    top = max(mags, default=0.0)
    if top == 0.0:
        return 0.0
    if p == math.inf:
        return top
    return top * math.fsum((m / top) ** p for m in mags) ** (1.0 / p)


def _param(values, dtype=torch.float32):
    p = nn.Parameter(torch.zeros(len(values), dtype=dtype))
    p.grad = torch.tensor(values, dtype=torch.float64).to(dtype)
    return p


def _values(p):
    return p.grad.to(torch.complex128 if p.grad.is_complex() else torch.float64).flatten().tolist()


_DEVICES = [
    "cpu",  # the accelerator path (a float64 accumulator in the multi-tensor kernel) needs a GPU machine to run
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 8.0, math.inf])
def test_finite_gradient_whose_float32_sum_of_squares_overflows_gets_a_finite_norm(dtype, p, device):
    # every element finite (1e30 fits float32 and bf16), but 1e30 ** 2 alone exceeds float32's range
    params = [_param([1e30, -2e30, 3e30], dtype), _param([4e25, 5.0], dtype), _param([1e-3, 0.0], dtype)]
    for q in params:
        q.data, q.grad = q.data.to(device), q.grad.to(device)
    s = compute_grad_stats(params, ["a.w", "a.b", "c.w"], p)
    ref = [_fsum_norm(_values(q), p) for q in params]
    ref_total = _fsum_norm([v for q in params for v in _values(q)], p)
    assert bool(s.all_finite)
    assert not bool(s.norm_overflow)
    assert s.finite.tolist() == [True, True, True]
    assert torch.isfinite(s.total_norm)
    assert torch.isfinite(s.layer_norms).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # float32 kernels round each per-tensor norm
    assert _close(s.total_norm64, ref_total, tol)
    assert _close(s.total_norm, ref_total, 1e-6)
    for got, want in zip(s.param_norms64.tolist(), ref):
        assert _close(got, want, tol)
    assert _close(s.layer_norms[0], _fsum_norm(_values(params[0]) + _values(params[1]), p), 1e-6)


def test_many_tensors_each_below_but_together_above_the_float32_square_range():
    params = [_param([1.5e19] * 4) for _ in range(3)]  # each norm 3e19: its float32 square overflows
    s = compute_grad_stats(params)
    assert _close(s.total_norm, _fsum_norm([1.5e19] * 12), 1e-6)


def test_norm_beyond_float32_range_is_an_overflow_not_a_nonfinite_gradient():
    big = _param([3e38, 3e38, -3e38, 3e38])  # finite float32 elements, true norm ~6e38
    s = compute_grad_stats([big])
    assert bool(s.all_finite)
    assert s.finite.tolist() == [True]
    assert s.nonfinite_names() == []
    assert bool(s.norm_overflow)
    assert math.isinf(float(s.total_norm))
    assert _close(s.total_norm64, _fsum_norm(_values(big)), 1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_elements_are_not_an_overflow(bad):
    s = compute_grad_stats([_param([1.0, bad]), _param([3e30, 4e30])], ["a", "b"])
    assert not bool(s.all_finite)
    assert not bool(s.norm_overflow)
    assert s.nonfinite_names() == ["a"]
    assert _close(s.param_norms[1], 5e30, 1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_complex_gradients_measured_as_complex_norms(p):
    torch.manual_seed(4)
    z = nn.Parameter(torch.zeros(7, dtype=torch.complex64))
    z.grad = torch.randn(7, dtype=torch.complex64)
    r = _param([1.0, -2.0])
    s = compute_grad_stats([z, r], ["z", "r"], p)
    values = z.grad.to(torch.complex128).tolist()
    assert _close(s.param_norms[0], _fsum_norm(values, p), 1e-6)
    assert _close(s.total_norm, _fsum_norm(values + [1.0, -2.0], p), 1e-6)
    assert bool(s.all_finite)


def test_norms_of_float64_output_and_overflow_repair():
    g = torch.full((5,), 1e25)  # float32 sum of squares overflows
    assert _close(norms_of([g])[0], _fsum_norm([1e25] * 5), 1e-6)
    assert norms_of([g], dtype=torch.float64).dtype == torch.float64
    assert norms_of([torch.tensor([math.nan]), g]).isfinite().tolist() == [False, True]


_FUZZ_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@given(
    exps=st.lists(st.lists(st.floats(-30, 30), min_size=1, max_size=40), min_size=1, max_size=6),
    signs=st.integers(0, 2**31),
    dtype_idx=st.integers(0, len(_FUZZ_DTYPES) - 1),
    p=st.sampled_from([1.0, 2.0, 3.0, math.inf]),
)
@settings(max_examples=150, deadline=None, derandomize=True)
def test_fuzz_finite_gradients_of_any_magnitude_get_finite_exact_norms(exps, signs, dtype_idx, p):
    dtype = _FUZZ_DTYPES[dtype_idx]
    top = torch.finfo(dtype).max
    params = []
    for k, row in enumerate(exps):
        vals = [(-1) ** ((signs >> (i + k) % 31) & 1) * min(10.0**e, top) for i, e in enumerate(row)]
        params.append(_param(vals, dtype))
    s = compute_grad_stats(params, norm_type=p)
    flat = [v for q in params for v in _values(q)]  # the values as stored in dtype
    assert bool(s.all_finite)
    assert math.isfinite(float(s.total_norm64))
    ref = _fsum_norm(flat, p)
    if dtype != torch.float64 and p != math.inf and ref < 1e-18:
        # documented limit: float32 squares of elements below ~1e-19 underflow, as in torch's own norms
        assert 0.0 <= float(s.total_norm64) <= ref * (1 + 1e-5)
        return
    assert _close(s.total_norm64, ref, 1e-12 if dtype == torch.float64 else 1e-5)
    if ref < 3e38:
        assert not bool(s.norm_overflow)
        assert _close(s.total_norm, _fsum_norm(flat, p), 1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_empty_tensors_have_norm_zero(p):
    """Uneven sharding leaves some ranks an empty piece of a parameter; torch refuses an empty tensor's inf-norm."""
    empty = nn.Parameter(torch.zeros(0, 4))
    empty.grad = torch.zeros(0, 4)
    full = _param([3.0, -4.0])
    s = compute_grad_stats([empty, full], ["a.w", "b.w"], p)
    assert s.param_norms.tolist() == [0.0, _fsum_norm([3.0, -4.0], p)]
    assert norms_of([empty.grad], p).tolist() == [0.0]


def test_gradients_of_a_create_graph_backward_are_measured_and_clipped_outside_the_graph():
    """After ``backward(create_graph=True)`` the gradients carry a graph: the statistics hold detached views (same
    storage), so clipping them in place neither fails nor records into that graph."""
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    (w.pow(3).sum()).backward(create_graph=True)
    assert w.grad.requires_grad
    stats = compute_grad_stats([w], ["w"])
    torch.testing.assert_close(stats.total_norm64, torch.linalg.vector_norm(w.grad.detach().double()))
    assert not stats.grads[0].requires_grad
    assert stats.grads[0].data_ptr() == w.grad.data_ptr()
    stats.local_grads[0].mul_(0.5)  # what a clipper does
    torch.testing.assert_close(w.grad.detach(), torch.tensor([13.5, 24.0]))


def test_local_grads_are_the_gradients_themselves_when_not_sharded():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m(torch.randn(5, 3)).sum().backward()
    m[1].bias.grad = None
    stats = compute_grad_stats(list(m.parameters()))
    assert stats.names == ["param_0", "param_1", "param_2"]  # the default names keep the original positions
    assert all(a is b for a, b in zip(stats.local_grads, [p.grad for p in m.parameters() if p.grad is not None]))


_ALIKE = ["param_norms64", "param_norms", "total_norm64", "total_norm", "finite", "all_finite", "norm_overflow"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, math.inf])
@pytest.mark.parametrize(
    "case", ["random", "overflow", "beyond_float32", "nan", "inf", "nan_and_overflow", "zeros", "many_small"]
)
def test_fast_and_general_paths_give_identical_statistics(dtype, p, case):
    """Bit for bit: the fast path only skips tensor operations, it computes nothing differently."""
    g = torch.Generator().manual_seed(7)
    shapes = [(40,)] * 300 if case == "many_small" else [(17, 5), (5,), (3, 3, 2), (1,)]
    grads = [torch.randn(sh, generator=g) * 10.0 ** torch.randint(-3, 4, (), generator=g) for sh in shapes]
    top = torch.finfo(dtype).max
    if case == "overflow":
        grads[0][:4] = min(1e30, top / 2)  # finite elements, a float32 (or fp16) sum of squares overflows
    elif case == "beyond_float32":
        grads[2][:] = min(3e38, top)
    elif case in ("nan", "inf"):
        grads[1][2] = math.nan if case == "nan" else math.inf
    elif case == "nan_and_overflow":
        grads[0][:4], grads[3][0] = min(1e30, top / 2), math.nan
    elif case == "zeros":
        grads = [torch.zeros_like(t) for t in grads]
    params = []
    for t in grads:
        q = nn.Parameter(torch.zeros(t.shape, dtype=dtype))
        q.grad = t.to(dtype)
        params.append(q)
    names = [f"m{i // 2}.w{i % 2}" for i in range(len(params))]
    got = {}
    for fast in (True, False):
        GradStats.host_fast_path = fast
        try:
            s = compute_grad_stats(params, names, p)
        finally:
            GradStats.host_fast_path = True
        got[fast] = {k: getattr(s, k) for k in _ALIKE} | {
            "layer_norms": s.layer_norms,
            "nonfinite": s.nonfinite_names(),
        }
    for k, v in got[False].items():
        w = got[True][k]
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(w, v, rtol=0, atol=0, equal_nan=True, msg=k)
        else:
            assert w == v, k


def test_float32_value_rounds_as_the_tensor_conversion_does():
    import random
    import struct

    rng = random.Random(0)
    top = torch.finfo(torch.float32).max
    half_ulp = 2.0**103  # half of float32's spacing at its largest value: the rounding boundary to inf
    values = [0.0, -0.0, math.inf, -math.inf, top, -top, top + half_ulp, top + half_ulp - 2.0**80, -(top + half_ulp)]
    values += [2.0**-149, 2.0**-150, 3 * 2.0**-151, 1e-46, 1e300, 5e-324, 0.1, 1 / 3]
    values += [rng.choice((1, -1)) * rng.random() * 10 ** rng.uniform(-320, 300) for _ in range(20000)]
    values += [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(20000)]
    want = torch.tensor(values, dtype=torch.float64).to(torch.float32).tolist()
    for v, w in zip(values, want):
        got = float32_value(v)
        assert repr(got) == repr(w), v  # repr: NaN alike, and the sign of zero
    assert math.isnan(float32_value(math.nan))


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1.0, 1e20, 1e30, 3e38])
def test_total_norm_host_is_the_float32_total(scale):
    p = _param([scale, -2 * scale, 0.5 * scale])
    s = compute_grad_stats([p])
    assert repr(s.total_norm_host) == repr(float(s.total_norm))
    assert repr(s.total_norm64_host) == repr(s.total_norm64.item())
    bad = compute_grad_stats([_param([1.0, math.nan])])
    assert math.isnan(bad.total_norm_host)


# ---------------------------------------------------------------- vanished_share (the dead-network rule's confirmation)
def _stats_of(grads):
    params = [torch.zeros(len(g), requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=torch.float32)
    return compute_grad_stats(params)


def test_vanished_share_counts_tensors_at_or_below_epsilon_times_the_largest():
    eps = float(torch.finfo(torch.float32).eps)
    grads = [[0.0, 0.0], [3.0, 4.0], [5.0 * eps * 0.5], [5.0 * eps * 4.0], [1e-3]]  # largest tensor norm: 5
    # by hand: the zero tensor and the one at half of eps x 5 vanished; 4 x eps x 5 and 1e-3 did not
    assert vanished_share([_stats_of(grads)]) == pytest.approx(2 / 5)


def test_vanished_share_pools_optimizers_and_handles_all_zero_and_non_finite():
    a, b = _stats_of([[0.0], [0.0, 0.0]]), _stats_of([[2.0], [0.0]])
    assert vanished_share([a]) == 1.0  # every gradient exactly zero: all vanished
    assert vanished_share([a, b]) == pytest.approx(3 / 4)
    assert vanished_share([_stats_of([[1.0], [float("nan")]])]) is None
    assert vanished_share([]) is None
