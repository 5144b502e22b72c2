"""Once-per-step gradient statistics.

One call of :func:`compute_grad_stats` measures everything the gradguard callbacks need about the gradients of one
optimizer at one step: the global norm, per-parameter and per-layer norms, finiteness flags and the matching weight
norms. The numbers stay on the device as tensors (no host synchronisation); the per-parameter norms come from torch's
multi-tensor ``_foreach_norm`` kernel, one launch per (device, dtype) group, reduced in float32 whatever the gradient
dtype. Derived quantities (weight norms, per-layer norms, update ratios) are computed lazily on first access and
kept, so a step that only clips pays only for the gradient norms.

Sharded gradients (FSDP-style, each rank holding a slice of every parameter) are supported through ``reduce``: the
per-parameter sums of p-th powers (or maxima, for ``p=inf``) are reduced across ranks before the root is taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["GradStats", "ShardReduce", "compute_grad_stats", "layer_name_of", "norms_of"]

#: ``reduce(tensor, op)`` all-reduces ``tensor`` across the ranks that share a sharded parameter, with ``op`` one of
#: ``"sum"`` or ``"max"``, and returns the reduced tensor.
ShardReduce = Callable[[Tensor, str], Tensor]


def layer_name_of(param_name: str) -> str:
    """The qualified name of the module that owns ``param_name`` (``"net.0.weight"`` -> ``"net.0"``)."""
    head, _, _ = param_name.rpartition(".")
    return head or param_name


@lru_cache(maxsize=32)
def _layer_grouping(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    layers: dict[str, int] = {}
    index = tuple(layers.setdefault(layer_name_of(n), len(layers)) for n in names)
    return tuple(layers), index


def _validate_norm_type(norm_type: float) -> float:
    norm_type = float(norm_type)
    if not (norm_type == math.inf or norm_type > 0):
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    return norm_type


def norms_of(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Per-tensor ``norm_type``-norms as one float32 vector, on the device of the first tensor.

    Uses ``torch._foreach_norm`` once per (device, dtype) group and falls back to a ``vector_norm`` loop where the
    multi-tensor kernel is unavailable. Never synchronises with the host.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    out_device = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    if len(groups) == 1:
        return _group_norms(list(tensors), norm_type)
    result = torch.empty(len(tensors), dtype=torch.float32, device=out_device)
    for idx in groups.values():
        norms = _group_norms([tensors[i] for i in idx], norm_type)
        result[torch.tensor(idx, device=out_device)] = norms.to(out_device, non_blocking=True)
    return result


def _group_norms(tensors: list[Tensor], norm_type: float) -> Tensor:
    # Half-precision gradients are accumulated in float32 (a fp16 sum of squares overflows at 256);
    # float32/float64 are reduced in their own precision and the result stored as float32.
    acc = torch.float32 if tensors[0].dtype in (torch.float16, torch.bfloat16) else None
    try:
        norms = list(torch._foreach_norm(tensors, norm_type, dtype=acc))
    except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover - exotic dtypes/devices
        norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in tensors]
    return torch.stack(norms).to(torch.float32)


def _combine(norms: Tensor, norm_type: float, index: Tensor | None = None, size: int = 0) -> Tensor:
    """Combine per-tensor norms into one norm (``index`` None) or into ``size`` group norms given by ``index``."""
    if norm_type == math.inf:
        if index is None:
            return norms.max() if norms.numel() else norms.new_zeros(())
        return norms.new_zeros(size).scatter_reduce(0, index, norms, reduce="amax", include_self=True)
    if index is None:  # one kernel, and the same arithmetic as torch's clip_grad_norm_
        return torch.linalg.vector_norm(norms, norm_type)
    powered = norms.pow(norm_type)
    return norms.new_zeros(size).index_add(0, index, powered).pow(1.0 / norm_type)


class GradStats:
    """The gradient statistics of one optimizer at one step.

    Attributes:
        names: names of the parameters that had a gradient (``grad is None`` ones are left out), in optimizer order.
        params: those parameters.
        grads: their gradients (the live ``.grad`` tensors, not copies).
        norm_type: the p of the p-norms.
        param_norms: float32 vector, the gradient norm of each parameter.
        total_norm: float32 scalar, the global gradient norm over all of them (pre-clipping).
    """

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        param_norms: Tensor,
        total_norm: Tensor,
        norm_type: float,
        reduce: ShardReduce | None = None,
    ) -> None:
        self.names = list(names)
        self.params = list(params)
        self.grads = list(grads)
        self.param_norms = param_norms
        self.total_norm = total_norm
        self.norm_type = norm_type
        self._reduce = reduce
        self._cache: dict[str, object] = {}

    def _lazy(self, key: str, fn: Callable[[], object]) -> object:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def device(self) -> torch.device:
        return self.total_norm.device

    @property
    def finite(self) -> Tensor:
        """Bool vector: is each parameter's gradient free of NaN and inf (its norm finite)."""
        return self._lazy("finite", lambda: torch.isfinite(self.param_norms))  # type: ignore[return-value]

    @property
    def all_finite(self) -> Tensor:
        """Bool scalar tensor: are all gradients finite. Stays on the device; ``bool()`` it only when needed."""
        return self._lazy("all_finite", lambda: self.finite.all())  # type: ignore[return-value]

    @property
    def weight_norms(self) -> Tensor:
        """Float32 vector: the L2 norm of each parameter (for update ratios and AGC)."""

        def compute() -> Tensor:
            norms = norms_of([p.detach() for p in self.params], 2.0)
            if self._reduce is not None:
                norms = self._reduce(norms.pow(2), "sum").sqrt()
            return norms

        return self._lazy("weight_norms", compute)  # type: ignore[return-value]

    @property
    def layer_names(self) -> list[str]:
        """Names of the modules owning the parameters, in first-seen (input-to-output) order."""
        return list(_layer_grouping(tuple(self.names))[0])

    @property
    def layer_index(self) -> Tensor:
        """Long vector mapping each parameter to its position in :attr:`layer_names`."""
        return self._lazy(  # type: ignore[return-value]
            "layer_index",
            lambda: torch.tensor(_layer_grouping(tuple(self.names))[1], dtype=torch.long, device=self.device),
        )

    @property
    def layer_norms(self) -> Tensor:
        """Float32 vector: the gradient norm of each layer (all parameters of the module taken together)."""
        return self._lazy(  # type: ignore[return-value]
            "layer_norms",
            lambda: _combine(self.param_norms, self.norm_type, self.layer_index, len(self.layer_names)),
        )

    @property
    def layer_weight_norms(self) -> Tensor:
        """Float32 vector: the L2 weight norm of each layer."""
        return self._lazy(  # type: ignore[return-value]
            "layer_weight_norms",
            lambda: _combine(self.weight_norms.to(self.device), 2.0, self.layer_index, len(self.layer_names)),
        )

    @property
    def layer_update_ratio(self) -> Tensor:
        """Float32 vector: layer gradient norm / layer weight norm (0 where the weights are all zero)."""

        def compute() -> Tensor:
            w = self.layer_weight_norms
            return torch.where(w > 0, self.layer_norms / w.clamp_min(torch.finfo(torch.float32).tiny), 0.0)

        return self._lazy("layer_update_ratio", compute)  # type: ignore[return-value]

    def nonfinite_names(self) -> list[str]:
        """Names of the parameters whose gradient holds NaN or inf (synchronises with the host)."""
        flags = self.finite.cpu().tolist()
        return [n for n, ok in zip(self.names, flags) if not ok]

    def __repr__(self) -> str:
        return f"GradStats(params={len(self.names)}, norm_type={self.norm_type}, total_norm={self.total_norm})"


