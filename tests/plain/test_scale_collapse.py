"""fp16 loss-scale collapse (issue 27): GradScaler overflow steps in a row (the scale halved at each, no update got
through) are a collapse, handled as one; scattered overflows are the scaler's business."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_gradguard import GradGuard
from tests.models import loader


def run(inf_steps: set[int], steps: int = 60, **kwargs) -> tuple[GradGuard, list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    guard = GradGuard(model, opt, scaler=scaler, raise_on_halt=False, snapshot_every_n_steps=5, **kwargs)
    current = {"step": 0}
    model[0].weight.register_hook(lambda g: g * math.inf if current["step"] in inf_steps else g)
    scales = []
    step = 0
    while step < steps:
        for x, y in loader(n=64):
            if step >= steps:
                break
            current["step"] = step
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if guard.before_step(loss):
                scaler.step(opt)
            scaler.update()
            guard.after_step()
            opt.zero_grad()
            scales.append(float(scaler.get_scale()))
            step += 1
    return guard, scales


def test_overflows_in_a_row_are_a_collapse_rolled_back_with_a_cut() -> None:
    guard, scales = run(set(range(10, 60)))
    first = guard.events[0]
    assert (first["step"], first["kind"], first["cause"]) == (10 + 23, "rollback", "amp_scale_collapse")
    assert "the loss scale collapsed" in first["reason"]
    assert scales[10 + 22] == 2.0**16 / 2**23  # it halved at every one of those steps
    assert guard.lr_scale < 1.0


def test_scattered_overflows_are_the_scalers_business() -> None:
    guard, _ = run({5, 6, 7, 20, 21, 40})
    assert guard.events == []
    assert guard.amp_overflow_steps == 6


def test_the_number_of_halvings_is_an_option() -> None:
    guard, _ = run(set(range(10, 20)), amp_max_halvings=5)
    assert [(e["step"], e["cause"]) for e in guard.events][:1] == [(14, "amp_scale_collapse")]
    off, _ = run(set(range(10, 40)), amp_max_halvings=None)
    assert off.events == []
