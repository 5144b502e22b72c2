"""A finite state fault: the model blows up to a loss level that holds, with every number finite (issue 24).

Two faults a helper injected into a healthy digits MLP (Adam 3e-3) after a long healthy stretch:

- eight rows of a hidden layer's weights scaled x1000 in place (an exponent bit flipped by a transient hardware
  fault: a huge, finite weight). The loss jumps from 0.05 to 200 and then falls slowly as Adam relearns;
- Adam's ``exp_avg_sq`` zeroed at five steps in a row (a buggy state-reset hook): the first huge step is rolled
  back, the last two blow the restored model up again to a steady level (losses 500-1800).

Before, the loss rule took the far level for a new task's (it held steady or fell: ``holds_level``) and adopted it
as the reference: no rollback, only stability warnings, and the run ended 1.5-16 % below the healthy one. A first
rollback also cut the LR though the run had been calm for 250 steps at the same LR.

Now a held far level is tested on the batch (the state a rollback would restore reruns it): a new task's batch is
as far for that state (the zoo's ``curriculum``: adopted, as before), a blown-up model's is not (rolled back). And a
divergence out of calm steps at an LR that did not rise restores the state at the schedule's LR; a repeat cuts it.

Last, an LR bug the guard rolled back is not an LR "the run trained at" once the cut is undone (the LR history of
undone steps is forgotten)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard
from tests.models import make_trainer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from zoo_shapes import digits  # noqa: E402

ACTIONS = ("skip", "rollback", "halt", "lower_lr", "restart")


class DigitsMLP(pl.LightningModule):
    """Digits MLP 64-128-128-10, Adam 3e-3, batch 32; ``fault(module, optimizer)`` runs before the optimizer step
    of each step in ``fault_steps`` (once per step number)."""

    def __init__(self, seed: int, fault_steps: tuple[int, ...] = (), fault=None) -> None:  # noqa: ANN001
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        self.seed, self.fault_steps, self.fault, self.done = seed, fault_steps, fault, set()
        self.x, self.y, self.vx, self.vy = digits(seed)
        self.losses: dict[int, float] = {}

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.losses[self.global_step] = float(loss)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
        step = self.global_step
        if self.fault is not None and step in self.fault_steps and step not in self.done:
            self.done.add(step)
            self.fault(self, optimizer)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 3e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32, shuffle=True, drop_last=True, generator=g)

    @torch.no_grad()
    def accuracy(self) -> float:
        return float((self.net(self.vx).argmax(-1) == self.vy).float().mean())


def _scale_rows(module: DigitsMLP, optimizer) -> None:  # noqa: ANN001
    with torch.no_grad():
        module.net[2].weight[:8].mul_(1000.0)


def _zero_second_moment(module: DigitsMLP, optimizer) -> None:  # noqa: ANN001
    for state in optimizer.state.values():
        state["exp_avg_sq"].zero_()


def _fit(tmp_path, module: DigitsMLP, callbacks: list, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks, max_steps=steps, logger=False).fit(module)


def test_a_weight_blown_up_to_a_finite_level_is_rolled_back_at_the_schedules_lr(tmp_path) -> None:
    healthy = DigitsMLP(0)
    _fit(tmp_path, healthy, [], 400)
    faulted = DigitsMLP(0, (200,), _scale_rows)
    _fit(tmp_path, faulted, [], 400)
    assert max(faulted.losses[s] for s in range(200, 206)) > 1000 * max(healthy.losses[s] for s in range(190, 200))
    model, guard = DigitsMLP(0, (200,), _scale_rows), NaNGuard()
    _fit(tmp_path, model, [guard], 400)
    acts = [e for e in guard.events if e["kind"] in ACTIONS]
    assert len(acts) == 1, guard.events  # before: no action, warnings only
    event = acts[0]
    assert event["kind"] == "rollback", event
    assert event["cause"] == "loss_divergence", event
    assert 200 <= event["step"] <= 205, event
    assert "the model blew up, not the data" in event["reason"], event["reason"]  # the evidence, stated
    assert "LR kept" in event["reason"], event["reason"]
    assert guard.lr_scale == 1.0  # before a rollback cut it: nothing said the LR was at fault
    assert model.accuracy() >= healthy.accuracy() - 0.03, guard.events


def test_a_model_blown_up_again_after_its_rollback_is_rolled_back_again(tmp_path) -> None:
    healthy = DigitsMLP(0)
    _fit(tmp_path, healthy, [], 500)
    model, guard = DigitsMLP(0, (300, 301, 302, 303, 304), _zero_second_moment), NaNGuard()
    _fit(tmp_path, model, [guard], 500)
    rollbacks = [e for e in guard.events if e["kind"] == "rollback"]
    assert len(rollbacks) >= 2, guard.events  # before: one, then the blown-up level was adopted
    assert any("the model blew up, not the data" in e["reason"] for e in rollbacks), guard.events
    assert not [e for e in guard.events if e["kind"] == "halt"], guard.events
    late = sorted(model.losses[s] for s in range(450, 500))
    assert late[len(late) // 2] < 0.5, guard.events  # back at the run's level (before: ~1)
    assert model.accuracy() >= healthy.accuracy() - 0.04, guard.events  # before: 0.88 vs 0.95


class BuggedSchedule(DigitsMLP):
    """The same MLP under SGD with momentum (lr 0.05) and an LR bug: the schedule multiplies the LR by 10 from step
    300 to the end (unguarded: at chance)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), 0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 10.0 if t >= 300 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_an_lr_bug_rolled_back_is_no_lr_the_run_trained_at_when_the_cut_is_undone(tmp_path) -> None:
    """A helper's sustained LR bug: rolled back at ~350 with the LR held, the run recovered; ``lr_recovery_steps``
    later the cut was undone, the hold lifted, and the schedule's x10 came back. Its second climb only warned ("not
    past 0.5, which the run trained at before its best": the only steps at 0.5 were the ones rolled back), and the
    run ended at chance (0.09 against 0.98). The LRs of steps undone by a rollback (or whose climb cut the LR) no
    longer count as survived: the second climb is rolled back as the first was."""
    healthy = DigitsMLP(0)
    _fit(tmp_path, healthy, [], 900)
    model, guard = BuggedSchedule(0), NaNGuard(lr_recovery_steps=250)
    _fit(tmp_path, model, [guard], 900)
    kinds = [(e["kind"], e["step"]) for e in guard.events if e["kind"] != "warn"]
    rollbacks = [step for kind, step in kinds if kind == "rollback"]
    raises = [step for kind, step in kinds if kind == "raise_lr"]
    assert rollbacks, guard.events
    assert raises, guard.events
    assert any(r > raises[0] for r in rollbacks), guard.events  # before: warnings only after the LR came back
    assert model.accuracy() >= healthy.accuracy() - 0.03, guard.events


