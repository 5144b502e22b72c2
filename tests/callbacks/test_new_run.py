"""The same callbacks given to a new Trainer start a new run; a fit that continues or resumes keeps its state.

Pre-training, then fine-tuning on another task with a new optimizer at a higher LR, the same ``callbacks`` list for
both Trainers (a common script). Before, the guard judged the second run against the first one: its best loss
(0.24) and that window's LR (3e-4), so the new task's first losses were "a climb" and the new optimizer's LR was
"an LR that grew 3.33x": an LR cut at step 41, the LR held at 3e-4 for the rest of the fit (seed 1). The clipper
likewise kept the first run's gradient statistics. A fit from step 0 without a restored state is now a new run for
both; a continued fit (a later step) or a resumed one keeps everything (``tests/callbacks/test_nan_guard.py`` and
the resume tests)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import AdaptiveGradientClipping, NaNGuard
from tests.models import make_trainer

SEED = 1


class TwoTasks(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        d = load_digits()
        g = torch.Generator().manual_seed(seed)
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
        order = torch.randperm(len(x), generator=g)
        self.x, self.y = x[order][:1400], y[order][:1400]
        self.seed, self.phase = seed, 1
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        return (3 * y + 1) % 10 if self.phase == 2 else y

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed * 7)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64, shuffle=True, generator=g, drop_last=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), self.labels(y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-4 if self.phase == 1 else 1e-3)


def _two_fits(tmp_path, callbacks) -> pl.Trainer:
    pl.seed_everything(SEED, verbose=False)
    model = TwoTasks(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path / "one", callbacks, max_steps=400, max_epochs=-1, logger=False).fit(model)
        model.phase = 2
        second = make_trainer(tmp_path / "two", callbacks, max_steps=400, max_epochs=-1, logger=False)
        second.fit(model)
    return second


def test_a_reused_guard_judges_the_second_fit_as_a_new_run(tmp_path) -> None:
    guard = NaNGuard()
    second = _two_fits(tmp_path, [guard])
    assert [e for e in guard.events if e["kind"] != "warn"] == []  # before: lower_lr at step 41 (lr_too_high)
    assert second.optimizers[0].param_groups[0]["lr"] == 1e-3  # the new run's own LR, not the first run's
    assert guard.engine.lr_scale == 1.0


def test_a_reused_clipper_warms_up_afresh_for_a_new_run(tmp_path) -> None:
    clip = AdaptiveGradientClipping("zscore")
    seen: list[int] = []

    class Count(pl.Callback):  # the clipper's committed steps at the start of each fit
        def on_train_start(self, trainer, pl_module):
            seen.append(sum(s.steps for s in clip._slots.values()))

    _two_fits(tmp_path, [clip, Count()])
    assert seen == [0, 0]  # before: [0, 400], the first run's statistics carried into the second
    assert clip._slots[0].clipper.started  # and it learned the new run's norms after its own warm-up


def test_a_continued_fit_keeps_its_state(tmp_path) -> None:
    """The same Trainer fitted again with more steps continues the run (global step > 0): nothing is reset."""
    guard = NaNGuard()
    pl.seed_everything(SEED, verbose=False)
    model = TwoTasks(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, [guard], max_steps=100, max_epochs=-1, logger=False)
        trainer.fit(model)
        start = guard.engine.judge_.controller.state_dict()["start"]  # the untrained level, from the first loss
        engine = guard.engine.judge_
        trainer.fit_loop.epoch_loop.max_steps = 150
        trainer.fit(model)
    assert trainer.global_step == 150
    assert guard.engine.judge_ is engine  # the same judge, not a new one
    assert guard.engine.judge_.controller.state_dict()["start"] == start
    assert guard.engine.judge_.grad_history[-1][0] == 149
