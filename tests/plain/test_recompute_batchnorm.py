"""A plain loop that passes ``recompute=``: a NaN batch in a BatchNorm model is a skip with the buffers put back,
however often it comes. The guard's rerun of the step ran the model's forward after the window had closed, which
opened a new one and saved the buffers the bad batch had spoiled as the ones to restore: a rollback on
``nonfinite_buffers`` for each bad batch, and a halt at the fourth."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_gradguard import GradGuard


def _fit(bad_steps: set[int], steps: int = 200):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = GradGuard(model, opt, snapshot_every_n_steps=20, announce=False)
    g = torch.Generator().manual_seed(0)
    before_bad = {}
    for step in range(steps):
        x = torch.randn(32, 16, generator=g)
        y = x[:, :4].argmax(1)
        if step in bad_steps:
            x[0, 0] = math.nan
            before_bad[step] = {k: v.clone() for k, v in model.named_buffers()}
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if guard.before_step(loss, recompute=lambda x=x, y=y: nn.functional.cross_entropy(model(x), y)):
            opt.step()
        guard.after_step()
        opt.zero_grad()
        if step in bad_steps:
            after = dict(model.named_buffers())
            assert all(torch.equal(after[k], v) for k, v in before_bad[step].items()), step
    guard.close()
    return guard


def test_nan_batches_in_a_batchnorm_model_are_skips_with_the_buffers_put_back():
    bad = {60, 100, 130, 160, 190}  # more than max_rollbacks: each one rolled back would halt the run
    guard = _fit(bad)
    assert [(e["step"], e["kind"]) for e in guard.events] == [(s, "skip") for s in sorted(bad)]
    assert all(e["diagnosis"] == "data" for e in guard.events)
    assert not guard.halted
