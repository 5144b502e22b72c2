"""The data-module plumbing both examples share: three in-memory tensor splits, built on first use."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TensorSplitsDataModule"]


class TensorSplitsDataModule(pl.LightningDataModule):
    """Train/val/test :class:`~torch.utils.data.TensorDataset` splits built once by :meth:`build_splits`.

    Subclasses set ``batch_size`` and ``seed`` and implement :meth:`build_splits`. The loaders build the splits on
    demand, so a module works with or without ``setup`` having been called (LightningCLI, plain scripts, tests).
    Training batches are shuffled with a generator seeded from ``seed + 1`` and the last partial batch is dropped;
    evaluation uses ``eval_batch_size``.
    """

    eval_batch_size = 256

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 64
        self.seed = 0
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def build_splits(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()

    def _split(self, name: str) -> TensorDataset:
        if getattr(self, name) is None:
            self.setup()
        dataset: TensorDataset = getattr(self, name)
        return dataset

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed + 1)
        return DataLoader(
            self._split("train_set"), batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._split("val_set"), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._split("test_set"), batch_size=self.eval_batch_size)
