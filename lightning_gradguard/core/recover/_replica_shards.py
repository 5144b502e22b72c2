"""Snapshots of a replicated state split over the ranks: each DDP rank keeps about 1/world of the bytes.

Under data parallelism every rank holds the same weights and optimizer state, so a snapshot copied whole on every
rank holds ``world`` identical copies per node: with Adam (fp32 weights and two moments, 12 bytes per parameter)
a 7 B-parameter model would need 84 GB of host memory per rank and per snapshot. Since the replicas are equal, one
copy split over the ranks is enough: all tensors of the state are laid end to end as one virtual byte string (in
the order a nested walk meets them), and rank ``r`` keeps the ``r``-th of ``world`` equal ranges of it, so its
share is ``ceil(bytes / world)`` whatever the sizes of the single tensors (one embedding larger than the rest put
together splits like everything else). The non-tensor part of the state (the nesting, step counters, LR lists,
hyperparameters) is small and kept whole on every rank.

Taking a split snapshot copies only the rank's own range (a healthy step pays less than for a whole copy and
communicates nothing). Reassembling it, only at a rollback, sends each rank's range to the others (one broadcast
per rank, each range copied into place as it arrives), after which every rank has the whole state back, bit for bit
(the bytes are copied, never converted). For that moment a rank holds one whole copy, as loading a checkpoint does;
between rollbacks it holds only its range of each snapshot. Every rank must ask for the whole state at the same time,
as the guard does: its decisions are the same on every rank.

The bytes, not the elements, are split, so a tensor of any dtype (fp32, bf16, int64 step counters, bool masks,
complex) can be cut anywhere and put back exactly.

Pure PyTorch (``torch.distributed``); the adapters say when the state is replicated and which device the
collective needs (a CUDA device under NCCL).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ReplicaSharding:
    """How a replicated state is split: this rank's index and the number of ranks holding the same replica.

    Args:
        rank: this process's rank in ``group``.
        world: the number of ranks in ``group`` (all holding the same state).
        group: the process group (None: the default group).
        device: where the collective's buffers must live (None: the CPU, as gloo wants; a CUDA device for NCCL).
    """

    rank: int
    world: int
    group: Any = None
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world), got rank={self.rank}, world={self.world}")


@dataclass(frozen=True)
class _Leaf:
    """Where one tensor of the state sits in the virtual byte string."""

    index: int


@dataclass
class _Layout:
    shapes: list[torch.Size] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    total: int = 0


def same_memory(t: torch.Tensor) -> tuple[Any, ...] | None:
    """A key equal for two tensors that are the same values in the same memory (``state_dict()`` gives tied
    weights as two tensor objects over one storage); None for an empty tensor (nothing to share)."""
    if hasattr(t, "to_local"):  # a DTensor: its local piece is what lives in this process's memory
        t = t.to_local()
    if not t.numel():
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _skeleton(obj: Any, tensors: list[torch.Tensor], seen: dict[Any, int] | None = None) -> Any:
    """``obj`` with every tensor replaced by a :class:`_Leaf` (appended to ``tensors`` in walk order; a tensor met
    twice, e.g. tied weights, is stored once and both places get it back); other leaves are deep-copied,
    containers rebuilt (``OrderedDict`` and a ``state_dict``'s ``_metadata`` kept)."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = same_memory(obj)
        if key is None or key not in seen:
            if key is not None:
                seen[key] = len(tensors)
            tensors.append(obj.detach())
            return _Leaf(len(tensors) - 1)
        return _Leaf(seen[key])
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _skeleton(v, tensors, seen)
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [_skeleton(v, tensors, seen) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_skeleton(v, tensors, seen) for v in obj)
    return copy.deepcopy(obj)


def _leaves(skeleton: Any) -> set[int]:
    """The indices of the tensors a skeleton (or a part of one) refers to."""
    if isinstance(skeleton, _Leaf):
        return {skeleton.index}
    if isinstance(skeleton, dict):
        return set().union(*(_leaves(v) for v in skeleton.values()))
    if isinstance(skeleton, (list, tuple)):
        return set().union(*(_leaves(v) for v in skeleton))
    return set()


def _fill(skeleton: Any, tensors: list[Any]) -> Any:
    """The nested state back, each :class:`_Leaf` replaced by its tensor (containers copied, leaves shared)."""
    if isinstance(skeleton, _Leaf):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        out = OrderedDict() if isinstance(skeleton, OrderedDict) else {}
        for k, v in skeleton.items():
            out[k] = _fill(v, tensors)
        metadata = getattr(skeleton, "_metadata", None)
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(skeleton, list):
        return [_fill(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(_fill(v, tensors) for v in skeleton)
    return copy.deepcopy(skeleton)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as a flat uint8 view (a contiguous copy first where it is not contiguous)."""
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(torch.uint8)


def _chunk(total: int, world: int) -> int:
    return -(-total // world) if total else 0


@dataclass
class ShardedState:
    """One rank's range of a replicated nested state (see the module docstring); :meth:`gather` rebuilds it whole.

    Attributes:
        skeleton: the state's nesting and non-tensor values, tensors replaced by placeholders (the same on every rank).
        piece: this rank's bytes (CPU, uint8, ``ceil(total / world)`` long, zero-padded at the end).
        sharding: the rank, world and group the state was split over.
    """

    skeleton: Any
    layout: _Layout
    piece: torch.Tensor
    sharding: ReplicaSharding

    @classmethod
    def take(cls, state: Any, sharding: ReplicaSharding) -> ShardedState:
        """Copy this rank's range of ``state`` (a nested structure of dicts, lists and tensors) to the CPU."""
        tensors: list[torch.Tensor] = []
        skeleton = _skeleton(state, tensors)
        layout = _Layout()
        for t in tensors:
            n = t.numel() * t.element_size()
            layout.shapes.append(t.shape)
            layout.dtypes.append(t.dtype)
            layout.offsets.append(layout.total)
            layout.nbytes.append(n)
            layout.total += n
        size = _chunk(layout.total, sharding.world)
        start = min(sharding.rank * size, layout.total)
        stop = min(start + size, layout.total)
        piece = torch.zeros(size, dtype=torch.uint8)
        with torch.no_grad():
            for t, offset, n in zip(tensors, layout.offsets, layout.nbytes):
                lo, hi = max(offset, start), min(offset + n, stop)
                if lo < hi:  # this tensor overlaps the rank's range
                    piece[lo - start : hi - start].copy_(_bytes_of(t)[lo - offset : hi - offset])
        return cls(skeleton, layout, piece, sharding)

    @property
    def nbytes(self) -> int:
        """Bytes this rank holds (its range; the skeleton's few plain values are not counted)."""
        return self.piece.numel()

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole state's tensors."""
        return self.layout.total

    def gather(self, part: int | None = None) -> Any:
        """The whole state, rebuilt from every rank's range (a collective: every rank of the group calls it at the
        same time, with the same ``part``). Fresh CPU tensors, sharing nothing with this object. ``part``: only the
        ``part``-th item of a state that is a list or tuple (e.g. the model's ``state_dict`` of a snapshot), whose
        bytes alone then travel.

        The ranges travel one rank at a time (a broadcast from each rank in turn), each copied into the rebuilt
        tensors as it arrives: a rank holds the whole state once, plus one range, never every range besides."""
        s = self.sharding
        skeleton = self.skeleton if part is None else self.skeleton[part]
        wanted = sorted(_leaves(skeleton))
        lay = self.layout
        lo = min((lay.offsets[i] for i in wanted), default=0)
        hi = max((lay.offsets[i] + lay.nbytes[i] for i in wanted), default=0)
        tensors = self._empty_tensors(wanted)
        if s.world <= 1:
            self._copy_range(tensors, self.piece, 0)
            return _fill(skeleton, tensors)
        device = s.device if s.device is not None else torch.device("cpu")
        size = self.piece.numel()
        for r in range(s.world):
            a, b = max(lo, r * size), min(hi, (r + 1) * size)
            if a >= b:
                continue  # nothing of the wanted bytes in rank r's range (the same decision on every rank)
            window = slice(a - r * size, b - r * size)
            ours = self.piece[window].to(device) if r == s.rank else None  # the sender's bytes (never written)
            buf = ours if ours is not None else torch.empty(b - a, dtype=torch.uint8, device=device)
            src = dist.get_global_rank(s.group, r) if s.group is not None else r
            dist.broadcast(buf, src=src, group=s.group)
            self._copy_range(tensors, buf.cpu(), r, first=a)
        return _fill(skeleton, tensors)

    def _empty_tensors(self, wanted: list[int] | None = None) -> list[torch.Tensor | None]:
        lay = self.layout
        keep = set(range(len(lay.shapes))) if wanted is None else set(wanted)
        return [
            torch.empty(shape, dtype=dtype) if i in keep else None
            for i, (shape, dtype) in enumerate(zip(lay.shapes, lay.dtypes))
        ]

    def _copy_range(
        self, tensors: list[torch.Tensor | None], data: torch.Tensor, rank: int, first: int | None = None
    ) -> None:
        """Copy bytes of rank ``rank``'s range into the tensors they belong to: ``data`` is the whole range, or
        (``first`` given) the part of it starting at byte ``first`` of the state."""
        lay, size = self.layout, self.piece.numel()
        start = rank * size if first is None else first
        stop = min(start + data.numel(), lay.total)
        for t, offset, n in zip(tensors, lay.offsets, lay.nbytes):
            lo, hi = max(offset, start), min(offset + n, stop)
            if t is not None and lo < hi:  # t is contiguous: its byte view writes into it
                _bytes_of(t)[lo - offset : hi - offset].copy_(data[lo - start : hi - start])

    def rebuild(self, pieces: list[torch.Tensor]) -> Any:
        """The whole state from every rank's :attr:`piece`, in rank order (what :meth:`gather` receives): fresh CPU
        tensors of the original shapes and dtypes, bit for bit."""
        tensors = self._empty_tensors()
        for r, piece in enumerate(pieces):
            self._copy_range(tensors, piece, r)
        return _fill(self.skeleton, tensors)
