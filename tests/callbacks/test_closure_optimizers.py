"""An optimizer that evaluates its closure several times per step (LBFGS with a line search) is judged on the first
evaluation only (issue 24).

Lightning runs ``training_step``, ``backward`` and ``on_before_optimizer_step`` at every closure evaluation. LBFGS's
strong-Wolfe line search probes trial points whose losses can be 1e5x the step's own (13701, 527, 60 inside a step that
ends at 0.03 on this model): judged as consecutive steps they read as a divergence, and the guard rolled a healthy run
back with the LR halved. The guard now judges the loss and gradient at the step's own weights and leaves the trial
points to the optimizer: the guarded run is the unguarded run, bitwise.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard
from tests.models import make_trainer


class _LBFGSDigits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        self.train_set, self.val = TensorDataset(x[order[:1400]], y[order[:1400]]), (x[order[1400:]], y[order[1400:]])
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        self.closure_losses: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.closure_losses.setdefault(self.trainer.global_step, []).append(float(loss))
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4, history_size=10, line_search_fn="strong_wolfe")


def _fit(tmp_path, callbacks: list) -> _LBFGSDigits:  # noqa: ANN001
    pl.seed_everything(0, verbose=False)
    model = _LBFGSDigits()
    make_trainer(tmp_path, callbacks, max_steps=200, logger=False, max_epochs=-1).fit(model)
    return model


def test_line_search_trial_points_are_not_steps(tmp_path):
    plain = _fit(tmp_path, [])
    # the case itself: some step's line search probes a loss far above the step's own
    assert any(max(v) > 1000 * v[0] for v in plain.closure_losses.values())
    guard = NaNGuard()
    guarded = _fit(tmp_path, [guard])
    assert [e for e in guard.events if e["kind"] != "warn"] == []
    assert guarded.trainer.optimizers[0].param_groups[0]["lr"] == 0.5
    for (name, a), b in zip(plain.state_dict().items(), guarded.state_dict().values()):
        assert torch.equal(a, b), name
