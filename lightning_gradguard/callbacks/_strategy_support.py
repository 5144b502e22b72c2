"""What the gradguard callbacks support, checked once at setup: the strategy and the parameters.

Supported and tested (2-process CPU runs in ``tests/compat``):

- single device and data parallel (``ddp``, ``ddp_spawn``, ``ddp_fork``, ...): every rank holds full, identical
  gradients at ``on_before_optimizer_step``;
- ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``) and/or tensor parallelism: gradients
  and weights are ``DTensor``s; the statistics are measured on each rank's shard and combined with one collective
  (:mod:`lightning_gradguard.core.measure._sharded`), so every rank sees the global norms; with FSDP2 over every
  rank that one collective also carries the guard's loss and flags and a logging step's weight norms.

Refused, each with its own reason: Lightning's FSDP1 ``FSDPStrategy`` (flat sharded parameters; needs CUDA, so it
cannot be tested on a CPU machine), DeepSpeed (its engine owns clipping, loss scaling and the step) and XLA.

Parameters: sparse gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``) are refused, naming
the parameter; complex parameters are measured as complex norms (``|z|``).
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn

SUPPORTED_STRATEGIES = (
    "single-device, DDP-family strategies (ddp, ddp_spawn, ddp_fork, ddp_notebook) and ModelParallelStrategy "
    "(FSDP2 fully_shard and/or tensor parallel DTensors)"
)

#: Strategy class-name fragments refused, and why (by name: DeepSpeedStrategy subclasses DDPStrategy).
_REFUSED = {
    "DeepSpeed": "DeepSpeed's engine owns gradient clipping, loss scaling and the optimizer step",
    "FSDP": (
        "FSDP1 keeps flat sharded parameters and needs CUDA, so gradguard cannot test it here; use "
        "ModelParallelStrategy with torch's fully_shard (FSDP2) in configure_model instead"
    ),
    "XLA": "XLA strategies are not tested",
}


def check_supported_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise a clear error when ``trainer``'s strategy or its module's parameters cannot be measured correctly.

    Also runs :func:`check_parameters` on ``trainer.lightning_module`` when there is one (parameters created later,
    in ``configure_model``, are checked at the first measurement instead).

    Raises:
        RuntimeError: a refused strategy (FSDP1, DeepSpeed, XLA), with the reason and what is supported.
        ValueError: a parameter with a sparse gradient (see :func:`check_parameters`).
    """
    strategy = trainer.strategy
    names = [cls.__name__ for cls in type(strategy).__mro__]
    for key, reason in _REFUSED.items():
        if any(key in n for n in names):
            raise RuntimeError(
                f"{owner} does not support {type(strategy).__name__}: {reason}. Supported: {SUPPORTED_STRATEGIES}."
            )
    module = getattr(trainer, "lightning_module", None)
    if isinstance(module, nn.Module):
        check_parameters(module, owner)


def check_parameters(module: nn.Module, owner: str) -> None:
    """Refuse parameters whose gradients gradguard cannot measure, naming them: sparse ones.

    Raises:
        ValueError: a module producing sparse gradients (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``).
    """
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.sparse:
            param = f"{name}.weight" if name else "weight"
            raise ValueError(
                f"{owner}: parameter {param!r} gets sparse gradients ({type(sub).__name__}(sparse=True)); gradguard "
                f"measures dense gradients only. Allowed: sparse=False. Received: sparse=True."
            )
