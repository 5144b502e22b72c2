"""The plain loop takes the same test of a thin-reference divergence as the Trainer (one engine): its rerun is the
loop's ``recompute`` callable. The bucketed first epoch of ``tests/callbacks/test_thin_reference.py`` (a first single
item already fitted, then ordinary summed losses) trains without a rollback; without ``recompute`` nothing can be
rerun and the one-batch verdict stands (the behaviour before the test)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lightning_gradguard import GradGuard
from tests.callbacks.test_thin_reference import SortedBagRegression


def _loop(with_recompute: bool, steps: int = 60) -> GradGuard:
    torch.manual_seed(0)
    model = SortedBagRegression(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = GradGuard(model, opt, raise_on_halt=False)
    for step, (x, y) in enumerate(model.train_dataloader()):
        if step == steps or guard.halted:
            break

        def loss_fn(x=x, y=y):
            return F.mse_loss(model.net(x).squeeze(-1), y, reduction="sum")

        loss = loss_fn()
        loss.backward()
        if guard.before_step(loss, recompute=loss_fn if with_recompute else None):
            opt.step()
        guard.after_step()
        opt.zero_grad()
    guard.close()
    return guard


def test_plain_loop_tests_a_thin_verdict_on_the_batch() -> None:
    guard = _loop(with_recompute=True)
    assert [e for e in guard.events if e["kind"] != "warn"] == []
    old = _loop(with_recompute=False)
    assert any(e["kind"] in ("rollback", "halt") for e in old.events)
