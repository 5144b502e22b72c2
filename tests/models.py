"""Small Lightning modules and Trainer factories shared by the tests (a BoringModel of our own)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 64, in_dim: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 8, in_dim: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(regression_data(n, in_dim, seed), batch_size=batch_size, shuffle=False)


class TinyRegression(pl.LightningModule):
    """An MLP regressor with fault injection by optimizer step.

    Args:
        nan_at_steps: global steps at which the loss is multiplied by NaN (a fault of the step).
        inf_at_steps: global steps at which the loss is multiplied by inf.
        loss_scale_at: {step: factor} multiplies the loss at that step (a spike).

    Each fault is injected once per step, in the step's own ``training_step``: the guard's rerun of the step (same
    state, batch, random numbers and ``global_step``) computes the clean loss, so these faults are diagnosed
    *transient*, like the bit flips they stand for (tests of the other diagnoses corrupt the batch or the weights).
        scheduler: a callable ``optimizer -> scheduler`` or None; ``scheduler_config`` is merged into the
            Lightning scheduler dict (e.g. ``{"interval": "step"}``).
    """

    def __init__(
        self,
        in_dim: int = 8,
        hidden: int = 16,
        depth: int = 2,
        lr: float = 0.01,
        optimizer: str = "adam",
        scheduler: Any = None,
        scheduler_config: Mapping[str, Any] | None = None,
        nan_at_steps: Iterable[int] = (),
        inf_at_steps: Iterable[int] = (),
        loss_scale_at: Mapping[int, float] | None = None,
        activation: type[nn.Module] = nn.Tanh,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), activation()]
            d = hidden
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.optimizer_name = optimizer
        self.scheduler = scheduler
        self.scheduler_config = dict(scheduler_config or {"interval": "step"})
        self.nan_at_steps = set(nan_at_steps)
        self.inf_at_steps = set(inf_at_steps)
        self.loss_scale_at = dict(loss_scale_at or {})
        self.losses: list[float] = []
        self._injected: set[int] = set()  # steps whose fault was injected (once: a rerun sees the clean loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        step = self.global_step
        if step not in self._injected:
            if step in self.nan_at_steps or step in self.inf_at_steps or step in self.loss_scale_at:
                self._injected.add(step)
            if step in self.nan_at_steps:
                loss = loss * float("nan")
            if step in self.inf_at_steps:
                loss = loss * float("inf")
            if step in self.loss_scale_at:
                loss = loss * self.loss_scale_at[step]
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        elif self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        else:
            raise ValueError(self.optimizer_name)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), **self.scheduler_config}}

    def train_dataloader(self) -> DataLoader:
        return loader()


def make_trainer(tmp_path: Any, callbacks: list[pl.Callback], max_steps: int = 10, logger: Any = True, **kwargs: Any):
    """A quiet CPU Trainer; ``logger=True`` means a TensorBoardLogger under ``tmp_path``."""
    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def guarded_run(root: Any, max_steps: int = 40) -> Any:
    """A short real run with the three gradguard callbacks, logged under ``root``; returns ``root``.

    TinyRegression with a NaN batch at step 20 and 100x loss spikes at steps 25 and 30 (the report and CLI tests).
    """
    from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard

    model = TinyRegression(nan_at_steps=[20], loss_scale_at={25: 100.0, 30: 100.0})
    callbacks = [
        GradientNormMonitor(),
        AdaptiveGradientClipping("zscore", warmup_steps=5),
        NaNGuard(action="rollback", snapshot_every_n_steps=5, snapshot_confirm_steps=2),
    ]
    trainer = make_trainer(root, callbacks, max_steps=max_steps, log_every_n_steps=1)
    trainer.fit(model)
    return root
