"""GradGuard in loops that set the LR by hand (nanoGPT: ``param_group["lr"] = get_lr(it)`` every iteration): the
guard's LR cut stays in force (``lr_overwrite="reapply"``), or a warning says once that it was undone (``"warn"``);
a loop whose LR the guard never cut is not touched, and a registered scheduler's step is not taken for a hand-set LR.

The LR each update used is read in an optimizer step pre-hook; the reference is the schedule itself times the
guard's LR scale, and for one update the parameter change is checked against ``lr * grad`` (plain SGD)."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import GradGuard

BASE_LR = 0.05
GROUP_MULT = (1.0, 0.1)  # two param groups with their own LRs (weights, biases)
NAN_AT = 6


def schedule(it: int, group: int = 0) -> float:
    """A warm-up then cosine schedule, different at every step (nanoGPT's get_lr in miniature)."""
    warm = 4
    lr = BASE_LR * (it + 1) / warm if it < warm else BASE_LR * (0.55 + 0.45 * math.cos(0.1 * (it - warm)))
    return lr * GROUP_MULT[group]


def _setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights}, {"params": biases}], lr=BASE_LR)
    return model, opt


def _batch(it: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + it)
    x = torch.randn(16, 6, generator=g)
    return x, x[:, :1] - 0.5 * x[:, 2:3]


