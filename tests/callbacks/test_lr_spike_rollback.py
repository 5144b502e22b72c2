"""A schedule that raises the LR for a few steps (a warm restart to a huge LR, a scheduler bug: x600 for steps
300-309) kills a ReLU MLP's units: unguarded it ends at chance. The rollback restores the scheduler with the model,
so the same steps raise the LR again: before, the defaults rolled back, met the spike a second time and ended dead at
chance (seed 0) with dead-network warnings only. Now a divergence whose rollback finds that the schedule had raised
the LR 2x or more since the restored state holds the LR at the restored state's (cut) LR while the schedule would
raise it, until the LR recovers: one rollback, and the run ends where a run without the spike ends."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard, default_callbacks
from tests.models import make_trainer

pytest.importorskip("sklearn")
STEPS = 450


def _gen(seed: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1000 + salt)
    return g


class SpikedSchedule(pl.LightningModule):
    def __init__(self, seed: int, spike: bool = True) -> None:
        super().__init__()
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
        p = torch.randperm(len(x), generator=_gen(seed, 1))
        x, y = x[p], y[p]
        self.x, self.y, self.x_val, self.y_val = x[:1400], y[:1400], x[1400:], y[1400:]
        self.seed, self.spike = seed, spike
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def train_dataloader(self):
        g = _gen(self.seed, 7)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64, shuffle=True, generator=g, drop_last=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        spike = self.spike
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 600.0 if spike and 300 <= s < 310 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def accuracy(self) -> float:
        with torch.no_grad():
            return float((self.net(self.x_val).argmax(1) == self.y_val).float().mean())


def _fit(tmp_path, callbacks, spike: bool = True, seed: int = 0, cls: type = SpikedSchedule, steps: int = STEPS):
    pl.seed_everything(seed, verbose=False)
    model = cls(seed, spike)
    make_trainer(tmp_path, callbacks, max_steps=steps, logger=False, max_epochs=-1, deterministic=True).fit(model)
    return model


@pytest.mark.parametrize("make", [NaNGuard, default_callbacks], ids=["NaNGuard", "default_callbacks"])
def test_a_few_steps_of_a_huge_scheduled_lr_are_rolled_back_once_and_held_off(tmp_path, make) -> None:
    unguarded = _fit(tmp_path / "none", []).accuracy()
    healthy = _fit(tmp_path / "healthy", [], spike=False).accuracy()
    assert unguarded < 0.3 < 0.9 < healthy  # the spike kills the network; without it the run learns
    callbacks = [make()] if make is NaNGuard else make()
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    model = _fit(tmp_path / "guarded", callbacks)
    actions = [e for e in guard.events if e["kind"] != "warn"]
    assert [e["kind"] for e in actions] == ["rollback"]
    assert 300 <= actions[0]["step"] < 312
    assert "the schedule had raised the LR before the divergence" in actions[0]["reason"]
    assert model.accuracy() > healthy - 0.05
