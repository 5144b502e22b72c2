"""Long runs meet several unrelated faults: every one recovered, the budget refilled, the LR left at the schedule's.

Issue 24: a healthy 3000-step fit in which one weight is corrupted in place (a NaN written into it, as a transient
hardware fault would) every 250 steps. Before: each rollback also halved the LR and the fourth fault halted the run
(``max_rollbacks`` counted over the whole run). Now an isolated state fault after healthy steps restores the state
without touching the LR, and the rollback budget refills after sustained healthy training.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_gradguard import NaNGuard, default_callbacks
from tests.models import TinyRegression, make_trainer

FAULT_EVERY = 250
STEPS = 3000


class CorruptWeight(pl.Callback):
    """Writes a NaN into the first weight before the batches of the chosen steps (a state fault, not a data one)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.done: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps and step not in self.done:
            self.done.append(step)
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = math.nan


def cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4)


def assert_lr_is_the_schedules(trainer: pl.Trainer) -> None:
    """The LR actually in force is the uninterrupted schedule's at the scheduler's last step."""
    sched = trainer.lr_scheduler_configs[0].scheduler
    expected = cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01))
    for _ in range(sched.last_epoch):
        expected.optimizer.step()
        expected.step()
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected.get_last_lr()[0], rel=1e-12)


@pytest.mark.parametrize(
    ("which", "every"), [("default_callbacks", FAULT_EVERY), ("NaNGuard", FAULT_EVERY), ("NaNGuard", 150)]
)
def test_a_state_fault_every_250_steps_is_recovered_every_time_at_the_schedules_lr(tmp_path, which, every):
    """Every 150 steps too: each such fault is isolated (no fault in the 100 steps before it), and so its budget
    is given back (``rollback_refill_steps`` 100; it was 200, and the fourth fault at a spacing of 150 halted)."""
    faults = set(range(every, STEPS, every))  # 11 faults (19 at a spacing of 150)
    corrupt = CorruptWeight(faults)
    guards = list(default_callbacks()) if which == "default_callbacks" else [NaNGuard()]
    model = TinyRegression(lr=0.01, scheduler=cosine)
    trainer = make_trainer(tmp_path, [*guards, corrupt], max_steps=STEPS, logger=False, log_every_n_steps=50)
    trainer.fit(model)  # no DivergenceError: no halt
    guard = guards[-1]
    assert trainer.global_step == STEPS
    assert sorted(corrupt.done) == sorted(faults)
    kinds = [(e["kind"], e["cause"]) for e in guard.events]
    assert kinds == [("rollback", "nonfinite_params")] * len(faults), guard.events
    for event in guard.events:
        assert event["lr_scale"] == 1.0
        assert "LR kept" in event["reason"]
    assert guard.lr_scale == 1.0
    assert_lr_is_the_schedules(trainer)
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())
    assert model.losses[-1] < 0.5 * model.losses[0]  # it trained


class CorruptBatch(pl.Callback):
    """Writes NaN into the inputs of the chosen steps' batches (a corrupt record: a fault of the data)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch[0].fill_(math.nan)


@pytest.mark.parametrize("data_fault", ["nan_batch", "transient"])
def test_bad_batches_between_state_faults_neither_cut_the_lr_nor_spend_the_budget(tmp_path, data_fault):
    """The 3000-step run with a state fault every 250 steps, and a fault of the data every 40 steps besides (the
    batch's inputs NaN, or a NaN loss that a rerun of the step does not reproduce). Each data fault is skipped; it
    says nothing about the trajectory. Before, each made the next state fault (30 steps later) a "repeat": every
    rollback halved the LR (0.5, 0.25, 0.125) and the fourth, at step 1000, halted the run."""
    faults = set(range(FAULT_EVERY, STEPS, FAULT_EVERY))
    bad = {s for s in range(20, STEPS, 40)} - faults
    corrupt = CorruptWeight(faults)
    guard = NaNGuard()
    extra: list[pl.Callback] = [CorruptBatch(bad)] if data_fault == "nan_batch" else []
    model = TinyRegression(lr=0.01, scheduler=cosine, nan_at_steps=bad if data_fault == "transient" else ())
    trainer = make_trainer(tmp_path, [guard, corrupt, *extra], max_steps=STEPS, logger=False, log_every_n_steps=50)
    trainer.fit(model)  # no DivergenceError: no halt
    assert trainer.global_step == STEPS
    rollbacks = [e for e in guard.events if e["kind"] == "rollback"]
    skips = [e for e in guard.events if e["kind"] == "skip"]
    assert [e["step"] for e in rollbacks] == sorted(faults), guard.events
    assert all(e["lr_scale"] == 1.0 and "LR kept" in e["reason"] for e in rollbacks), rollbacks
    assert len(skips) >= len(bad)
    assert all(e["cause"] == "nonfinite_loss" for e in skips)
    assert [e for e in guard.events if e["kind"] not in ("rollback", "skip")] == []
    assert guard.lr_scale == 1.0
    assert_lr_is_the_schedules(trainer)
    assert model.losses[-1] < 0.5 * model.losses[0]


def test_the_budget_counts_rollbacks_close_together_and_refills_after_healthy_steps():
    from lightning_gradguard.core.guard import GuardPolicy, StepHealth

    policy = GuardPolicy("auto", max_rollbacks=2, refill_steps=100)
    damaged = [StepHealth(step=s, nonfinite_params=True) for s in (10, 20, 30)]
    actions = [policy.decide(h, can_roll_back=True).action.value for h in damaged]
    assert actions == ["rollback", "rollback", "halt"]  # three faults within 20 steps: the budget is spent
    policy = GuardPolicy("auto", max_rollbacks=2, refill_steps=100)
    out = []
    for fault in (100, 300, 500, 700, 900):
        out.append(policy.decide(StepHealth(step=fault, nonfinite_params=True), can_roll_back=True))
        for _ in range(199):
            policy.healthy()
    assert [d.action.value for d in out] == ["rollback"] * 5
    assert [d.lr_power for d in out] == [0] * 5  # isolated state faults: the LR is not the cause
    assert policy.rollbacks <= 1
