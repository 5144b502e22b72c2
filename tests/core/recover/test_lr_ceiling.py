"""The LR ceiling: after a climb that came with the LR's growth, the schedule that raised the LR may not raise it
past the best window's LR again.

Unit checks of :class:`LRCeiling` against hand-computed caps, and a plain-loop fit with a runaway LR ramp (a warm-up
misconfigured to grow 5 % per step up to 1000x): the guard's climb rule rolls back, and from then on every update
uses at most the best window's LR (read in an optimizer step pre-hook), the event says so, the fit ends far better
than the same ramp unguarded, and the ceiling travels with the guard's state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_gradguard import GradGuard
from lightning_gradguard.core.recover._lr_scaling import LRCeiling


def _opt(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def test_the_capped_group_is_held_at_the_best_lr_and_the_others_keep_their_ratio():
    opt = _opt(0.4, 0.04)
    ceiling = LRCeiling()
    assert not ceiling
    ceiling.hold(0, opt, best_lr=0.1, lr_scale=1.0)
    assert ceiling
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.8, 0.08  # the schedule raises both
    assert ceiling.apply([opt], 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.05, 0.005  # below the ceiling: untouched
    assert not ceiling.apply([opt], 1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.005]


def test_cuts_and_recoveries_move_the_ceiling_with_the_lr_scale():
    opt = _opt(1.0)
    ceiling = LRCeiling()
    ceiling.hold(0, opt, best_lr=0.2, lr_scale=0.5)  # set while a cut of 0.5 is in force
    opt.param_groups[0]["lr"] = 5.0
    ceiling.apply([opt], 0.25)  # a later cut halves the ceiling too: a cut is never absorbed by it
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    opt.param_groups[0]["lr"] = 5.0
    ceiling.apply([opt], 1.0)  # recovered to the user's schedule: twice the ceiling it was set at
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    ceiling.release()
    assert not ceiling
    assert not ceiling.apply([opt], 1.0)


def test_a_lower_ceiling_stays_and_an_optimizer_without_one_is_untouched():
    a, b = _opt(1.0), _opt(1.0)
    ceiling = LRCeiling()
    ceiling.hold(0, a, best_lr=0.1, lr_scale=1.0)
    ceiling.hold(0, a, best_lr=0.3, lr_scale=1.0)  # weaker: the known-bad LR stays known
    a.param_groups[0]["lr"] = b.param_groups[0]["lr"] = 2.0
    ceiling.apply([a, b], 1.0)
    assert a.param_groups[0]["lr"] == pytest.approx(0.1)
    assert b.param_groups[0]["lr"] == 2.0


def test_a_tensor_lr_is_clamped_in_place_and_the_state_round_trips():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.5))
    lr_tensor = opt.param_groups[0]["lr"]
    ceiling = LRCeiling()
    ceiling.hold(0, opt, best_lr=0.1, lr_scale=1.0)
    ceiling.apply([opt], 1.0)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.1)
    again = LRCeiling()
    again.load_state_dict(copy.deepcopy(ceiling.state_dict()))
    assert again.units == ceiling.units
    again.load_state_dict(None)
    assert not again


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_no_usable_best_lr_sets_no_ceiling(bad):
    opt = _opt(1.0)
    ceiling = LRCeiling()
    assert not ceiling.hold(0, opt, best_lr=bad, lr_scale=1.0)
    assert not ceiling


# ---------------------------------------------------------------------- a plain loop with a runaway LR ramp
STEPS, RAMP_AT, GROWTH, CAP = 300, 75, 1.05, 1000.0


def _ramp(step: int) -> float:
    return min(GROWTH ** max(step - RAMP_AT, 0), CAP)


def _teacher_batch(step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * seed + step)
    x = torch.randn(64, 16, generator=g)
    w = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(16, 32, generator=w) / 4, torch.randn(32, 1, generator=w) / 2
    return x, 3 * torch.tanh(x @ w1) @ w2


def _fit(seed: int, guarded: bool, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _ramp)
    guard = GradGuard(model, opt, sched, **kwargs) if guarded else None
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: used.append(float(o.param_groups[0]["lr"])))
    for step in range(STEPS):
        x, y = _teacher_batch(step, seed)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if guard is None or guard.before_step(loss):
            opt.step()
        if guard is not None:
            guard.after_step()
        sched.step()
    x, y = _teacher_batch(-1, seed)
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(x), y))
    return final, used, guard


def test_a_runaway_lr_ramp_is_held_at_the_best_windows_lr_after_the_climb():
    unguarded, _, _ = _fit(0, guarded=False)
    final, used, guard = _fit(0, guarded=True)
    climbing = ("loss_climbing", "loss_above_best")
    climbs = [e for e in guard.events if e.get("rule") in climbing and e["kind"] in ("rollback", "lower_lr")]
    assert climbs, guard.events
    first = climbs[0]
    assert "held at or below" in first["reason"]
    assert "grew" in first["reason"]
    best = float(first["reason"].split("held at or below ")[1].split(" ")[0])
    after = used[first["step"] + 1 :]
    assert after
    assert max(after) <= best * 1.001
    assert guard.engine.lr_ceiling
    assert final < 0.2 * unguarded, (final, unguarded)
    model = nn.Linear(1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    resumed = GradGuard(model, opt)
    resumed.load_state_dict(copy.deepcopy(guard.state_dict()))
    assert resumed.engine.lr_ceiling.units == guard.engine.lr_ceiling.units


def test_the_ceiling_goes_once_the_lr_has_recovered_to_the_users_schedule():
    _, used, guard = _fit(0, guarded=True, lr_recovery_steps=20)
    kinds = [(e["kind"], e.get("lr_scale")) for e in guard.events]
    raised = next(e for e in guard.events if e["kind"] == "raise_lr")
    assert raised["lr_scale"] == 1.0, kinds
    first = next(e for e in guard.events if e["kind"] == "rollback")  # (a warning may come first: the climb's start)
    best = float(first["reason"].split("held at or below ")[1].split(" ")[0])
    # released: the ramp raises the LR past the old ceiling again, the climb returns and is held again
    assert max(used[raised["step"] + 1 :]) > 2 * best
    assert [k for k, _ in kinds].count("rollback") == 2
    assert guard.engine.lr_ceiling
