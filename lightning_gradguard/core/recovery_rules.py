"""Recovery rules shared by every guard (the Trainer's :class:`NaNGuard` and the plain-loop ``GradGuard``).

The guards differ in where they find the optimizers and schedulers, not in what they do to them. This module holds
the LR arithmetic of a recovery once, so that both apply the same cut:

- :func:`rollback_lr` runs after a snapshot was restored (which brought back the LR that snapshot had). It scales
  the LR so that it ends ``lr_factor ** lr_power`` times the LR in force *before* the rollback, never above the
  snapshot's own LR. ``lr_power`` comes from :class:`~lightning_gradguard.core.guard_policy.Decision`: a divergence
  that returns soon after a divergence rollback doubles it (a geometric search for a stable LR).
- :func:`lower_lr` is the stability controller's cut: one factor ``lr_factor`` on the current LR.

Both return the guard's new cumulative ``lr_scale`` (the product of all cuts so far), which snapshots record in
their ``meta["lr_scale"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_gradguard.core.lr_scaling import scale_lr

__all__ = ["lower_lr", "rollback_lr", "rollback_lr_factor"]


def rollback_lr_factor(lr_scale: float, snapshot_lr_scale: float, lr_factor: float, lr_power: int = 1) -> float:
    """The multiplier to apply on top of a restored snapshot's LR.

    The target scale is ``lr_scale * lr_factor ** lr_power`` (the scale before the rollback, cut); the snapshot's
    state already carries ``snapshot_lr_scale``, so the factor is the ratio, capped at 1 (a rollback never raises
    the LR, e.g. when the snapshot predates an earlier cut that proved insufficient).

    Example:
        >>> rollback_lr_factor(1.0, 1.0, 0.5)
        0.5
        >>> rollback_lr_factor(0.5, 1.0, 0.5, lr_power=2)
        0.125
    """
    return min(lr_scale * lr_factor**lr_power / snapshot_lr_scale, 1.0)


def rollback_lr(
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    lr_scale: float,
    snapshot_lr_scale: float,
    lr_factor: float,
    lr_power: int = 1,
) -> float:
    """Cut the LR of freshly restored ``optimizers``/``schedulers``; returns the new cumulative LR scale."""
    factor = rollback_lr_factor(lr_scale, snapshot_lr_scale, lr_factor, lr_power)
    scale_lr(optimizers, schedulers, factor)
    return snapshot_lr_scale * factor


def lower_lr(
    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], lr_scale: float, lr_factor: float
) -> float:
    """Multiply the current LR by ``lr_factor`` (a stability cut); returns the new cumulative LR scale."""
    scale_lr(optimizers, schedulers, lr_factor)
    return lr_scale * lr_factor
