"""A rerun (of a flagged step, or of a finding checked before it acts) calls the user's ``training_step`` again: what
that step changes in its module must be as it was afterwards, or a run the guard only checked is still changed."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_gradguard import NaNGuard
from tests.models import TinyRegression, loader, make_trainer


class _CountingStep(TinyRegression):
    """A step with side effects: a counter, a list it appends to, its own generator, an in-place update of a
    parameter that no optimizer steps (a target network's Polyak average)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls, self.batches, self.drawn = 0, 0, []
        self.noise = torch.Generator().manual_seed(11)
        self.target = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def on_train_batch_start(self, batch, batch_idx):  # Lightning's own count of the steps it ran
        self.batches += 1

    def training_step(self, batch, batch_idx):
        self.calls += 1
        self.drawn.append(float(torch.rand(1, generator=self.noise)) + random.random())
        with torch.no_grad():
            self.target.add_(1.0)
        return super().training_step(batch, batch_idx)


def test_reruns_leave_no_trace_of_the_users_step(tmp_path):
    model = _CountingStep(nan_at_steps=(6, 12))
    guard = NaNGuard()
    make_trainer(tmp_path, [guard], max_steps=16, logger=False).fit(model, loader())
    reruns = [e for e in guard.events if "rerun from the same state" in str(e.get("diagnosis_evidence", ""))]
    assert len(reruns) == 2  # both NaN steps were rerun: training_step ran again for each
    assert model.batches == 16
    assert model.calls == 16
    assert len(model.drawn) == 16
    assert float(model.target) == 16.0
    fresh = torch.Generator().manual_seed(11)
    torch.rand(16, generator=fresh)
    assert torch.equal(model.noise.get_state(), fresh.get_state())


class _CarriedState(TinyRegression):
    """A state carried across steps in a plain attribute (as truncated BPTT carries its hidden state): a rollback
    restores the weights, not this; a NaN weight at ``bad_step`` leaves it NaN for good."""

    def __init__(self, bad_step: int):
        super().__init__(lr=0.01)
        self.bad_step = bad_step
        self.carried = torch.zeros(1)

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == self.bad_step:
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x) + self.carried
        self.carried = 0.5 * self.carried + 0.01 * out.detach().mean()
        return torch.nn.functional.mse_loss(out, y)


def test_a_fault_in_state_no_snapshot_holds_halts_with_that_diagnosis(tmp_path):
    """Before, every later step was skipped as "a fault of the data" (the batch fails from the trusted state too)
    for the rest of the run. The module carries NaN in a plain tensor attribute no snapshot holds: the batch is not
    at fault, no rollback can repair it; the guard halts at once, names the attribute, and does not blame the LR."""
    from lightning_gradguard import DivergenceError

    guard = NaNGuard(snapshot_every_n_steps=5, snapshot_confirm_steps=2)
    trainer = make_trainer(tmp_path, [guard], max_steps=40, logger=False)
    with pytest.raises(DivergenceError, match="no snapshot holds"):
        trainer.fit(_CarriedState(bad_step=20), loader(n=256))
    kinds = [(e["step"], e["kind"]) for e in guard.events]
    assert kinds == [(20, "rollback"), (21, "halt")]
    assert guard.events[-1]["diagnosis"] == "unrestorable"
    assert "carried" in guard.events[-1]["diagnosis_evidence"]
    assert "learning rate" not in guard.events[-1]["reason"]
