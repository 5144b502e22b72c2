"""Which Lightning strategies the gradguard callbacks support, checked once at setup.

Supported and tested: single device (CPU/GPU) and data parallel (``ddp``, ``ddp_spawn``, ``ddp_fork``, ...), where
every rank holds full, identical gradients at ``on_before_optimizer_step``. Sharded strategies (FSDP, DeepSpeed,
ModelParallel) hold slices of the gradients: :func:`~lightning_gradguard.core.grad_stats.compute_grad_stats` can
combine per-shard statistics across ranks (its ``reduce`` argument), but that path has not been tested on a GPU
machine yet, so the callbacks refuse those strategies plainly instead of reporting per-rank partial norms.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

__all__ = ["SUPPORTED_STRATEGIES", "check_supported_strategy"]

SUPPORTED_STRATEGIES = "single-device and DDP-family strategies (ddp, ddp_spawn, ddp_fork, ddp_notebook)"


def check_supported_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise a clear error when ``trainer`` uses a strategy ``owner`` cannot measure correctly.

    Raises:
        RuntimeError: for sharded strategies (FSDP, DeepSpeed, model parallel) and unknown custom ones that shard.
    """
    strategy = trainer.strategy
    # by class name, and before the isinstance test: DeepSpeedStrategy is a subclass of DDPStrategy
    names = [cls.__name__ for cls in type(strategy).__mro__]
    sharded = any(key in n for n in names for key in ("FSDP", "DeepSpeed", "ModelParallel", "XLA"))
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not sharded:
        return
    name = type(strategy).__name__
    if sharded:
        raise RuntimeError(
            f"{owner} does not support {name} yet: it shards gradients across ranks, and gradguard's sharded-norm "
            f"path is untested there. Supported: {SUPPORTED_STRATEGIES}."
        )
