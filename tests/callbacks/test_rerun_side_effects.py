"""A rerun (of a flagged step, or of a finding checked before it acts) calls the user's ``training_step`` again: what
that step changes in its module must be as it was afterwards, or a run the guard only checked is still changed."""

from __future__ import annotations

import random

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
