"""An optimizer built with ``maximize=True`` ascends its loss: the guard judges ``-loss``, the objective it minimises.

A digits MLP whose ``training_step`` returns the log-likelihood (``-cross_entropy``) to SGD with ``maximize=True``,
and a scheduler bug that multiplies the LR by 100 from step 300. The cross-entropy goes from 0.03 to 18 and up to
5e5, then the network sits at chance. Before, every rule read the returned value as a loss to minimise, so a
likelihood falling towards -5e5 looked like a great improvement: no event at all on 3 of 3 seeds with the defaults
(a dead network at chance, silently). Now both configurations roll back and end where the healthy run does; a
healthy maximising run gets no action."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard, default_callbacks
from tests.models import make_trainer

STEPS = 500


class LikelihoodAscent(pl.LightningModule):
    def __init__(self, bug: bool) -> None:
        super().__init__()
        d = load_digits()
        g = torch.Generator().manual_seed(1)
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
        order = torch.randperm(len(x), generator=g)
        x, y = x[order], y[order]
        self.x, self.y, self.x_val, self.y_val = x[:1400], y[:1400], x[1400:], y[1400:]
        self.bug = bug
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(7)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64, shuffle=True, generator=g, drop_last=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return -F.cross_entropy(self.net(x), y)  # the log-likelihood, to be maximised

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, maximize=True)
        factor = (lambda s: 100.0 if s >= 300 else 1.0) if self.bug else (lambda s: 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def accuracy(self) -> float:
        with torch.no_grad():
            return float((self.net(self.x_val).argmax(1) == self.y_val).float().mean())


def _fit(tmp_path, callbacks, bug: bool) -> LikelihoodAscent:
    pl.seed_everything(0, verbose=False)
    model = LikelihoodAscent(bug)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks, max_steps=STEPS, max_epochs=-1, logger=False, deterministic=True).fit(model)
    return model


def _both(tmp_path, make, bug: bool) -> tuple[float, NaNGuard, LikelihoodAscent]:
    """The unguarded run's accuracy, then the guarded run's guard and model."""
    unguarded = _fit(tmp_path / "none", [], bug).accuracy()
    callbacks = [make()] if make is NaNGuard else make()
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    return unguarded, guard, _fit(tmp_path / "guarded", callbacks, bug)


@pytest.mark.parametrize("make", [NaNGuard, default_callbacks], ids=["NaNGuard", "default_callbacks"])
def test_a_maximised_objective_that_diverges_is_rolled_back(tmp_path, make) -> None:
    unguarded, guard, model = _both(tmp_path, make, bug=True)
    assert unguarded < 0.3  # the bug kills the run (chance is 0.1)
    assert [e["kind"] for e in guard.events if e["kind"] == "rollback"], guard.events  # never silent, and acted
    assert model.accuracy() > 0.9


@pytest.mark.parametrize("make", [NaNGuard, default_callbacks], ids=["NaNGuard", "default_callbacks"])
def test_a_healthy_maximising_run_is_left_alone(tmp_path, make) -> None:
    unguarded, guard, model = _both(tmp_path, make, bug=False)
    assert [e for e in guard.events if e["kind"] != "warn"] == []
    assert model.accuracy() >= unguarded - 0.02