class StageInBuffer(pl.LightningModule):
    """A regression whose curriculum stage lives in a registered buffer (checkpointable schedule state): from step
    300 the targets are scaled x30 (the loss jumps ~900x and then falls as the model learns the new scale)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.register_buffer("stage", torch.zeros(()))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(600 * 32, 8, generator=g)
        self.xy = (x, torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.05 * torch.randn(len(x), 1, generator=g))
        self.losses: dict[int, float] = {}

    def on_train_batch_start(self, batch, batch_idx) -> None:  # noqa: ANN001
        if self.global_step == 300:  # raised once (as a curriculum raises its stage when the loss is low enough)
            self.stage.fill_(1.0)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        scale = 30.0**self.stage
        loss = F.mse_loss(self.net(batch[0]), batch[1] * scale)
        self.losses[self.global_step] = float(loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.xy), batch_size=32, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 3e-3)


def test_a_new_stage_kept_in_a_buffer_is_tested_under_todays_objective(tmp_path) -> None:
    """The batch test of a held level runs the trusted weights with today's buffers: a curriculum stage kept in a
    buffer is today's objective (a helper's run: with the snapshot's buffers the earlier state scored itself under
    its own, easier stage, and the new stage was rolled back three times and halted)."""
    model, guard = StageInBuffer(), NaNGuard()
    _fit(tmp_path, model, [guard], 600)
    assert max(model.losses[s] for s in range(300, 305)) > 100 * max(model.losses[s] for s in range(290, 300))
    assert not [e for e in guard.events if e["kind"] in ACTIONS], guard.events
