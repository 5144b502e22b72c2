"""NaNGuard keeps its LR cut in force when ``training_step`` writes the LR by hand (issue 24).

A nanoGPT-style LightningModule sets ``param_group["lr"] = schedule(step)`` itself each step, with no scheduler.
After a rollback that cut the LR, the module's next write put the schedule's value back: the cut lasted until the
next step while the guard reported ``lr_scale=0.5`` (a helper's character GPT: final LR 2e-4, the schedule's, where
the cut gives 1e-4). The plain loop's ``GradGuard`` already re-applied the cut on top of a hand-written value; the
callback now does the same (``core/recover/_lr_watch.py``, shared). The LR each update used is read in an optimizer
step post-hook; the reference is the schedule times the guard's LR scale."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard
from tests.models import make_trainer

BASE_LR = 0.05


def schedule(step: int) -> float:
    return BASE_LR * (0.55 + 0.45 * math.cos(0.05 * step))


class HandLR(pl.LightningModule):
    """A tanh MLP on a linear target, SGD; the LR written by hand in ``training_step``; a NaN written into a weight
    in place at each step of ``corrupt_at`` (before that step's forward), as a transient hardware fault would."""

    def __init__(self, corrupt_at: tuple[int, ...], scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.corrupt_at, self.with_scheduler = set(corrupt_at), scheduler
        self.used: dict[int, float] = {}
        self.it = -1  # the step training_step ran at (the pre-hook's key)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.it = self.global_step
        if not self.with_scheduler:
            for group in opt.param_groups:
                group["lr"] = schedule(self.global_step)
        if self.global_step in self.corrupt_at:
            self.corrupt_at.discard(self.global_step)
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def _used(self, opt, *_):  # after the update (inside Lightning's closure-driven step): the LR it used
        sched = self.lr_schedulers() if self.with_scheduler else None
        self.used[self.it] = (float(opt.param_groups[0]["lr"]), sched.last_epoch if sched is not None else self.it)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=BASE_LR)
        opt.register_step_post_hook(self._used)
        if not self.with_scheduler:
            return opt
        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / BASE_LR),
                        "interval": "step"}]  # fmt: skip

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4096, 6, generator=g)
        return DataLoader(TensorDataset(x, x[:, :1] - 0.5 * x[:, 2:3]), batch_size=16)


def _fit(tmp_path, model, steps: int = 140):
    guard = NaNGuard(snapshot_every_n_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [guard], max_steps=steps, logger=False).fit(model)
    return guard


@pytest.mark.parametrize("scheduler", [False, True], ids=["by_hand", "lambda_lr"])
def test_the_cut_stays_in_force_when_the_lr_is_written_by_hand(tmp_path, caplog, monkeypatch, scheduler):
    # this process is rank 0 (a strategy set up with another rank earlier in this test process leaves its
    # rank_zero_only.rank behind, and rank_zero_info then says nothing)
    import lightning.fabric.utilities.rank_zero as fabric_rank_zero
    import lightning_utilities.core.rank_zero as utils_rank_zero

    monkeypatch.setattr(fabric_rank_zero.rank_zero_only, "rank", 0, raising=False)
    monkeypatch.setattr(utils_rank_zero.rank_zero_only, "rank", 0, raising=False)
    model = HandLR(corrupt_at=(60, 64), scheduler=scheduler)  # the second fault, soon after: a rollback with a cut
    with contextlib.ExitStack() as stack:  # (another test in this process may have set Lightning's loggers to ERROR)
        for name in (None, "lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
            stack.enter_context(caplog.at_level(logging.INFO, logger=name))
        guard = _fit(tmp_path, model)
    rollbacks = [e for e in guard.events if e["kind"] == "rollback"]
    assert len(rollbacks) == 2, guard.events
    cut_at = rollbacks[-1]["step"]
    assert rollbacks[-1]["lr_scale"] == 0.5
    assert guard.lr_scale == 0.5
    later = [s for s in model.used if s > cut_at + 1]
    assert len(later) > 50
    for s in later:  # every later update used the schedule's value times the cut (before: the schedule's own)
        lr, at = model.used[s]  # (a scheduler's own count went back with the rollback: its schedule position)
        assert lr == pytest.approx(0.5 * schedule(at), rel=1e-6), (s, lr, at)
    said = [r for r in caplog.records if "re-applied to the written value" in r.getMessage()]
    assert len(said) == (0 if scheduler else 1)  # said once; a scheduler's LR already carries the cut


def test_a_run_whose_lr_was_never_cut_is_not_touched(tmp_path):
    model = HandLR(corrupt_at=(60,))  # one isolated fault: a rollback with the LR kept
    guard = _fit(tmp_path, model)
    assert [e["lr_scale"] for e in guard.events if e["kind"] == "rollback"] == [1.0]
    assert all(lr == pytest.approx(schedule(at), rel=1e-9) for lr, at in model.used.values())


def test_the_lr_ceiling_is_not_taken_for_a_write_by_hand(tmp_path):
    """A registered LambdaLR ramp (5 % a step) pushes the rescue grid's MLP past its stable LR; the climb's rollback
    cuts the LR and holds it at or below the best window's while the schedule would raise it. The engine's own clamp
    to that ceiling is no write by hand: the LR used stays at the ceiling (before this fix's ordering: half of it,
    the cut applied a second time on top of the clamp)."""
    import re
    import tempfile

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import scenarios

    from lightning_gradguard import default_callbacks

    class Used(pl.Callback):  # after NaNGuard's hook: the LR the update will use
        def __init__(self) -> None:
            self.lrs: dict[int, tuple[float, float]] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            sched = trainer.lr_scheduler_configs[0].scheduler
            self.lrs[trainer.global_step] = (float(optimizer.param_groups[0]["lr"]), float(sched.get_last_lr()[0]))

    used = Used()
    callbacks = [*default_callbacks(), used]
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as root:
        warnings.simplefilter("ignore")
        scenarios.fit("mlp", root, callbacks, setting="ramp", seed=0, logger=False)
    held = [e for e in guard.events if e["kind"] == "rollback" and "held at or below" in e["reason"]]
    assert held, guard.events
    ceiling = float(re.findall(r"held at or below ([0-9.e+-]+)", held[0]["reason"])[0])
    above = [(lr, sched) for s, (lr, sched) in used.lrs.items() if s > held[0]["step"] and sched > 1.01 * ceiling]
    assert len(above) > 20  # the schedule would raise it past the ceiling for the rest of the run
    for lr, _ in above:
        assert lr == pytest.approx(ceiling, rel=1e-3)  # the ceiling, not half of it
