"""Per-Trainer context shared by the gradguard callbacks: parameter names and the once-per-step statistics cache.

Every gradguard callback asks :func:`grad_stats_for` for the statistics of the optimizer being stepped. The first
caller in a step computes them; the others get the same object, whatever the callback order. The measurement is
taken before any clipping (callbacks that clip do so after asking), so "grad_norm" is always the pre-clip norm.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_gradguard.core.grad_stats import GradStats, compute_grad_stats
from lightning_gradguard.core.step_cache import StepStatsCache

__all__ = ["TrainerContext", "context_for", "grad_stats_for", "optimizer_index", "unwrap_optimizer"]


class TrainerContext:
    """What the gradguard callbacks of one Trainer share."""

    def __init__(self) -> None:
        self.cache = StepStatsCache()
        self._names: dict[int, str] | None = None
        self._names_owner: weakref.ref[Any] | None = None

    def param_names(self, pl_module: torch.nn.Module) -> dict[int, str]:
        if self._names is None or self._names_owner is None or self._names_owner() is not pl_module:
            self._names = {id(p): n for n, p in pl_module.named_parameters()}
            self._names_owner = weakref.ref(pl_module)
        return self._names

    def reset(self) -> None:
        self.cache.invalidate()
        self._names = None
        self._names_owner = None


_CONTEXTS: weakref.WeakKeyDictionary[Any, TrainerContext] = weakref.WeakKeyDictionary()


def context_for(trainer: pl.Trainer) -> TrainerContext:
    ctx = _CONTEXTS.get(trainer)
    if ctx is None:
        ctx = _CONTEXTS[trainer] = TrainerContext()
    return ctx


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The raw torch optimizer behind a ``LightningOptimizer`` (state operations must use the raw one)."""
    return getattr(optimizer, "_optimizer", optimizer)


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not found)."""
    raw = unwrap_optimizer(optimizer)
    for i, opt in enumerate(trainer.optimizers):
        if opt is raw:
            return i
    return 0


def step_key(trainer: pl.Trainer) -> Hashable:
    """Identifies one optimizer step of a fit (global_step counts every optimizer step, manual ones included)."""
    return trainer.global_step


def grad_stats_for(
    trainer: pl.Trainer, pl_module: torch.nn.Module, optimizer: Any, norm_type: float = 2.0
) -> GradStats:
    """The gradient statistics of ``optimizer``'s parameters at the current step, computed once per step."""
    ctx = context_for(trainer)
    raw = unwrap_optimizer(optimizer)
    norm_type = float(norm_type)

    def compute() -> GradStats:
        names = ctx.param_names(pl_module)
        params = [p for group in raw.param_groups for p in group["params"]]
        labels = [names.get(id(p), f"param_{i}") for i, p in enumerate(params)]
        return compute_grad_stats(params, labels, norm_type)

    return ctx.cache.get((id(raw), norm_type if norm_type != math.inf else "inf"), step_key(trainer), compute)
