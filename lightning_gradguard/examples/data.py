"""The data-module plumbing both examples share: three in-memory tensor splits, built on first use, and an optional
injected fault (one training batch whose inputs arrive scaled)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

__all__ = ["TensorSplitsDataModule", "check_fault"]


def check_fault(fault_batch: int | None, fault_scale: float) -> None:
    """Refuse a bad fault specification (``ValueError`` naming the argument)."""
    if fault_batch is not None and (
        isinstance(fault_batch, bool) or not isinstance(fault_batch, int) or fault_batch < 0
    ):
        raise ValueError(f"fault_batch must be None or an int >= 0, got {fault_batch!r}")
    if isinstance(fault_scale, bool) or not isinstance(fault_scale, (int, float)) or not math.isfinite(fault_scale):
        raise ValueError(f"fault_scale must be a finite number, got {fault_scale!r}")


class TensorSplitsDataModule(pl.LightningDataModule):
    """Train/val/test :class:`~torch.utils.data.TensorDataset` splits built once by :meth:`build_splits`.

    Subclasses set ``batch_size`` and ``seed`` and implement :meth:`build_splits`. The loaders build the splits on
    demand, so a module works with or without ``setup`` having been called (LightningCLI, plain scripts, tests).
    Training batches are shuffled with a generator seeded from ``seed + 1`` and the last partial batch is dropped;
    evaluation uses ``eval_batch_size``.

    **Injected fault**: with ``fault_batch`` set (subclasses take it as an argument), the training batch of that index,
    counted from 0 over the whole fit (across epochs, from the last :meth:`train_dataloader` call), has its inputs
    multiplied by ``fault_scale``: a unit error upstream, as long real runs meet now and then. The dataset itself is
    never changed, and the same batch is corrupted with or without gradguard (the fault is in the data stream, not in
    a callback). Counted in the loading process: with ``num_workers=0``, as the examples use.
    """

    eval_batch_size = 256

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 64
        self.seed = 0
        self.fault_batch: int | None = None
        self.fault_scale = 1000.0
        self.batches_served = 0
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

    def _collate_train(self, samples: list[Any]) -> Any:
        batch = default_collate(samples)
        if self.batches_served == self.fault_batch:
            batch = [batch[0] * self.fault_scale, *batch[1:]]
        self.batches_served += 1
        return batch

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed + 1)
        self.batches_served = 0
        return DataLoader(
            self._split("train_set"),
            batch_size=self.batch_size,
            shuffle=True,
            generator=g,
            drop_last=True,
            collate_fn=self._collate_train,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._split("val_set"), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._split("test_set"), batch_size=self.eval_batch_size)
