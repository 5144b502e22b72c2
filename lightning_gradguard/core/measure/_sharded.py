"""Norms of sharded tensors (``torch.distributed.tensor.DTensor``, as FSDP2 and tensor parallelism produce them).

Each rank measures its own local shard with the ordinary multi-tensor kernels; the per-tensor results are then
combined across the ranks that hold the other pieces, with one all-reduce per group of tensors sharing a layout's
process groups (in practice: one per step for FSDP2). No tensor is ever gathered, only per-tensor norms.

How a per-tensor p-norm combines depends on the tensor's placement on each mesh dimension:

- ``Shard``/strided shards: the elements are split across that dimension's ranks, so the p-th powers of the local
  norms are summed (maxima taken for ``p = inf``) over that dimension's process group;
- ``Replicate``: every rank holds the same elements, nothing to combine (summing would count them twice);
- ``Partial``: the values are pending a sum and their norm cannot be taken from the pieces, so it is refused.

When every tensor is sharded alike over one process group that holds every rank (FSDP2 over the whole world, the
usual case), :func:`gather_norms` combines several vectors of local norms *and* a small vector of other values in
one ``all_gather``: the norms are summed (as p-th powers) or maxed locally, the other values maxed. That is how the
guard's step values (loss, flags) travel with the measurement instead of in a second collective.

Every function here that reduces is a collective: every rank of the groups involved must call it at the same point
with tensors of the same layouts (the callbacks do, since they run the same hooks on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

try:  # torch builds without distributed support have no DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - such builds cannot shard either
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor) -> bool:
    """Is ``t`` a ``DTensor`` (possibly only replicated, in which case its norms need no communication)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_view(t: Tensor) -> Tensor:
    """This rank's piece of ``t`` (``t`` itself when it is a plain tensor). It shares ``t``'s storage, so in-place
    operations on it (clipping) change the ``DTensor``; elementwise ones (scaling by a common factor, clamping) are
    exact on shards."""
    return cast(Any, t).to_local() if is_sharded(t) else t


@dataclass(frozen=True)
class ShardLayout:
    """Which per-tensor norms must be combined across which process groups.

    Attributes:
        groups: ``(positions, process_groups)`` pairs: the norms at ``positions`` (in the list given to
            :func:`local_tensors`) are combined over each of ``process_groups`` in turn.
    """

    groups: tuple[tuple[tuple[int, ...], tuple[object, ...]], ...]


_UNSHARDED = ShardLayout(())


def local_tensors(tensors: Sequence[Tensor], names: Sequence[str] | None = None) -> tuple[list[Tensor], ShardLayout]:
    """The local pieces of ``tensors`` (plain tensors pass through) and how their norms combine across ranks.

    Raises:
        ValueError: a tensor with a ``Partial`` placement (pending reduction: its norm is not defined by the pieces).
    """
    if DTensor is None or not any(issubclass(cls, DTensor) for cls in set(map(type, tensors))):
        return list(tensors), _UNSHARDED  # the common case, decided from the few distinct types (isinstance is slow)
    local: list[Tensor] = []
    by_key: dict[tuple[int, tuple[int, ...]], tuple[object, list[int]]] = {}
    for i, t in enumerate(tensors):
        if not is_sharded(t):
            local.append(t)
            continue
        dt = cast(Any, t)  # a DTensor (placements, device_mesh, to_local)
        sharded_dims = []
        for dim, placement in enumerate(dt.placements):
            if placement.is_partial():
                name = names[i] if names is not None else f"tensor {i}"
                raise ValueError(
                    f"{name!r} is a DTensor with a Partial placement on mesh dimension {dim} ({dt.placements}); its "
                    "norm is only defined once the pending reduction ran. gradguard measures Shard and Replicate "
                    "placements."
                )
            if not placement.is_replicate():
                sharded_dims.append(dim)
        local.append(dt.to_local())
        if sharded_dims:
            key = (id(dt.device_mesh), tuple(sharded_dims))
            by_key.setdefault(key, (dt.device_mesh, []))[1].append(i)
    # tensors on distinct but equal meshes (FSDP2 may build a DTensor of an empty shard on another mesh object)
    # combine over the same process groups: one group, one collective, for them all
    merged: dict[tuple[object, ...], list[int]] = {}
    for (_, dims), (mesh, idx) in by_key.items():
        pgs = tuple(mesh.get_group(d) for d in dims)  # type: ignore[attr-defined]
        merged.setdefault(pgs, []).extend(idx)
    groups = tuple((tuple(sorted(idx)), pgs) for pgs, idx in merged.items())
    return local, ShardLayout(groups)


