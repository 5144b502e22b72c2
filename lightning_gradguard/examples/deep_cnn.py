"""A deep plain CNN on scikit-learn's digits: deep stacks without normalisation or shortcuts are hard to train.

Without batch normalisation (Ioffe & Szegedy, 2015) or residual connections (He et al., 2016), gradients through
a deep stack of convolutions shrink or grow geometrically with depth (Glorot & Bengio, 2010), and a learning rate
that a shallow net tolerates makes the deep one blow up. The remedies the literature names are options here:
``init="he"`` (He et al., 2015) or ``"xavier"`` (Glorot & Bengio, 2010), ``batch_norm=True`` and ``residual=True``
(and, outside the model, gradient clipping and a lower LR, which is what gradguard automates).

The data are scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``, 1797 images, 10 classes; no
download). The model logs ``train_loss`` (per step and per epoch), ``val_acc`` and ``test_acc`` (torchmetrics
:class:`~torchmetrics.classification.MulticlassAccuracy`).
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_gradguard.examples.data import TensorSplitsDataModule, check_fault

__all__ = ["DeepPlainCNN", "DigitsDataModule", "load_digits_tensors"]

NUM_CLASSES = 10


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(images (1797, 1, 8, 8) scaled to [0, 1], labels (1797,))``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The deep-CNN example needs scikit-learn for its bundled digits data set: "
            "pip install 'lightning-gradguard[examples]' (or pip install scikit-learn)"
        ) from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


class DigitsDataModule(TensorSplitsDataModule):
    """scikit-learn's 8x8 digits, split by a seeded permutation into train / validation / test.

    Args:
        val_fraction: share of the images used for validation (the same share again is the test set).
        batch_size: batch size of all loaders.
        seed: seed of the split and of the training-set shuffling.
        fault_batch: inject a fault: the training batch of this index (counted from 0 over the fit) has its images
            multiplied by ``fault_scale`` (None: no fault). See :class:`TensorSplitsDataModule`.
        fault_scale: the factor of the faulty batch's inputs.
    """

    eval_batch_size = 512

    def __init__(
        self,
        val_fraction: float = 0.15,
        batch_size: int = 64,
        seed: int = 0,
        fault_batch: int | None = None,
        fault_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        check_fault(fault_batch, fault_scale)
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.fault_batch = fault_batch
        self.fault_scale = float(fault_scale)

    def build_splits(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        x, y = load_digits_tensors()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(y) * self.val_fraction)
        val, test, train = perm[:n_val], perm[n_val : 2 * n_val], perm[2 * n_val :]
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test])


class _ConvBlock(nn.Module):
    def __init__(self, channels: int, batch_norm: bool, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        return self.act(out + x) if self.residual else self.act(out)


class DeepPlainCNN(pl.LightningModule):
    """``depth`` 3x3 convolutions of constant width with ReLU, global average pooling and a linear classifier.

    Args:
        depth: number of convolution layers (>= 2; the example's point needs about 20 or more).
        channels: width of every convolution.
        lr: learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        init: ``"default"`` (PyTorch's Kaiming-uniform with a=sqrt(5), which shrinks activations with depth),
            ``"he"`` (Kaiming-normal for ReLU; He et al. 2015) or ``"xavier"`` (Glorot & Bengio 2010).
        batch_norm: add batch normalisation after every convolution (Ioffe & Szegedy 2015).
        residual: add an identity shortcut around every convolution after the first (He et al. 2016).
    """

    def __init__(
        self,
        depth: int = 24,
        channels: int = 16,
        lr: float = 0.05,
        optimizer: Literal["sgd", "adam"] = "sgd",
        init: Literal["default", "he", "xavier"] = "default",
        batch_norm: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(f"depth must be an int >= 2, got {depth!r}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if init not in ("default", "he", "xavier"):
            raise ValueError(f"init must be 'default', 'he' or 'xavier', got {init!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.save_hyperparameters()
        self.lr = lr
        self.optimizer_name = optimizer
        stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU())
        blocks = [_ConvBlock(channels, batch_norm, residual) for _ in range(depth - 1)]
        self.features = nn.Sequential(stem, *blocks)
        self.classifier = nn.Linear(channels, NUM_CLASSES)
        if init != "default":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    if init == "he":
                        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    else:
                        nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
