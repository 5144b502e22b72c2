"""The replay names the module that *produced* a fault, not the ones that passed it on, and leaves legitimate
infinities (attention masks) alone."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_gradguard.core.recover._fault_trace import first_nonfinite_module, trace_fault


class Sqrt(nn.Module):
    """Finite weights, finite input, NaN output: the square root of a negative number."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x - 10.0)


class Block(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.after = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.inner(x))


def test_a_nan_made_by_a_and_passed_through_b_names_a() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), Block(Sqrt()), nn.Tanh(), nn.Linear(4, 1))
    trace = trace_fault(net, lambda: net(torch.randn(3, 4)))
    assert (trace.producer, trace.kind, trace.reproduced) == ("1.inner", "nan", True)
    # B = "1.after", "2" and "3" only received it: propagators
    assert first_nonfinite_module(net, lambda: net(torch.randn(3, 4))) == "1.inner"


def test_a_nan_fed_in_by_the_batch_has_no_producing_module() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    trace = trace_fault(net, lambda: net(torch.full((2, 3), math.nan)))
    assert trace.producer is None
    assert trace.first_nonfinite == "0"  # the first propagator, which the old replay would have blamed


def test_an_overflow_that_a_later_layer_turns_into_nan_names_the_overflow() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    with torch.no_grad():
        net[1].weight.fill_(3e38)  # finite weights whose products overflow to inf
    trace = trace_fault(net, lambda: net(torch.ones(2, 4)))
    assert (trace.producer, trace.kind) == ("1", "nan")  # LayerNorm made the NaN out of "1"'s infinities


def test_a_finite_replay_reproduces_nothing() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    trace = trace_fault(net, lambda: net(torch.ones(2, 3)))
    assert (trace.producer, trace.first_nonfinite, trace.reproduced) == (None, None, False)


class MaskedAttention(nn.Module):
    """Scores masked with -inf by a module of their own (so the mask's infinities are a module output), then a
    softmax module that turns them into zeros."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.mask = CausalMask()
        self.softmax = nn.Softmax(dim=-1)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = self.mask(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        return self.out(self.softmax(scores) @ v)


class CausalMask(nn.Module):
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        n = scores.shape[-1]
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        return scores.masked_fill(future, float("-inf"))


def test_minus_inf_attention_masks_are_never_the_producer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(MaskedAttention(), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(2, 5, 8)
    healthy = trace_fault(net, lambda: net(x))
    assert healthy.producer is None  # the mask's -inf was absorbed by the softmax: nothing to blame
    assert healthy.first_nonfinite == "0.mask"  # (a module output did hold -inf)
    with torch.no_grad():
        net[2].weight[0, 3] = math.nan  # a real fault after the attention
    faulty = trace_fault(net, lambda: net(x))
    assert (faulty.producer, faulty.kind) == ("2", "nan")


def test_torch_transformer_with_a_float_mask_is_not_blamed() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True, dropout=0.0)
    head = nn.Linear(8, 1)
    net = nn.ModuleDict({"enc": layer, "head": head})
    mask = nn.Transformer.generate_square_subsequent_mask(6)  # 0 and -inf
    x = torch.randn(3, 6, 8)

    def run() -> torch.Tensor:
        return net["head"](net["enc"](x, src_mask=mask, is_causal=True))

    assert trace_fault(net, run).producer is None
    with torch.no_grad():
        head.bias.fill_(math.inf)
    assert (trace_fault(net, run).producer, trace_fault(net, run).kind) == ("head", "inf")
