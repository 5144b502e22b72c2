"""An LR spike of a few steps set by hand (x100 for steps 120-124 of a OneCycle schedule) throws a digits MLP off:
the loss jumps 100x, then sits ~6x above where it was. The windows' median LR never moved, so the climb rules said
"the learning rate did not grow: warning only" and the run ended at 0.40 accuracy instead of 0.95. The climb's LR is
now the highest LR of its two windows when that is higher than their median: the spike is seen, the run is rolled back
to before the climb and ends where the run without the spike ends (issue 24)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_gradguard import GradGuard


def _fit(spike: bool, guarded: bool) -> tuple[float, GradGuard | None]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    x, y = x[order], y[order]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1000)
    batches = [p[i : i + 32] for p in (torch.randperm(1400, generator=g) for _ in range(6)) for i in range(0, 1376, 32)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=len(batches))
    guard = GradGuard(model, opt, sched, announce=False) if guarded else None
    for i, idx in enumerate(batches):
        if spike and 120 <= i <= 124:
            for group in opt.param_groups:
                group["lr"] *= 100  # the schedule set it at the last step; x100 by hand
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        if guard is None or guard.before_step(loss):
            opt.step()
        sched.step()
        if guard is not None:
            guard.after_step()
        opt.zero_grad()
    if guard is not None:
        guard.close()
    with torch.no_grad():
        return float((model(x[1400:]).argmax(1) == y[1400:]).float().mean()), guard


def test_a_short_lr_spike_is_seen_and_rolled_back():
    clean, _ = _fit(spike=False, guarded=False)
    thrown, _ = _fit(spike=True, guarded=False)
    assert thrown < 0.5 < clean  # the case itself
    accuracy, guard = _fit(spike=True, guarded=True)
    assert guard is not None
    acts = [e for e in guard.events if e["kind"] != "warn"]
    assert [(e["kind"], e["cause"]) for e in acts] == [("rollback", "lr_too_high")]
    assert "the learning rate peaked at" in acts[0]["reason"]
    assert acts[0]["snapshot_step"] < 120
    assert accuracy > clean - 0.03