def reduce_norms(local_norms: Tensor, layout: ShardLayout, norm_type: float) -> Tensor:
    """Combine per-tensor norms of local shards (float64 vector) into the norms of the whole tensors.

    ``sum`` of p-th powers for finite ``p`` (NaN and inf propagate through the sum), ``max`` for ``p = inf`` (NaN is
    sent as inf first: a max may drop NaN, and either way the result is non-finite). Float64 throughout: p-th powers
    of norms of float32/bf16/fp16 gradients (at most ~1e48) stay finite in float64 for ``p <= 6``.
    """
    if not layout.groups:
        return local_norms
    if len(layout.groups) == 1 and len(layout.groups[0][0]) == local_norms.numel():
        # the common case (FSDP2: every tensor sharded alike): the whole vector at once, no index tensor to upload
        return _all_reduce_norms(local_norms, layout.groups[0][1], norm_type)
    out = local_norms.clone()
    for idx, pgs in layout.groups:
        index = torch.tensor(idx, dtype=torch.long, device=out.device)
        out.index_copy_(0, index, _all_reduce_norms(out.index_select(0, index), pgs, norm_type))
    return out


def _all_reduce_norms(part: Tensor, pgs: tuple[object, ...], norm_type: float) -> Tensor:
    if norm_type == math.inf:
        part = torch.where(torch.isnan(part), math.inf, part)
        for pg in pgs:
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=pg)
        return part
    part = part.pow(norm_type)
    for pg in pgs:
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=pg)
    return part.pow(1.0 / norm_type)


#: :func:`gather_norms` is used up to this many gathered float64 values (world size x vector length, 2 MiB); beyond
#: it the gather would move more than the separate all-reduces it replaces save, and the callers fall back to them.
GATHER_MAX_VALUES = 1 << 18


def world_group(layout: ShardLayout, n: int) -> object | None:
    """The process group of ``layout`` when all its ``n`` tensors are sharded alike over one group that holds every
    rank of the world (FSDP2 over all ranks), so that one collective over it reaches every rank; else None (no
    sharding, several groups, a multi-dimensional mesh, a group smaller than the world)."""
    if len(layout.groups) != 1:
        return None
    idx, pgs = layout.groups[0]
    if len(idx) != n or len(pgs) != 1:
        return None
    pg = pgs[0]
    if dist.get_world_size(pg) != dist.get_world_size():  # type: ignore[arg-type]
        return None
    return pg


def group_size(pg: object) -> int:
    """The number of ranks in process group ``pg``."""
    return int(dist.get_world_size(pg))  # type: ignore[arg-type]


