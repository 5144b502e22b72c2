"""What users do to a fit that the guard must survive: Lightning's own clipping, an optimizer swapped mid-fit,
parameters that change, complex parameters (found by a helper on code the project had not seen)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard


def _data(n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class _Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.lr = lr

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _NaNInputAt(pl.Callback):
    def __init__(self, *steps: int) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step in self.steps:
            batch[0][0, 0] = float("nan")


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:  # noqa: ANN001
    return pl.Trainer(
        default_root_dir=tmp_path, max_steps=kwargs.pop("max_steps", 60), accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_lightning_clipping_of_a_dropped_step_clips_nothing_and_keeps_clipping_healthy_steps(tmp_path, algorithm):
    """The guard drops a step by setting its gradients to None before Lightning clips: ``clip_grad_value_`` raises on
    an empty gradient list, which ended the fit at the first skipped step. Healthy steps are still clipped."""
    guard = NaNGuard()
    model = _Classifier()
    seen: list[float] = []

    def after_step(opt, args, kwargs) -> None:  # noqa: ANN001 - the gradients the update used, after clipping
        grads = [p.grad.abs().max() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            seen.append(float(torch.stack(grads).max()))

    class Hook(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            trainer.optimizers[0].register_step_post_hook(after_step)

    trainer = _trainer(tmp_path, [guard, _NaNInputAt(10), Hook()], gradient_clip_val=0.01,
                       gradient_clip_algorithm=algorithm)  # fmt: skip
    trainer.fit(model, _data())
    assert trainer.global_step == 60
    assert [(e["kind"], e["step"]) for e in guard.events] == [("skip", 10)]
    if algorithm == "value":
        assert seen
        assert max(seen) <= 0.01 + 1e-9  # every applied update was clipped by value
    assert "clip_gradients" not in vars(trainer.precision_plugin)  # the wrap ends with the fit


class _NaNWeightAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[-1].weight[0, 0] = float("nan")


class _TwoPhase(_Classifier):
    """SGD for the first epoch (64 steps), then Adam: the Trainer's optimizers are set up again mid-fit."""

    def configure_optimizers(self):
        if self.current_epoch >= 1:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.trainer.strategy.setup_optimizers(self.trainer)


def test_an_optimizer_swapped_mid_fit_is_snapshotted_at_once_and_a_fault_after_it_is_rolled_back(tmp_path):
    """The SGD snapshots do not load into the Adam swapped in at step 64 (the restore failed with ``KeyError:
    'step'``); the swap is seen at the next healthy step and a snapshot of the new state is taken there."""
    guard = NaNGuard()
    trainer = _trainer(tmp_path, [guard, _NaNWeightAt(80)], max_steps=120)
    model = _TwoPhase()
    trainer.fit(model, _data())
    assert trainer.global_step == 120
    assert [(e["kind"], e["step"]) for e in guard.events] == [("rollback", 80)]
    assert guard.events[0]["snapshot_step"] == 65
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Unfrozen(_Classifier):
    """The first layer frozen until step 40, then given to the optimizer as a new param group (what Lightning's
    ``BackboneFinetuning`` does at an epoch)."""

    def configure_optimizers(self):
        self.net[0].requires_grad_(False)
        return torch.optim.Adam(self.net[2].parameters(), lr=1e-2)

    def on_train_batch_start(self, batch, batch_idx) -> None:  # noqa: ANN001
        if self.trainer.global_step == 40 and not self.net[0].weight.requires_grad:
            self.net[0].requires_grad_(True)
            self.trainer.optimizers[0].add_param_group({"params": list(self.net[0].parameters()), "lr": 1e-3})


def test_a_param_group_added_mid_fit_is_snapshotted_at_once_so_a_fault_soon_after_is_rolled_back(tmp_path):
    """The kept snapshots predate the new group and are dropped; before, the next snapshot came at the next
    multiple of ``snapshot_every_n_steps`` and a fault in between halted the run with nothing to roll back to."""
    guard = NaNGuard()
    trainer = _trainer(tmp_path, [guard, _NaNWeightAt(55)], max_steps=80)
    model = _Unfrozen()
    trainer.fit(model, _data())
    assert trainer.global_step == 80
    assert [(e["kind"], e["step"]) for e in guard.events] == [("rollback", 55)]
    assert guard.events[0]["snapshot_step"] == 41  # the snapshot taken when the group came, confirmed since
    assert len(trainer.optimizers[0].param_groups) == 2


