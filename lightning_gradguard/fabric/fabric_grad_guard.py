"""FabricGradGuard: :class:`~lightning_gradguard.plain.GradGuard` wired to a ``lightning.fabric.Fabric``.

Fabric leaves the loop to you, so the guard is the plain-loop guard; this class only takes from the Fabric what the
guard needs: the GradScaler of a ``16-mixed`` precision plugin, the cross-rank reduce (``fabric.all_reduce`` with
MAX, so DDP ranks agree on every decision), and the global rank, so that only rank zero announces events and writes
to the ``SummaryWriter``. The optimizers and the model may be the objects ``fabric.setup`` returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn

from lightning_gradguard.plain._distributed import Reduce
from lightning_gradguard.plain.grad_guard import GradGuard

__all__ = ["FabricGradGuard"]


class FabricGradGuard(GradGuard):
    r"""The plain-loop guard for a Fabric loop.

    Always call ``optimizer.step()`` (Fabric's wrapper also updates its GradScaler there); a step the guard
    refused has no gradients left, so the update changes nothing::

        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp"); fabric.launch()
        model, optimizer = fabric.setup(model, optimizer)
        guard = FabricGradGuard(fabric, model, optimizer, scheduler, clipping="zscore")
        for x, y in fabric.setup_dataloaders(loader):
            loss = loss_fn(model(x), y)
            fabric.backward(loss)
            guard.before_step(loss)   # measure, clip, decide (same answer on every rank)
            optimizer.step()
            scheduler.step()
            guard.after_step()
            optimizer.zero_grad()

    Events are announced as ``GradGuard`` announces them (the same line, with ``FabricGradGuard`` as the owner), on
    global rank zero only, through the ``lightning_gradguard.fabric`` logger. ``fabric.clip_gradients`` after
    ``before_step`` is fine under ``16-mixed``: the GradScaler does not unscale the gradients a second time.

    Args:
        fabric: the launched ``Fabric``.
        model, optimizers, schedulers: as for :class:`~lightning_gradguard.plain.GradGuard` (Fabric wrappers are
            fine).
        writer: a ``SummaryWriter``; used on global rank zero only (other ranks may pass it too).
        **kwargs: every other :class:`~lightning_gradguard.plain.GradGuard` argument (``clipping``, ``action``,
            ``lr_factor``, ``announce``, ``lr_overwrite``, ...).

    Raises:
        TypeError: ``fabric`` is not a ``Fabric``; other arguments as for ``GradGuard``.
    """

    def __init__(
        self,
        fabric: Fabric,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        schedulers: Any = (),
        *,
        writer: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(fabric, Fabric):
            raise TypeError(f"FabricGradGuard: fabric must be a lightning.fabric.Fabric, got {type(fabric).__name__}")
        taken = sorted({"scaler", "all_reduce_max", "process_group"} & set(kwargs))
        if taken:
            raise TypeError(
                f"FabricGradGuard: {', '.join(taken)} come{'s' if len(taken) == 1 else ''} from the Fabric (its "
                "precision plugin's GradScaler, its all_reduce over its processes): do not pass them"
            )
        self.fabric = fabric
        scaler = getattr(fabric.strategy.precision, "scaler", None)
        reduce = self._all_reduce_max if fabric.world_size > 1 else None
        super().__init__(
            model,
            optimizers,
            schedulers,
            scaler,
            writer=writer if fabric.is_global_zero else None,
            all_reduce_max=reduce,
            **kwargs,
        )

    _logger_name: ClassVar[str] = "lightning_gradguard.fabric"

    def _global_rank(self, process_group: Any, all_reduce_max: Reduce | None) -> int | None:
        return int(self.fabric.global_rank)

    def _all_reduce_max(self, t: Tensor) -> Tensor:
        return torch.as_tensor(self.fabric.all_reduce(t.to(self.fabric.device), reduce_op="max"))
