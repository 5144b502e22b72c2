"""The plain-loop guard on float16 weights with Adam's default eps: a warning when it is built, the cause in its
events (the check is the engine's, so ``GradGuard`` and ``NaNGuard`` say the same)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_gradguard import DivergenceError, GradGuard


def _loop(eps: float, steps: int = 20) -> tuple[GradGuard, nn.Module, list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=eps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = GradGuard(model, opt, raise_on_halt=True)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    try:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x.half()).float(), y)
            loss.backward()
            if guard.before_step(loss):
                opt.step()
            guard.after_step()
            opt.zero_grad()
    except DivergenceError:
        pass
    return guard, model, [str(w.message) for w in caught]


def test_grad_guard_warns_when_built_and_its_events_name_the_cause():
    guard, model, messages = _loop(1e-8)
    assert any("GradGuard" in m and "eps=1e-08 rounds to 0 in float16" in m for m in messages)
    faults = [e for e in guard.events if e["cause"].startswith("nonfinite")]
    assert faults
    assert all("possible cause" in e["reason"] for e in faults)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_safe_eps_trains_without_the_warning():
    guard, model, messages = _loop(1e-4)
    assert not any("rounds to 0" in m or "overflows float16" in m for m in messages)
    assert not guard.events
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
