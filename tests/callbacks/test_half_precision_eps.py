"""Weights kept in float16 (``precision="16-true"``) with Adam's default eps: the guard says why the run dies.

Adam divides by ``sqrt(v) + eps`` in the parameters' dtype; eps=1e-8 is 0 in float16 and small gradients' second
moments underflow, so the first updates write inf/NaN into the weights. Without gradguard such a fit ends with NaN
weights and no word; before, the defaults rolled back three times (cutting the LR, which was not at fault) and halted
with "nonfinite params" and nothing else. Now the guard warns when the fit starts and every event about the
non-finite weights, the halt's ``DivergenceError`` and its report name the cause and the fix; its rollbacks keep the
LR (the division by eps comes before the LR scales the update).
"""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import DivergenceError, NaNGuard, default_callbacks
from tests.models import make_trainer


class HalfRegression(pl.LightningModule):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(512, 8, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(8, 1, generator=g))
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        self.eps = eps

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x.to(self.dtype)).float(), y)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=self.eps)


def _fit(tmp_path, module, callbacks, precision="16-true", steps=40):
    trainer = make_trainer(tmp_path, callbacks, max_steps=steps, logger=False, precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = None
        try:
            trainer.fit(module)
        except DivergenceError as e:
            error = e
    return trainer, error, [str(w.message) for w in caught]


def _params_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_without_gradguard_the_run_dies_silently(tmp_path):
    module = HalfRegression()
    _, error, _ = _fit(tmp_path, module, [], steps=20)
    assert error is None
    assert not _params_finite(module)  # what the guard has to explain


def test_the_defaults_warn_at_start_and_the_halt_names_the_cause(tmp_path):
    module = HalfRegression()
    callbacks = default_callbacks()
    trainer, error, messages = _fit(tmp_path, module, callbacks)
    start = [m for m in messages if "eps=1e-08 rounds to 0 in float16" in m]
    assert start
    assert "Adam (optimizer 0, param group 0)" in start[0]
    assert "16-mixed" in start[0]
    assert isinstance(error, DivergenceError)
    assert "possible cause" in str(error)
    assert "eps=1e-08 rounds to 0 in float16" in str(error)
    guard = next(cb for cb in callbacks if isinstance(cb, NaNGuard))
    faults = [e for e in guard.events if e["cause"] == "nonfinite_params"]
    assert faults
    assert all("eps=1e-08" in e["reason"] for e in faults)
    # a lower LR cannot undo a division by eps: every rollback restores the state at the run's LR
    assert [e["kind"] for e in faults][-1] == "halt"
    assert all(float(e["lr_scale"]) == 1.0 for e in faults)
    assert all("LR kept" in e["reason"] for e in faults if e["kind"] == "rollback")
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert _params_finite(module)  # halted in the last trusted state
    with open(guard.report_path) as f:
        report = json.load(f)
    assert "eps=1e-08 rounds to 0 in float16" in report["reason"]


def test_a_safe_eps_or_float32_or_bfloat16_weights_give_no_warning(tmp_path):
    for precision, eps in (("16-true", 1e-4), ("bf16-true", 1e-8), ("32-true", 1e-8), ("bf16-mixed", 1e-8)):
        module = HalfRegression(eps=eps)
        guard = NaNGuard()
        trainer, error, messages = _fit(tmp_path / precision, module, [guard], precision=precision)
        assert error is None, precision
        assert not [m for m in messages if "rounds to 0" in m or "overflows" in m], precision
        assert trainer.global_step == 40, precision
        assert _params_finite(module), precision
        assert not [e for e in guard.events if e["cause"].startswith("nonfinite")], precision


@pytest.mark.parametrize("eps", [1e-6])
def test_an_eps_whose_reciprocal_overflows_is_named_too(tmp_path, eps):
    _, _, messages = _fit(tmp_path, HalfRegression(eps=eps), [NaNGuard()], steps=2)
    assert [m for m in messages if f"eps={eps:g} is below 1.53e-05" in m and "overflows float16" in m]
