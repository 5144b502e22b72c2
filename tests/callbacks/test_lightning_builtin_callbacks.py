"""Lightning's own callbacks beside ``default_callbacks()``: a user adds ours to a Trainer that already has them.

A digits MLP (Adam 1e-3, batch 32, 6 epochs) with each of Lightning's training-time callbacks that changes the run
(the LR finder, run inside the fit; SWA, with its own LR schedule and weight swap; an EMA of the weights; a schedule of
accumulation; a backbone unfrozen as a new param group; Lightning's own spike detection). Each fit must end without an
exception, without any guard action (skip of a finite batch, rollback, LR cut, halt: nothing here is a fault) and
within 0.05 validation accuracy of the same fit without gradguard (chance is 0.1). Found to hold by a hunt of this
session; kept so that it goes on holding.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import callbacks as lc
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard, default_callbacks
from tests.models import make_trainer

ACTIONS = ("skip", "rollback", "halt", "lower_lr", "restart")


class Digits(pl.LightningModule):
    def __init__(self, lr: float = 1e-3, batch_size: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
        p = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        self.x, self.y, self.vx, self.vy = x[p][:1400], y[p][:1400], x[p][1400:], y[p][1400:]
        self.lr, self.batch_size = lr, batch_size
        self.backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True, generator=g)

    def accuracy(self) -> float:
        self.eval()
        with torch.no_grad():
            return float((self(self.vx).argmax(1) == self.vy).float().mean())


BUILTINS = {
    "LearningRateFinder": lambda: lc.LearningRateFinder(min_lr=1e-6, max_lr=10.0, num_training_steps=60),
    "StochasticWeightAveraging": lambda: lc.StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=0.5),
    "EMAWeightAveraging": lambda: lc.EMAWeightAveraging(),
    "GradientAccumulationScheduler": lambda: lc.GradientAccumulationScheduler({0: 1, 2: 4}),
    "BackboneFinetuning": lambda: lc.BackboneFinetuning(unfreeze_backbone_at_epoch=2, lambda_func=lambda e: 1.5),
    "SpikeDetection": lambda: lc.SpikeDetection(exclude_batches_path=None),
}


def _fit(tmp_path: Path, name: str, ours: list[pl.Callback]) -> Digits:
    pl.seed_everything(0, verbose=False)
    model = Digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, [*ours, BUILTINS[name]()], max_steps=-1, max_epochs=6, logger=False)
        trainer.fit(model)
    return model


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_lightning_callback_beside_the_defaults(tmp_path: Path, name: str) -> None:
    reference = _fit(tmp_path / "alone", name, []).accuracy()
    ours = list(default_callbacks())
    model = _fit(tmp_path / "guarded", name, ours)
    guard = next(cb for cb in ours if isinstance(cb, NaNGuard))
    actions = [e for e in guard.events if e["kind"] in ACTIONS]
    assert not actions, actions
    assert math.isfinite(model.lr)
    assert reference > 0.5  # the run learns with Lightning's callback alone (an EMA of the weights lags: ~0.6)
    assert model.accuracy() > reference - 0.05