class _Used:
    """The LR of each param group and the guard's LR scale at every ``optimizer.step()`` (a step pre-hook)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.lrs: dict[int, list[float]] = {}
        self.it = -1
        self.guard: GradGuard | None = None
        opt.register_step_pre_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        self.lrs[self.it] = [float(g["lr"]) for g in opt.param_groups]


def _loop(
    guard: GradGuard,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    used: _Used,
    steps: int,
    where: str = "top",
    scheduler: Any = None,
    scheduler_first: bool = True,
    nan_at: int = NAN_AT,
) -> None:
    """``where``: the LR is written at the top of each iteration (nanoGPT) or after the update, for the next one."""
    for it in range(steps):
        used.it = it
        if where == "top":
            for j, group in enumerate(opt.param_groups):
                group["lr"] = schedule(it, j)
        x, y = _batch(it)
        loss = nn.functional.mse_loss(model(x), y)
        if it == nan_at:
            loss = loss * float("nan")
        loss.backward()
        if guard.before_step(loss):
            opt.step()
        if where == "end":
            for j, group in enumerate(opt.param_groups):
                group["lr"] = schedule(it + 1, j)
        if scheduler is not None and scheduler_first:
            scheduler.step()
        guard.after_step()
        if scheduler is not None and not scheduler_first:
            scheduler.step()  # the wrong order: after after_step (still not a hand-set LR)
        opt.zero_grad()


def _guard(model: nn.Module, opt: torch.optim.Optimizer, schedulers: Any = (), **kwargs: Any) -> GradGuard:
    options: dict[str, Any] = {
        "action": "rollback",
        "lr_factor": 0.5,
        "stability": False,
        "divergence": False,
        "lr_recovery_steps": None,
        "clipping": None,
    }
    return GradGuard(model, opt, schedulers, **{**options, **kwargs})


@pytest.mark.parametrize("where", ["top", "end"])
def test_a_hand_set_lr_keeps_the_guards_cut(where: str, caplog: pytest.LogCaptureFixture) -> None:
    model, opt = _setup()
    used = _Used(opt)
    guard = _guard(model, opt)
    with caplog.at_level(logging.INFO, logger="lightning_gradguard.plain"):
        _loop(guard, model, opt, used, steps=14, where=where)
    told = [r.getMessage() for r in caplog.records if "re-applied" in r.getMessage()]
    assert len(told) == 1  # said once, at INFO (not a warning: nothing is wrong)
    assert told[0].startswith("GradGuard: the learning rate was set by hand (optimizer 0, param group 0: ")
    assert [(e["step"], e["kind"]) for e in guard.events] == [(NAN_AT, "rollback")]
    assert guard.lr_scale == 0.5
    first = 0 if where == "top" else 1  # written after the update: step 0 runs at the optimizer's own LR
    for it in range(first, NAN_AT):
        assert used.lrs[it] == [schedule(it, j) for j in range(2)]
    assert NAN_AT not in used.lrs  # the NaN step was not taken
    # written after the update, the loop's LR for the next step was in the optimizer when the rollback came: it is the
    # user's and stays, cut (the rollback restored the optimizer's LRs of step 0 over it before: BASE_LR * 0.5)
    for it in range(NAN_AT + 1, 14):
        assert used.lrs[it] == [schedule(it, j) * 0.5 for j in range(2)], it


def test_the_update_moves_the_parameters_by_the_cut_lr() -> None:
    model, opt = _setup()
    used = _Used(opt)
    guard = _guard(model, opt)
    _loop(guard, model, opt, used, steps=NAN_AT + 2)  # the rollback, then one healthy step
    it = NAN_AT + 2
    for j, group in enumerate(opt.param_groups):
        group["lr"] = schedule(it, j)  # the loop's write for the next step
    x, y = _batch(it)
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    assert guard.before_step()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    for name, p, p0, g in zip(names, model.parameters(), before, grads):
        lr = schedule(it, 0 if name.endswith("weight") else 1) * 0.5
        torch.testing.assert_close(p.detach(), p0 - lr * g, rtol=0, atol=1e-7)


def test_warn_option_warns_exactly_once_and_leaves_the_written_lr() -> None:
    model, opt = _setup()
    used = _Used(opt)
    guard = _guard(model, opt, lr_overwrite="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop(guard, model, opt, used, steps=14)
    mine = [w for w in caught if "set by hand" in str(w.message)]
    assert len(mine) == 1
    message = str(mine[0].message)
    assert message.startswith("GradGuard: the learning rate was set by hand (optimizer 0, param group 0: ")
    assert "lr_scale=0.5" in message
    assert "guard.lr_scale" in message
    assert mine[0].filename == __file__  # points at the loop's before_step call
    assert guard.lr_scale == 0.5
    for it in range(NAN_AT + 1, 14):
        assert used.lrs[it] == [schedule(it, j) for j in range(2)]  # the cut is undone: the warning said so


def test_ignore_option_leaves_the_written_lr_silently(recwarn: pytest.WarningsRecorder) -> None:
    model, opt = _setup()
    used = _Used(opt)
    guard = _guard(model, opt, lr_overwrite="ignore")
    _loop(guard, model, opt, used, steps=12)
    assert guard.lr_scale == 0.5
    assert used.lrs[NAN_AT + 2] == [schedule(NAN_AT + 2, j) for j in range(2)]
    assert not [w for w in recwarn if "set by hand" in str(w.message)]


@pytest.mark.parametrize("lr_overwrite", ["reapply", "warn"])
def test_a_loop_the_guard_never_cut_is_not_touched(lr_overwrite: str, recwarn: pytest.WarningsRecorder) -> None:
    model, opt = _setup()
    used = _Used(opt)
    guard = _guard(model, opt, action="skip", lr_overwrite=lr_overwrite)
    _loop(guard, model, opt, used, steps=12)
    assert [e["kind"] for e in guard.events] == ["skip"]
    assert guard.lr_scale == 1.0
    for it, lrs in used.lrs.items():
        assert lrs == [schedule(it, j) for j in range(2)]  # bit for bit the loop's values
    assert not [w for w in recwarn if "set by hand" in str(w.message)]


def test_after_the_lr_recovered_the_written_lr_is_used_as_is() -> None:
    model, opt = _setup()
    used = _Used(opt)
    guard = _guard(model, opt, lr_recovery_steps=3)
    _loop(guard, model, opt, used, steps=16)
    kinds = [(e["step"], e["kind"]) for e in guard.events]
    assert kinds == [(NAN_AT, "rollback"), (NAN_AT + 3, "raise_lr")]
    assert guard.lr_scale == 1.0
    for it in range(NAN_AT + 1, NAN_AT + 4):  # the cut in force until the recovery at the end of step NAN_AT + 3
        assert used.lrs[it] == [schedule(it, j) * 0.5 for j in range(2)]
    for it in range(NAN_AT + 4, 16):
        assert used.lrs[it] == [schedule(it, j) for j in range(2)]


def test_the_cut_stays_in_force_after_a_resume() -> None:
    model, opt = _setup()
    used = _Used(opt)
    guard = _guard(model, opt)
    _loop(guard, model, opt, used, steps=NAN_AT + 2)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), guard.state_dict())
    model2, opt2 = _setup()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])  # first the optimizer (its LRs are what the guard left), then the guard
    guard2 = _guard(model2, opt2)
    guard2.load_state_dict(saved[2])
    used2 = _Used(opt2)
    for it in range(NAN_AT + 2, NAN_AT + 5):
        used2.it = it
        for j, group in enumerate(opt2.param_groups):
            group["lr"] = schedule(it, j)
        x, y = _batch(it)
        nn.functional.mse_loss(model2(x), y).backward()
        assert guard2.before_step()
        opt2.step()
        guard2.after_step()
        opt2.zero_grad()
        assert used2.lrs[it] == [schedule(it, j) * 0.5 for j in range(2)]


_SCHEDULERS = {
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),  # recursive: lr <- lr * gamma
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.001),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),  # closed form
}


@pytest.mark.parametrize("scheduler_first", [True, False], ids=["documented_order", "scheduler_after_after_step"])
@pytest.mark.parametrize("kind", list(_SCHEDULERS))
def test_a_registered_scheduler_stepping_is_not_a_hand_set_lr(kind: str, scheduler_first: bool) -> None:
    model, opt = _setup()
    scheduler = _SCHEDULERS[kind](opt)
    used = _Used(opt)
    epochs: dict[int, int] = {}  # the scheduler's position at each update (a rollback takes it back)
    opt.register_step_pre_hook(lambda *_: epochs.__setitem__(used.it, scheduler.last_epoch))
    guard = _guard(model, opt, schedulers=scheduler)
    _loop(guard, model, opt, used, steps=16, where="nowhere", scheduler=scheduler, scheduler_first=scheduler_first)
    assert [(e["step"], e["kind"]) for e in guard.events] == [(NAN_AT, "rollback")]
    # the unguarded schedule by position, from a twin optimizer and scheduler
    twin_opt = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=BASE_LR)
    twin = _SCHEDULERS[kind](twin_opt)
    schedule_at: dict[int, list[float]] = {}
    for _ in range(max(epochs.values()) + 1):
        schedule_at[twin.last_epoch] = [g["lr"] for g in twin_opt.param_groups]
        twin_opt.step()
        twin.step()
    for it, lrs in used.lrs.items():
        scale = 0.5 if it > NAN_AT else 1.0  # cut once, never twice
        assert lrs == pytest.approx([scale * lr for lr in schedule_at[epochs[it]]], rel=1e-9), (it, epochs[it])


def test_a_scheduler_the_guard_was_not_given_is_reported_not_compounded() -> None:
    model, opt = _setup()
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)  # recursive: it keeps whatever LR it finds
    used = _Used(opt)
    guard = _guard(model, opt)  # the scheduler is not passed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop(guard, model, opt, used, steps=12, where="nowhere", scheduler=scheduler)
    mine = [str(w.message) for w in caught if "was not given" in str(w.message)]
    assert len(mine) == 1
    assert mine[0].startswith("GradGuard: the learning rate of optimizer 0 is stepped by an LR scheduler that ")
    # the rollback keeps the LR the scheduler had reached (its state is not the guard's to restore: it goes on from
    # where it is) and halves it; the cut is not re-applied on top of its steps (that would halve it at every step)
    for it in range(NAN_AT + 1, 12):
        assert used.lrs[it][0] == pytest.approx(BASE_LR * 0.5 * 0.9**it, rel=1e-12)
