"""GradStats against independent references (torch.linalg.vector_norm on concatenated gradients)."""

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.core.grad_stats import compute_grad_stats, layer_name_of, norms_of
from lightning_gradguard.core.step_cache import StepStatsCache


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


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_sharded_norms_reduced_before_root(p):
    """FSDP-style: two ranks hold halves of each parameter; reduce combines p-th powers (or maxima) across them."""
    torch.manual_seed(3)
    full = [torch.randn(10), torch.randn(6, 4)]
    shards = [[g.flatten()[: g.numel() // 2] for g in full], [g.flatten()[g.numel() // 2 :] for g in full]]
    per_rank = []
    for rank in range(2):
        ps = [nn.Parameter(torch.zeros_like(s)) for s in shards[rank]]
        for q, s in zip(ps, shards[rank]):
            q.grad = s.clone()
        per_rank.append(ps)
    local = [norms_of([q.grad for q in ps], p) for ps in per_rank]

    def reduce(t, op):  # stands in for an all-reduce across the two ranks
        others = [x.pow(p) if op == "sum" else x for x in local]
        return torch.stack(others).sum(0) if op == "sum" else torch.stack(others).amax(0)

    s = compute_grad_stats(per_rank[0], ["a.w", "b.w"], p, reduce=reduce)
    assert _close(s.total_norm, _ref_total(full, p))
    assert _close(s.param_norms[1], torch.linalg.vector_norm(full[1], p))


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
    assert cache.peek("opt", 5) is None
