"""fit -> checkpoint -> resume with ``default_callbacks()`` equals the uninterrupted run step for step (issue 24).

Every loss (recorded in ``training_step``), every LR and the final weights are compared bitwise with the same run
done in one go, with the three callbacks at their defaults, for a checkpoint written by ``trainer.save_checkpoint``
at the end of an interrupted fit and by ``ModelCheckpoint(every_n_train_steps=K)`` during a full one. Before the
checkpoint: nothing, a rollback (a NaN written into a weight, which only a rollback can undo), or a stability LR cut
(injected as the controller's finding, so that the test does not depend on when the finite-signal rules fire).

After the resume: a rollback at step 75 restores the snapshot of step 50 in both runs (snapshots follow the step
counter, so the resumed run takes the ones the uninterrupted run took after the checkpoint). Not covered, and not
exact: a fault before the first snapshot after the resume is confirmed restores the resumed state itself (the
snapshots are not in the checkpoint), where the uninterrupted run restores an older one.

One batch per epoch (``FullBatch``): Lightning itself resumes a plain ``DataLoader`` mid-epoch from the epoch's
first batch, so the data of a step must not depend on where in an epoch the checkpoint fell.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_gradguard import NaNGuard, default_callbacks
from tests.compat.common import FullBatch, differences
from tests.models import make_trainer

STEPS = 100
CKPT = 40


class Recorded(FullBatch):
    """Records the loss of every step (by ``global_step``) from ``training_step``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.by_step: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.by_step[self.global_step] = float(loss.detach())
        return loss


class Faults(Callback):
    """A NaN written into a weight before the forward of each step in ``nan_weight_at`` (only a rollback undoes it);
    the stability controller's finding replaced by an in-place cut at each step in ``cut_at``. Records the LR each
    step starts with."""

    def __init__(self, nan_weight_at: tuple[int, ...] = (), cut_at: tuple[int, ...] = ()) -> None:
        self.nan_weight_at, self.cut_at = set(nan_weight_at), set(cut_at)
        self.lrs: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module):
        if not self.cut_at:
            return
        from lightning_gradguard.core.guard._stability import StabilityFinding

        guard = next(cb for cb in trainer.callbacks if isinstance(cb, NaNGuard))
        controller = guard.engine.judge_.controller
        update = controller.update

        def injected(*args: Any, **kwargs: Any):
            finding = update(*args, **kwargs)
            if trainer.global_step in self.cut_at:
                return StabilityFinding(rule="injected", evidence={}, reason="test: the LR looks too high")
            return finding

        controller.update = injected

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]
        if trainer.global_step in self.nan_weight_at:
            with torch.no_grad():
                pl_module.net[0].weight[1, 2] = math.nan


def _model() -> Recorded:
    torch.manual_seed(0)
    return Recorded()


def _fit(root, faults: dict[str, Any], max_steps: int, ckpt_path: str | None = None, every: int | None = None):
    model = _model() if ckpt_path is None else Recorded()  # resumed weights come from the checkpoint
    probe = Faults(**faults)
    callbacks = [*default_callbacks(), probe]
    extra: dict[str, Any] = {}
    if every is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=every, save_top_k=-1))
        extra["enable_checkpointing"] = True
    trainer = make_trainer(root, callbacks, max_steps=max_steps, logger=False, **extra)
    trainer.fit(model, ckpt_path=ckpt_path)
    guard = next(cb for cb in callbacks if isinstance(cb, NaNGuard))
    return trainer, model, probe, guard


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _check_resume(tmp_path, faults: dict[str, Any], style: str) -> NaNGuard:
    _, full_model, full_probe, full_guard = _fit(tmp_path / "full", faults, STEPS)

    if style == "save_checkpoint":
        first, first_model, first_probe, _ = _fit(tmp_path / "first", faults, CKPT)
        ckpt = str(tmp_path / "interrupted.ckpt")
        first.save_checkpoint(ckpt)
    else:
        _, first_model, first_probe, _ = _fit(tmp_path / "first", faults, STEPS, every=CKPT)
        (ckpt,) = [str(p) for p in (tmp_path / "first" / "ckpt").glob(f"*step={CKPT}*.ckpt")]
    resumed_trainer, model, probe, guard = _fit(tmp_path / "resumed", faults, STEPS, ckpt_path=ckpt)

    losses = {s: v for s, v in first_model.by_step.items() if s < CKPT} | model.by_step
    assert sorted(losses) == sorted(full_model.by_step) == list(range(STEPS))
    differ = [s for s in range(STEPS) if not _same(losses[s], full_model.by_step[s])]
    assert not differ, f"losses differ from the uninterrupted run at steps {differ[:10]} ({len(differ)} of {STEPS})"
    lrs = {s: v for s, v in first_probe.lrs.items() if s < CKPT} | probe.lrs
    assert lrs == full_probe.lrs
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)
    assert not differences(guard.events, full_guard.events)  # (NaN == NaN: the fault's loss)
    assert guard.lr_scale == full_guard.lr_scale
    assert resumed_trainer.global_step == STEPS
    return full_guard


STYLES = ["save_checkpoint", "ModelCheckpoint"]


@pytest.mark.parametrize("style", STYLES)
def test_resume_is_exact_with_the_defaults(tmp_path, style):
    guard = _check_resume(tmp_path, {}, style)
    assert guard.events == []


@pytest.mark.parametrize("style", STYLES)
def test_resume_is_exact_after_a_rollback_before_the_checkpoint(tmp_path, style):
    guard = _check_resume(tmp_path, {"nan_weight_at": (25,)}, style)
    assert [(e["step"], e["kind"]) for e in guard.events] == [(25, "rollback")]


@pytest.mark.parametrize("style", STYLES)
def test_resume_is_exact_after_a_stability_cut_before_the_checkpoint(tmp_path, style):
    guard = _check_resume(tmp_path, {"cut_at": (30,)}, style)
    assert [(e["step"], e["kind"]) for e in guard.events] == [(30, "lower_lr")]
    assert guard.lr_scale == 0.5


@pytest.mark.parametrize("style", STYLES)
def test_resume_is_exact_when_a_rollback_after_the_resume_restores_a_snapshot_from_before_it(tmp_path, style):
    guard = _check_resume(tmp_path, {"nan_weight_at": (25, 75)}, style)
    assert [(e["step"], e["kind"]) for e in guard.events] == [(25, "rollback"), (75, "rollback")]
