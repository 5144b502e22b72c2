"""The shared LR rules of a recovery (core/recovery_rules.py), checked against hand-computed LRs."""

from __future__ import annotations

import pytest
import torch

from lightning_gradguard.core.recovery_rules import lower_lr, rollback_lr, rollback_lr_factor


def _opt_and_sched(lr: float = 1.0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=lr)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


@pytest.mark.parametrize(
    ("scale", "snap_scale", "power", "expected"),
    [(1.0, 1.0, 1, 0.5), (0.5, 1.0, 1, 0.25), (0.5, 1.0, 2, 0.125), (0.25, 1.0, 4, 0.25 / 16), (0.5, 0.25, 1, 1.0)],
)
def test_rollback_factor_cuts_the_pre_rollback_lr_and_never_raises_it(scale, snap_scale, power, expected):
    assert rollback_lr_factor(scale, snap_scale, 0.5, power) == pytest.approx(expected)


def test_rollback_lr_scales_restored_optimizer_and_scheduler_and_returns_the_new_scale():
    opt, sched = _opt_and_sched(lr=0.8)  # the restored snapshot's LR, taken at lr_scale 1
    new_scale = rollback_lr([opt], [sched], lr_scale=0.5, snapshot_lr_scale=1.0, lr_factor=0.5, lr_power=2)
    assert new_scale == pytest.approx(0.125)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8 * 0.125)
    opt.step()
    sched.step()  # the scheduler's later LRs carry the cut too
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8 * 0.125 * 0.5)


def test_lower_lr_multiplies_the_current_lr_and_the_scale():
    opt, sched = _opt_and_sched(lr=2.0)
    assert lower_lr([opt], [sched], lr_scale=0.5, lr_factor=0.5) == pytest.approx(0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    assert sched.base_lrs == [pytest.approx(1.0)]
