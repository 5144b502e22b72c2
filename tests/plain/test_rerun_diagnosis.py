"""GradGuard's rerun diagnosis: the loop gives ``recompute`` (the step's loss once more) to ``before_step``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard import GradGuard
from tests.models import loader

FAULT = 9


def fit(fault: str, recompute: bool = True) -> GradGuard:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradGuard(model, opt, snapshot_every_n_steps=4, snapshot_confirm_steps=2)
    flipped = []

    def flip(_mod, _inp, out):  # a one-off corruption of a layer's output (once, in the step's own forward)
        if fault == "flip" and guard.step == FAULT and not flipped:
            flipped.append(1)
            return out * math.nan
        return out

    model[0].register_forward_hook(flip)
    step = 0
    for _ in range(4):
        for x, y in loader(n=64):
            if fault == "nan_batch" and step == FAULT:
                x = x.clone()
                x[0, 0] = math.nan
            if fault == "weight_big" and step == FAULT:
                with torch.no_grad():
                    model[2].weight.mul_(1e38)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            again = (lambda x=x, y=y: nn.functional.mse_loss(model(x), y)) if recompute else None
            if guard.before_step(loss, recompute=again):
                opt.step()
            guard.after_step()
            opt.zero_grad()
            step += 1
    return guard


@pytest.mark.parametrize(
    ("fault", "diagnosis", "kind"),
    [("flip", "transient", "skip"), ("nan_batch", "data", "skip"), ("weight_big", "state", "rollback")],
)
def test_each_fault_gets_its_diagnosis(fault: str, diagnosis: str, kind: str) -> None:
    guard = fit(fault)
    assert [(e["step"], e["kind"], e.get("diagnosis")) for e in guard.events] == [(FAULT, kind, diagnosis)]
    assert guard.lr_scale == 1.0
    if fault == "nan_batch":  # the loop gives no batch: the rerun from the trusted state tells the data apart
        assert "the same batch fails from the trusted state of step 4 too" in guard.events[0]["diagnosis_evidence"]


def test_without_recompute_there_is_no_diagnosis() -> None:
    guard = fit("flip", recompute=False)
    assert [(e["kind"], e.get("diagnosis")) for e in guard.events] == [("skip", None)]