def compute_grad_stats(
    params: Sequence[Tensor],
    names: Sequence[str] | None = None,
    norm_type: float = 2.0,
    reduce: ShardReduce | None = None,
) -> GradStats:
    """Measure the gradients of ``params`` once.

    Args:
        params: the parameters (typically all parameters of one optimizer). Those with ``grad is None`` are skipped.
        names: a name per parameter (same order); layers are the owning modules' names. Defaults to ``param_<i>``.
        norm_type: p of the p-norm: a positive float or ``math.inf``.
        reduce: for sharded gradients, a function that all-reduces a tensor across ranks (see :data:`ShardReduce`).

    Raises:
        ValueError: ``norm_type`` not positive, ``names`` of the wrong length, or a sparse gradient.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> compute_grad_stats([w], ["fc.weight"]).total_norm
        tensor(5.)
    """
    norm_type = _validate_norm_type(norm_type)
    if names is None:
        names = [f"param_{i}" for i in range(len(params))]
    elif len(names) != len(params):
        raise ValueError(f"names must have one entry per parameter: got {len(names)} names for {len(params)} params")
    kept_names: list[str] = []
    kept_params: list[Tensor] = []
    grads: list[Tensor] = []
    for name, p in zip(names, params):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise ValueError(
                f"parameter {name!r} has a sparse gradient; gradguard supports dense gradients only "
                "(e.g. use nn.Embedding(sparse=False))"
            )
        kept_names.append(name)
        kept_params.append(p)
        grads.append(g.detach())
    if not grads:
        device = params[0].device if params else torch.device("cpu")
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return GradStats([], [], [], empty, empty.new_zeros(()), norm_type, reduce)
    param_norms = norms_of(grads, norm_type)
    if reduce is not None:
        if norm_type == math.inf:
            param_norms = reduce(param_norms, "max")
        else:
            param_norms = reduce(param_norms.pow(norm_type), "sum").pow(1.0 / norm_type)
    total = _combine(param_norms, norm_type)
    return GradStats(kept_names, kept_params, grads, param_norms, total, norm_type, reduce)
