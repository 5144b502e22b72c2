"""Cross-rank agreement for the plain-loop guard: one max-reduce of a small vector per step, nothing without DDP.

Under ``torch.distributed`` every rank must take the same action at the same step (a rank that skips while another
steps would desynchronise the replicas). The guard stacks its few per-step scalars into one float64 vector and
reduces it with MAX: a NaN is first made +inf, since reductions may drop NaN. Without an initialised process group
(or with one process) nothing is communicated. Fabric users get the same through ``fabric.all_reduce``
(:class:`~lightning_gradguard.fabric.FabricGradGuard` passes it in).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradguard.core.guard._step_judge import any_rank
from lightning_gradguard.core.recover._replica_shards import ReplicaSharding

#: ``reduce(t) -> t`` taking the element-wise maximum over the ranks.
Reduce = Callable[[Tensor], Tensor]


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group`` (the default group when None); ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class MaxReducer:
    """Element-wise maximum of a float vector over the ranks (NaN counted as +inf).

    Args:
        reduce: a custom ``t -> max over ranks`` (e.g. Fabric's ``all_reduce``); None uses ``torch.distributed``.
        group: the process group for ``torch.distributed`` (None: the default group).
    """

    def __init__(self, reduce: Reduce | None = None, group: Any = None) -> None:
        self._reduce = reduce
        self.group = group

    @property
    def world_size(self) -> int:
        if self._reduce is not None:
            return 2  # unknown: always communicate (the custom reducer knows how many ranks there are)
        return rank_and_world(self.group)[1]

    def __call__(self, local: Tensor) -> Tensor:
        """The maximum over ranks of ``local`` (float64); ``local`` itself with a single process."""
        if self.world_size <= 1:
            return local
        # posinf/neginf kept: nan_to_num would otherwise turn +inf (and the NaN made +inf) into the largest finite float
        t = torch.nan_to_num(local.detach().to(torch.float64).clone(), nan=math.inf, posinf=math.inf, neginf=-math.inf)
        if self._reduce is not None:
            return self._reduce(t).to(torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def any(self, *flags: bool, device: torch.device | None = None) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks (one reduce; free on a single process)."""
        return any_rank(self, *flags, device=device)


def replica_sharding(model: torch.nn.Module, group: Any = None) -> ReplicaSharding | None:
    """Where a ``DistributedDataParallel`` model (under any wrappers, e.g. Fabric's) keeps one replica per rank:
    this rank's place in ``group`` for split snapshots; None without DDP, with one rank, or with sharded (DTensor)
    parameters. Under NCCL the collective runs on the current CUDA device."""
    rank, world = rank_and_world(group)
    if world <= 1:
        return None
    inner: Any = model
    while isinstance(inner, torch.nn.Module) and not isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        wrapped = getattr(inner, "module", None)
        inner = wrapped if isinstance(wrapped, torch.nn.Module) and wrapped is not inner else None
    if not isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return None
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    return ReplicaSharding(rank, world, group, device)
