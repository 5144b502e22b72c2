"""``gradguard/snapshot_mb`` and ``gradguard/snapshot_ms``: what this rank's in-memory snapshots cost."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import GradGuard


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """An independent count: every tensor of the model's and the optimizer's state dicts."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for state in opt.state_dict()["state"].values():
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def test_snapshot_mb_is_the_held_state_and_the_time_is_logged(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    writer = SummaryWriter(str(tmp_path))
    guard = GradGuard(model, opt, writer=writer, log_every_n_steps=10, snapshot_every_n_steps=5)
    for _ in range(41):
        x = torch.randn(16, 64)
        loss = model(x).pow(2).mean()
        loss.backward()
        if guard.before_step(loss):
            opt.step()
        guard.after_step()
        opt.zero_grad()
    one = state_bytes(model, opt)
    held = guard.engine.snapshot_bytes()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # the newest snapshot (weights + Adam moments) and the trusted start state (weights; no moments at step 0,
    # held once though both the store and the restart rule keep it); at most three full copies
    assert one + weights <= held <= 3 * one + 1024
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    mb = {e.step: e.value for e in acc.Scalars("gradguard/snapshot_mb")}
    assert mb[40] * 2**20 == pytest.approx(held, rel=1e-6)  # written as float32
    ms = {e.step: e.value for e in acc.Scalars("gradguard/snapshot_ms")}
    assert 0 < ms[40] < 10_000