class _ComplexBranch(pl.LightningModule):
    """A real head used on most steps and a complex-valued one every 40th step (its logits are magnitudes)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 4)
        self.b = nn.Parameter(torch.randn(4, 8, dtype=dtype) * 0.3)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        if self.global_step % 40 == 0:
            out = (x.to(self.b.dtype) @ self.b.t()).abs() if self.b.is_complex() else x @ self.b.t()
        else:
            out = self.a(x)
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _PoisonB(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == 85:
            with torch.no_grad():
                pl_module.b.view(-1)[0] = complex(math.nan, 0.0) if pl_module.b.is_complex() else math.nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_a_nan_in_a_complex_parameter_is_found_like_one_in_a_real_parameter(tmp_path, dtype):
    """The weight of a rarely used branch goes NaN at step 85; the next snapshot (step 100) finds it and the run is
    rolled back to step 50. The finiteness checks read floating tensors only: a complex weight's NaN was trusted
    into the snapshot, later faults were blamed on the data, and the fit ended with non-finite weights."""
    guard = NaNGuard()
    model = _ComplexBranch(dtype)
    trainer = _trainer(tmp_path, [guard, _PoisonB()], max_steps=200)
    trainer.fit(model, _data(2048))
    assert [(e["kind"], e["step"], e["cause"], e.get("snapshot_step")) for e in guard.events] == [
        ("rollback", 99, "nonfinite_params", 50)
    ]
    assert guard.events[0]["nonfinite_params"] == ["b"]
    assert bool(torch.isfinite(model.b).all())


class _HandDecay(_Classifier):
    """SGD 0.1; at step 40 the user's hook divides the LR by 100 and sets a weight decay (a hand-written schedule,
    no scheduler)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def on_train_batch_start(self, batch, batch_idx) -> None:  # noqa: ANN001
        if self.trainer.global_step == 40:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"], group["weight_decay"] = 1e-3, 1e-4


def test_a_rollback_keeps_the_settings_the_user_changed_by_hand_since_the_snapshot(tmp_path):
    """An isolated state fault at step 45 is rolled back to the snapshot of step 0 ("LR kept"); the user's LR drop
    and weight decay of step 40 came after it. Restored with the optimizer's state they were undone for the rest of
    the run (the hook that made them does not run again): the run went on at 100x the user's LR."""
    guard = NaNGuard(snapshot_confirm_steps=2)
    trainer = _trainer(tmp_path, [guard, _NaNWeightAt(45)], max_steps=60)
    model = _HandDecay()
    trainer.fit(model, _data())
    assert [(e["kind"], e["step"]) for e in guard.events] == [("rollback", 45)]
    assert guard.events[0]["snapshot_step"] < 40
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(1e-3, rel=1e-12)
    assert group["weight_decay"] == 1e-4


class _ScheduledSecondPhase(_Classifier):
    """SGD alone for the first epoch (64 steps), then SGD with a StepLR: the rebuilt optimizer brings a scheduler."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.current_epoch >= 1:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 30, 0.5)}
        return opt

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.trainer.strategy.setup_optimizers(self.trainer)


def test_a_scheduler_that_comes_with_a_rebuilt_optimizer_makes_the_older_snapshots_stale(tmp_path):
    """6 steps after the rebuild the only trusted snapshot (step 50) has no scheduler state: its restore raised
    ``ValueError: snapshot holds 0 scheduler states, got 1`` from the library. Now the layout counts the schedulers,
    the older snapshots are dropped, and the snapshot taken at the rebuild, not yet confirmed, is the one restored
    (the event says so); 16 steps after, the same snapshot, confirmed."""
    guard = NaNGuard()
    trainer = _trainer(tmp_path, [guard, _NaNWeightAt(70)], max_steps=120)
    trainer.fit(_ScheduledSecondPhase(), _data())
    assert [(e["kind"], e["step"], e.get("snapshot_step")) for e in guard.events] == [("rollback", 70, 65)]
    assert "not yet confirmed by 10 healthy steps: used" in guard.events[0]["reason"]
    guard = NaNGuard()
    trainer = _trainer(tmp_path, [guard, _NaNWeightAt(80)], max_steps=120)
    trainer.fit(_ScheduledSecondPhase(), _data())
    assert [(e["kind"], e["step"], e.get("snapshot_step")) for e in guard.events] == [("rollback", 80, 65)]
