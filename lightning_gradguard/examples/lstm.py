"""An LSTM on the adding problem: a small recurrent task whose gradients can explode.

The adding problem (Hochreiter & Schmidhuber, 1997, "Long Short-Term Memory", experiment 4) feeds a sequence of
pairs ``(value, marker)``: values are uniform in [0, 1], exactly two markers are 1 (one in each half of the
sequence), and the target is the sum of the two marked values. Pascanu, Mikolov & Bengio (2013, "On the difficulty
of training recurrent neural networks") use it to study exploding and vanishing gradients and the cure of norm
clipping. Always predicting 1.0 scores an MSE of 1/6 ~ 0.167 (the variance of a sum of two U(0, 1) values), so a
model that learns the task scores far below that.

The data are generated from a seed (no downloads). The model logs ``train_loss`` (per step and per epoch),
``val_mse`` and ``test_mse`` (torchmetrics :class:`~torchmetrics.MeanSquaredError`).
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics import MeanSquaredError

from lightning_gradguard.examples.data import TensorSplitsDataModule, check_fault

__all__ = ["AddingProblemDataModule", "AddingProblemLSTM", "adding_problem"]

BASELINE_MSE = 1.0 / 6.0  # predicting 1.0 always: Var(U1 + U2) = 2/12


def adding_problem(num: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` adding-problem sequences of length ``seq_len``: inputs ``(num, seq_len, 2)``, targets ``(num, 1)``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len!r}")
    values = torch.rand(num, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (num,), generator=generator)
    second = torch.randint(half, seq_len, (num,), generator=generator)
    markers = torch.zeros(num, seq_len)
    rows = torch.arange(num)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values * markers).sum(dim=1, keepdim=True)
    return x, y


class AddingProblemDataModule(TensorSplitsDataModule):
    """Generated adding-problem data: train, validation and test sets drawn from one seed.

    Args:
        seq_len: length of each sequence (>= 2); longer sequences make the task harder.
        num_train: training sequences.
        num_val: validation sequences (also used as the test set's size).
        batch_size: batch size of all loaders.
        seed: seed of the data generator and of the training-set shuffling.
        fault_batch: inject a fault: the training batch of this index (counted from 0 over the fit) has its inputs
            multiplied by ``fault_scale`` (None: no fault). See :class:`TensorSplitsDataModule`.
        fault_scale: the factor of the faulty batch's inputs.
    """

    def __init__(
        self,
        seq_len: int = 50,
        num_train: int = 4096,
        num_val: int = 512,
        batch_size: int = 64,
        seed: int = 0,
        fault_batch: int | None = None,
        fault_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        for name, value, low in (("seq_len", seq_len, 2), ("num_train", num_train, 1), ("num_val", num_val, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        check_fault(fault_batch, fault_scale)
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.num_train = num_train
        self.num_val = num_val
        self.batch_size = batch_size
        self.seed = seed
        self.fault_batch = fault_batch
        self.fault_scale = float(fault_scale)

    def build_splits(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        g = torch.Generator().manual_seed(self.seed)
        train = TensorDataset(*adding_problem(self.num_train, self.seq_len, g))
        val = TensorDataset(*adding_problem(self.num_val, self.seq_len, g))
        test = TensorDataset(*adding_problem(self.num_val, self.seq_len, g))
        return train, val, test


class AddingProblemLSTM(pl.LightningModule):
    """A one-layer LSTM reading the sequence; a linear head on the last hidden state predicts the sum.

    Args:
        hidden_size: LSTM width.
        lr: learning rate.
        optimizer: ``"sgd"`` (momentum 0.9, the classic RNN setting where gradients explode) or ``"adam"``.
        init: ``"default"`` (PyTorch's uniform init), ``"orthogonal"`` (orthogonal recurrent weights, a classic
            remedy for vanishing/exploding recurrent gradients; Saxe et al. 2014) or ``"xavier"``
            (Glorot & Bengio 2010) for the input weights with orthogonal recurrent weights.
        momentum: SGD momentum.
        head_bias: initial bias of the linear head; ``1.0`` (the target's mean) starts training at the baseline MSE
            of 1/6, ``None`` keeps PyTorch's default (a loss near ``1 + 1/6`` at the start).
    """

    def __init__(
        self,
        hidden_size: int = 32,
        lr: float = 0.01,
        optimizer: Literal["sgd", "adam"] = "sgd",
        init: Literal["default", "orthogonal", "xavier"] = "default",
        momentum: float = 0.9,
        head_bias: float | None = 1.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if init not in ("default", "orthogonal", "xavier"):
            raise ValueError(f"init must be 'default', 'orthogonal' or 'xavier', got {init!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.save_hyperparameters()
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.rnn = nn.LSTM(2, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        if head_bias is not None:  # 1.0, the target's mean: training starts at the baseline MSE of 1/6
            nn.init.constant_(self.head.bias, head_bias)
        if init != "default":
            for name, p in self.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    for chunk in p.data.chunk(4, dim=0):
                        nn.init.orthogonal_(chunk)
                elif name.startswith("weight_ih") and init == "xavier":
                    nn.init.xavier_uniform_(p)
                elif name.startswith("bias"):
                    nn.init.zeros_(p)
        self.val_mse = MeanSquaredError()
        self.test_mse = MeanSquaredError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_mse(self(x), y)
        self.log("val_mse", self.val_mse, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_mse(self(x), y)
        self.log("test_mse", self.test_mse)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
