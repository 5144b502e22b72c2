"""Where gradguard's callbacks write: scalars to every logger, histograms/images/text to TensorBoard loggers only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["log_scalars", "tag", "tensorboard_writers"]


def tag(name: str, optimizer_idx: int = 0) -> str:
    """The TensorBoard tag ``gradguard/<name>``; optimizers after the first get ``_opt<i>`` appended."""
    return f"gradguard/{name}" if optimizer_idx == 0 else f"gradguard/{name}_opt{optimizer_idx}"


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
    """Send scalars to every logger of the Trainer (loggers only write on global rank zero)."""
    if not metrics or trainer.global_rank != 0:
        return
    values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of each TensorBoardLogger, on global rank zero; empty elsewhere."""
    if trainer.global_rank != 0:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_text(trainer: pl.Trainer, name: str, text: str, step: int) -> None:
    """Write ``text`` under tag ``name`` to every TensorBoard logger (rank zero) and flush it to disk."""
    for writer in tensorboard_writers(trainer):
        writer.add_text(name, text, global_step=step)
        writer.flush()


__all__ += ["log_text"]