def gather_norms(parts: Sequence[tuple[Tensor, float]], top: Tensor | None, pg: object) -> tuple[list[Tensor], Tensor]:
    """Combine local per-tensor norms and take an element-wise maximum over the ranks of ``pg``, in one all-gather.

    Args:
        parts: ``(local_norms, p)`` pairs, float64 vectors of this rank's per-tensor p-norms over a layout whose
            :func:`world_group` is ``pg``; each comes back as the norms of the whole tensors, as
            :func:`reduce_norms` gives them (sum of p-th powers, or maximum with NaN sent as inf for ``p = inf``).
        top: a float64 vector whose element-wise maximum over the ranks is wanted (None: none); a NaN in it
            propagates to the maximum (callers send NaN as inf, as they would to a MAX all-reduce).
        pg: the process group (every rank of the world).

    Returns:
        The combined norms of each part, and the maximum of ``top`` (empty when ``top`` is None).

    With two ranks the sums are those of an all-reduce bit for bit (one addition either way); with more, the p-th
    powers are added pairwise in rank order, which may differ from a backend's all-reduce in the last bit and is
    identical on every rank (every rank adds the same gathered values in the same order).
    """
    sent = []
    for norms, p in parts:
        sent.append(torch.where(torch.isnan(norms), math.inf, norms) if p == math.inf else norms.pow(p))
    if top is not None:
        sent.append(top.to(device=sent[0].device, dtype=torch.float64))
    local = torch.cat(sent)
    world = dist.get_world_size(pg)  # type: ignore[arg-type]
    rows = local.new_empty(world * local.numel())
    dist.all_gather_into_tensor(rows, local, group=pg)  # type: ignore[arg-type]
    rows = rows.view(world, local.numel())
    out: list[Tensor] = []
    start = 0
    for norms, p in parts:
        block = rows[:, start : start + norms.numel()]
        start += norms.numel()
        out.append(block.amax(0) if p == math.inf else _sum_rows(block).pow(1.0 / p))
    return out, rows[:, start:].amax(0)


def _sum_rows(rows: Tensor) -> Tensor:
    """The sum of the rows by pairwise element-wise additions (log2 of the world size of them): each addition is
    exact IEEE arithmetic with no kernel-chosen order, so every rank gets the same bits; two rows give ``r0 + r1``."""
    while rows.shape[0] > 1:
        even, odd = rows[0::2], rows[1::2]
        rows = even + odd if even.shape[0] == odd.shape[0] else torch.cat([even[:-1] + odd, even[-1:]])
    return rows[0]


def unit_norms(t: Tensor) -> Tensor:
    """Unit-wise L2 norms for AGC (Brock et al. 2021): one per output row (dim 0) of a tensor of 2+ dims, one for the
    whole tensor otherwise, for the rows this rank holds, as a local float64 tensor broadcastable against
    :func:`local_view` ``(t)``. Finite whenever the elements are (float64 sums of squares; on the CPU the rows are
    summed in the tensor's precision first and only a tensor with an overflowing row is summed again in float64).

    For a ``DTensor`` the per-row sums of squares of the local piece are summed over every mesh dimension that splits
    the rows' elements (a shard of dim >= 1, or any shard of a 0/1-dim tensor); a shard of dim 0 of a 2+-dim tensor
    keeps whole rows on each rank and needs nothing. A collective when something is summed (every rank must call it).
    """
    local = local_view(t).detach()
    dims = tuple(range(1, local.ndim)) if local.ndim > 1 else tuple(range(local.ndim))

    def squares(dtype: torch.dtype) -> Tensor:
        x = local.abs() if local.is_complex() else local
        return x.to(dtype).pow(2).sum(dim=dims, keepdim=local.ndim > 1, dtype=dtype)

    if local.device.type == "cpu":
        sq = squares(torch.float32).to(torch.float64)
        if bool(torch.isinf(sq).any()) and bool(torch.isfinite(local).all()):
            sq = squares(torch.float64)  # rare: a float32 row sum overflowed although every element is finite
    else:
        sq = squares(torch.float64)
    if is_sharded(t):
        dt = cast(Any, t)
        for dim, placement in enumerate(dt.placements):
            if placement.is_replicate() or placement.is_partial():
                continue
            if t.ndim > 1 and getattr(placement, "dim", None) == 0:
                continue  # whole rows on every rank
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=dt.device_mesh.get_group(dim))
    return sq.sqrt()
