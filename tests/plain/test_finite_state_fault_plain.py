"""The plain loop takes the same batch test of a held far loss level as the Trainer (one engine; its rerun is the
loop's ``recompute`` callable): eight rows of a layer scaled x1000 in place at step 200 (a flipped exponent bit) are
rolled back once, at the schedule's LR (a sudden divergence out of calm steps). Without ``recompute`` nothing can be
rerun and the held level is adopted, as before the test (warnings only)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lightning_gradguard import GradGuard
from tests.callbacks.test_finite_state_fault import DigitsMLP

ACTIONS = ("skip", "rollback", "halt", "lower_lr", "restart")


def _loop(with_recompute: bool, steps: int = 300) -> tuple[GradGuard, DigitsMLP]:
    model = DigitsMLP(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    guard = GradGuard(model, opt, raise_on_halt=False)
    batches = iter(model.train_dataloader())
    for step in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(model.train_dataloader())
            x, y = next(batches)
        if step == 200:
            with torch.no_grad():
                model.net[2].weight[:8].mul_(1000.0)

        def loss_fn(x=x, y=y):  # noqa: ANN202
            return F.cross_entropy(model.net(x), y)

        loss = loss_fn()
        loss.backward()
        if guard.before_step(loss, recompute=loss_fn if with_recompute else None):
            opt.step()
        guard.after_step()
        opt.zero_grad()
    guard.close()
    return guard, model


def test_plain_loop_tests_a_held_level_on_the_batch() -> None:
    guard, model = _loop(with_recompute=True)
    acts = [e for e in guard.events if e["kind"] in ACTIONS]
    assert [e["kind"] for e in acts] == ["rollback"], guard.events
    assert "the model blew up, not the data" in acts[0]["reason"]
    assert guard.lr_scale == 1.0
    assert model.accuracy() > 0.9
    old, _ = _loop(with_recompute=False)
    assert not [e for e in old.events if e["kind"] in ACTIONS], old.events  # nothing to test with: adopted
