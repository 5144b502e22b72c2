"""Once-per-step gradient statistics.

One call of :func:`compute_grad_stats` measures everything the gradguard callbacks need about the gradients of one
optimizer at one step: the global norm, per-parameter and per-layer norms, finiteness flags and the matching weight
norms. The numbers stay on the device as tensors (no host synchronisation on accelerators); the per-parameter norms
come from torch's multi-tensor ``_foreach_norm`` kernel, one launch per (device, dtype) group. Derived quantities
(weight norms, per-layer norms, update ratios) are computed on first access and kept, so a step that only clips pays
only for the gradient norms.

**Norms that cannot overflow.** A float32 sum of squares overflows once a tensor's true L2 norm passes ~1.8e19,
although every element may be finite (up to 3.4e38). Here:

- the per-tensor norms are combined (into the total and the per-layer norms) in float64, never in float32;
- on the CPU, the per-tensor kernel runs in the gradient's own precision (fast) and the rare tensor whose result
  is inf while all its elements are finite is measured again, scaled by its largest element, in float64 (one cheap
  host check per group and step; the CPU has nothing to synchronise);
- on accelerators, the kernel is asked for float64 results (``_foreach_norm(..., dtype=float64)``: the gradients are
  read once in their own dtype, only the accumulator is wide), so no host check is needed.

So for float32, bf16 and fp16 gradients ``param_norms64``/``total_norm64`` are finite exactly when every element is;
the float32 views ``param_norms``/``total_norm`` can still be inf for a norm above float32's range (3.4e38, which
needs elements near that range), and :attr:`GradStats.norm_overflow` says so. "Non-finite" (``finite``,
``all_finite``) always means NaN or inf *inside* a gradient. The float64 work touches the vector of per-tensor norms
only, never the gradients. Limit: a float64 gradient whose norm exceeds float64's range (1.8e308) counts as
non-finite.

**Sharded gradients** (``DTensor``, e.g. FSDP2 through Lightning's ``ModelParallelStrategy``) are measured on each
rank's local shard and combined with one all-reduce (``measure/_sharded.py``); every statistic is
then the global one, identical on every rank. Under sharding each first access of a statistic is a collective: every
rank must read the same statistics in the same order (the callbacks run the same code on every rank). When the
shards span the whole world over one process group, the measurement's one collective can also carry the weight
norms (``weight_norms=True``, for a logging step) and a :class:`Rider`'s values (the guard's loss and flags, whose
cross-rank maximum comes back in :attr:`GradStats.carried`): one collective per step for every consumer.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import repeat
from operator import attrgetter, is_
from typing import Any, ClassVar, Generic, Protocol, TypeVar, overload

import torch
from torch import Tensor

from lightning_gradguard.core._arg_checks import check_norm_type
from lightning_gradguard.core.measure._sharded import (
    GATHER_MAX_VALUES,
    ShardLayout,
    gather_norms,
    group_size,
    local_tensors,
    local_view,
    reduce_norms,
    world_group,
)

#: Up to this p, p-th powers of per-tensor norms of float32/bf16/fp16 tensors (at most ~1e48) stay finite in float64,
#: so norms are combined directly; above it they are first divided by the largest one.
_DIRECT_POWER_MAX = 6.0
_GRAD, _IS_SPARSE, _REQUIRES_GRAD = attrgetter("grad"), attrgetter("is_sparse"), attrgetter("requires_grad")
_DTYPE, _IS_CPU = attrgetter("dtype"), attrgetter("is_cpu")
_FLOAT32_DTYPE = torch.float32
_PLAIN = {Tensor}  # the type of ordinary gradients (a DTensor or another subclass takes the general path)
_NARROW = frozenset({torch.float32, torch.bfloat16, torch.float16})  # measured in float32 on the CPU fast path


#: room kept in the gathered vector for a rider's values (the guard's: five scalars and a clip flag per clipper)
_RIDER_ROOM = 64

_T = TypeVar("_T")
_FLOAT32 = struct.Struct("f")


def float32_value(x: float) -> float:
    """``x`` rounded to float32 (to nearest, ties to even: what ``tensor.to(torch.float32)`` does), as a Python
    float; beyond float32's range, inf with ``x``'s sign.

    Example:
        >>> float32_value(0.1), float32_value(1e39), float32_value(-1e39)
        (0.10000000149011612, inf, -inf)
    """
    try:
        return float(_FLOAT32.unpack(_FLOAT32.pack(x))[0])
    except OverflowError:  # the C cast gave inf from a finite value: so does the tensor conversion
        return math.copysign(math.inf, x)


class _cached_property(Generic[_T]):  # noqa: N801 - a drop-in for functools.cached_property
    """``functools.cached_property`` without the lock it takes on every first read before Python 3.12: the
    statistics of each step are new objects, so that first read happens every step (the value is stored in the
    instance ``__dict__``, which later reads find first)."""

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _cached_property[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> _cached_property[_T] | _T:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.func(instance)
        return value


def layer_name_of(param_name: str) -> str:
    """The qualified name of the module that owns ``param_name`` (``"net.0.weight"`` -> ``"net.0"``)."""
    head, _, _ = param_name.rpartition(".")
    return head or param_name


@lru_cache(maxsize=32)
def _layer_grouping(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    layers: dict[str, int] = {}
    index = tuple(layers.setdefault(layer_name_of(n), len(layers)) for n in names)
    return tuple(layers), index


def norms_of(tensors: Sequence[Tensor], norm_type: float = 2.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-tensor ``norm_type``-norms as one vector (``dtype``, float32 by default) on the first tensor's device.

    Finite for every tensor whose elements are all finite (up to ``dtype``'s range: pass ``torch.float64`` to get
    finite norms of any finite float32/bf16/fp16 tensor). ``DTensor`` inputs give the norms of the whole tensors,
    through one all-reduce: a collective, to be called on every rank.
    """
    if not tensors:
        return torch.zeros(0, dtype=dtype)
    local, layout = local_tensors(tensors)
    return reduce_norms(_local_norms64(local, norm_type), layout, norm_type).to(dtype)


def _local_norms64(tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """Float64 per-tensor norms of plain tensors, one multi-tensor launch per (device, dtype) group."""
    out_device = tensors[0].device
    if len(set(map(_DTYPE, tensors))) == 1 and len(set(map(Tensor.get_device, tensors))) == 1:
        return _group_norms64(list(tensors), norm_type)  # the common case, without a per-tensor Python loop
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    result = torch.empty(len(tensors), dtype=torch.float64, device=out_device)
    for idx in groups.values():
        norms = _group_norms64([tensors[i] for i in idx], norm_type)
        result[torch.tensor(idx, device=out_device)] = norms.to(out_device, non_blocking=True)
    return result


def _foreach_norms(tensors: list[Tensor], norm_type: float, acc: torch.dtype | None) -> Tensor:
    try:
        norms = list(torch._foreach_norm(tensors, norm_type, dtype=acc))
    except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover - exotic dtypes/devices
        norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in tensors]
    return torch.stack(norms)


def _group_norms64(tensors: list[Tensor], norm_type: float) -> Tensor:
    dtype, device = tensors[0].dtype, tensors[0].device
    if norm_type == math.inf and any(t.numel() == 0 for t in tensors):
        # empty pieces (uneven sharding) have norm 0, but torch refuses their inf-norm (p-norms give 0 themselves)
        out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
        idx = [i for i, t in enumerate(tensors) if t.numel()]
        if idx:
            out[torch.tensor(idx, device=device)] = _group_norms64([tensors[i] for i in idx], norm_type)
        return out
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type != "cpu" and not dtype.is_complex and dtype != torch.float64:
        # a float64 accumulator inside the kernel: no overflow for any finite float32/bf16/fp16 input, no host check
        return _foreach_norms(tensors, norm_type, torch.float64)
    # CPU (and complex tensors): the gradient's own precision (float32 for half: a fp16 sum of squares overflows at
    # 256), then a host check for the rare overflow; a float64 copy of a large tensor costs ~100x the kernel on CPU.
    norms = _foreach_norms(tensors, norm_type, torch.float32 if half else None).to(torch.float64)
    if norm_type != math.inf and bool(torch.isinf(norms).any()):
        _remeasure_overflow(norms, tensors, norm_type)
    return norms


def _remeasure_overflow(norms: Tensor, tensors: Sequence[Tensor], norm_type: float) -> None:
    """Replace, in place, each inf entry of the float64 ``norms`` whose tensor has only finite elements by its
    norm measured without overflow."""
    for i in torch.nonzero(torch.isinf(norms)).flatten().tolist():
        if bool(torch.isfinite(tensors[i]).all()):
            norms[i] = _scaled_norm64(tensors[i], norm_type).to(norms.device)


def _host_norms(tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor | None, float | None] | None:
    """The CPU fast path of the common case: plain float32/bf16/fp16 tensors of one dtype on the CPU, a finite p
    combined directly (``<= _DIRECT_POWER_MAX``). Returns ``(norms, total, value)``: on a healthy step the float32
    per-tensor norms, the float64 total (``vector_norm(..., dtype=float64)`` casts each norm exactly, so the total
    is the one :func:`_combine` gives for the float64 norms) and its value; otherwise the float64 norms, overflows
    re-measured, and None twice. None when the case does not apply.

    A finite float64 total means no per-tensor norm is inf, so one read of the total (no synchronisation on the
    CPU; every callback reads it anyway) replaces the per-step inf scan of the norms, and the widening of the norms to
    float64 waits until something reads them (logging steps).
    """
    dtype = tensors[0].dtype
    if (  # is_cpu, not .device: building a torch.device object costs more than this whole check
        dtype not in _NARROW
        or not 0.0 < norm_type <= _DIRECT_POWER_MAX
        or not all(map(_IS_CPU, tensors))
        or len(set(map(_DTYPE, tensors))) != 1
    ):
        return None
    norms = _foreach_norms(tensors, norm_type, None if dtype is _FLOAT32_DTYPE else _FLOAT32_DTYPE)
    total = torch.linalg.vector_norm(norms, norm_type, dtype=torch.float64)
    value = total.item()
    if math.isfinite(value):
        return norms, total, value
    wide = norms.to(torch.float64)  # an inf (overflow, or inf elements) or NaN somewhere: the full check
    _remeasure_overflow(wide, tensors, norm_type)
    return wide, None, None


def _scaled_norm64(t: Tensor, norm_type: float) -> Tensor:
    """The norm of a tensor of finite elements in float64, divided by its largest magnitude first (never overflows
    for a float32 tensor; for a float64 one only when the norm itself exceeds float64's range)."""
    mag = t.detach().abs().to(torch.float64)
    top = mag.amax()
    if float(top) == 0.0:
        return top
    return top * torch.linalg.vector_norm(mag / top, norm_type)


def _combine(norms: Tensor, norm_type: float, index: Tensor | None = None, size: int = 0) -> Tensor:
    """Combine float64 per-tensor norms into one norm (``index`` None) or ``size`` group norms given by ``index``."""
    if norm_type == math.inf:
        if index is None:
            return norms.max() if norms.numel() else norms.new_zeros(())
        return norms.new_zeros(size).scatter_reduce(0, index, norms, reduce="amax", include_self=True)
    if norm_type <= _DIRECT_POWER_MAX and norms.dtype == torch.float64:
        if index is None:
            return torch.linalg.vector_norm(norms, norm_type)
        return norms.new_zeros(size).index_add(0, index, norms.pow(norm_type)).pow(1.0 / norm_type)
    # large p: divide by the largest norm of the group first (where that is 0 or not finite, keep it as it is)
    if index is None:
        top = norms.max() if norms.numel() else norms.new_zeros(())
        safe = torch.where(torch.isfinite(top) & (top > 0), top, 1.0)
        scaled = safe * torch.linalg.vector_norm(norms / safe, norm_type)
        return torch.where(torch.isfinite(top) & (top > 0), scaled, top)
    top = norms.new_zeros(size).scatter_reduce(0, index, norms, reduce="amax", include_self=True)
    ok = torch.isfinite(top) & (top > 0)
    safe = torch.where(ok, top, 1.0)
    powered = (norms / safe[index]).pow(norm_type)
    scaled = safe * norms.new_zeros(size).index_add(0, index, powered).pow(1.0 / norm_type)
    return torch.where(ok, scaled, top)


class Rider(Protocol):
    """Values that travel with a sharded measurement's collective and come back as their maximum over the ranks
    (the guard's step values: :meth:`~lightning_gradguard.core.guard._step_judge.StepJudge.rider`)."""

    def values(self, device: torch.device) -> Tensor | None:
        """This rank's float64 vector on ``device`` (None: nothing to carry). Called at most once, and only when the
        measurement is one collective over every rank."""
        ...


class GradStats:
    """The gradient statistics of one optimizer at one step.

    Attributes:
        names: names of the parameters that had a gradient (``grad is None`` ones are left out), in optimizer order.
        params: those parameters.
        grads: their gradients (the live ``.grad`` tensors, not copies; ``DTensor`` under sharding).
        norm_type: the p of the p-norms.
        param_norms64: float64 vector, the gradient norm of each parameter (finite iff its elements are).
        total_norm64: float64 scalar, the global gradient norm over all of them (pre-clipping).

    ``param_norms64`` may be given as float32 norms (the CPU fast path of :func:`compute_grad_stats`, when every norm
    is finite): they are widened to float64, exactly, when first read. ``total_norm64`` (None: combined from the
    norms) is the total the caller already computed from them.
    """

    #: measure CPU gradients on the fast path (class-wide switch; tests set it to False for the general path)
    host_fast_path: ClassVar[bool] = True
    #: ``(rider, maximum)``: the :class:`Rider` whose values travelled with this measurement's collective and their
    #: element-wise maximum over the ranks (None: nothing travelled with it)
    carried: tuple[Rider, Tensor] | None = None

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        param_norms64: Tensor,
        norm_type: float,
        local_grads: Sequence[Tensor] | None = None,
        total_norm64: Tensor | None = None,
    ) -> None:
        self.names = list(names)
        self.params = list(params)
        self.grads = list(grads)
        # _cached_property reads __dict__: whichever precision was given is kept, the other made on first read
        self.__dict__["param_norms64" if param_norms64.dtype == torch.float64 else "param_norms"] = param_norms64
        self.total_norm64 = _combine(self.param_norms64, norm_type) if total_norm64 is None else total_norm64
        self.norm_type = norm_type
        self._total64_value: float | None = None  # the total's value, when the measurement read it anyway
        if local_grads is not None:  # the views the measurement already built
            self.__dict__["local_grads"] = list(local_grads)

    @property
    def device(self) -> torch.device:
        return self.total_norm64.device

    @_cached_property
    def local_grads(self) -> list[Tensor]:
        """This rank's pieces of :attr:`grads` (the gradients themselves when not sharded), sharing their storage:
        what in-place clipping should multiply or clamp (``DTensor`` refuses some in-place ops across placements)."""
        return [local_view(g) for g in self.grads]

    @_cached_property
    def param_norms64(self) -> Tensor:
        """Float64 vector: each parameter's gradient norm (finite iff its elements are)."""
        return self.param_norms.to(torch.float64)

    @_cached_property
    def param_norms(self) -> Tensor:
        """Float32 vector: each parameter's gradient norm (inf beyond float32's range; see :attr:`norm_overflow`)."""
        return self.param_norms64.to(torch.float32)

    @_cached_property
    def total_norm(self) -> Tensor:
        """Float32 scalar: the global gradient norm (inf beyond float32's range; see :attr:`norm_overflow`)."""
        return self.total_norm64.to(torch.float32)

    @_cached_property
    def total_norm64_host(self) -> float | None:
        """:attr:`total_norm64` as a Python float when the statistics are on the CPU (the value the measurement read
        anyway, when it did); None elsewhere, where reading it would synchronise with the device."""
        if not self.total_norm64.is_cpu:
            return None
        value = self._total64_value
        return self.total_norm64.item() if value is None else value

    @_cached_property
    def total_norm_host(self) -> float | None:
        """:attr:`total_norm` as a Python float, without a tensor operation, when the statistics are on the CPU
        (the float64 total rounded to float32 as ``.to(torch.float32)`` rounds it); None elsewhere, where reading it
        would synchronise with the device."""
        value = self.total_norm64_host
        return None if value is None else float32_value(value)

    @_cached_property
    def finite(self) -> Tensor:
        """Bool vector: is each parameter's gradient free of NaN and inf."""
        return torch.isfinite(self.param_norms64)

    @_cached_property
    def all_finite(self) -> Tensor:
        """Bool scalar tensor: are all gradients finite. Stays on the device; ``bool()`` it only when needed."""
        return torch.isfinite(self.total_norm64)

    @_cached_property
    def norm_overflow(self) -> Tensor:
        """Bool scalar tensor: every element is finite but the float32 :attr:`total_norm` is inf (its true value,
        above 3.4e38, is in :attr:`total_norm64`). Such a gradient is huge, not broken: clip it, do not drop it."""
        return self.all_finite & ~torch.isfinite(self.total_norm)

    @_cached_property
    def weight_norms(self) -> Tensor:
        """Float32 vector: the L2 norm of each parameter (for update ratios and AGC)."""
        return self.weight_norms64.to(torch.float32)

    @_cached_property
    def weight_norms64(self) -> Tensor:
        """Float64 vector: the L2 norm of each parameter."""
        if not self.params:
            return self.param_norms64.new_zeros(0)
        return norms_of([p.detach() for p in self.params], 2.0, torch.float64).to(self.device)

    @property
    def layer_names(self) -> list[str]:
        """Names of the modules owning the parameters, in first-seen (input-to-output) order."""
        return list(_layer_grouping(tuple(self.names))[0])

    @_cached_property
    def layer_index(self) -> Tensor:
        """Long vector mapping each parameter to its position in :attr:`layer_names`."""
        return torch.tensor(_layer_grouping(tuple(self.names))[1], dtype=torch.long, device=self.device)

    @_cached_property
    def layer_norms(self) -> Tensor:
        """Float32 vector: the gradient norm of each layer (all parameters of the module taken together)."""
        return _combine(self.param_norms64, self.norm_type, self.layer_index, len(self.layer_names)).to(torch.float32)

    @_cached_property
    def layer_weight_norms(self) -> Tensor:
        """Float32 vector: the L2 weight norm of each layer."""
        return _combine(self.weight_norms64, 2.0, self.layer_index, len(self.layer_names)).to(torch.float32)

    @_cached_property
    def layer_update_ratio(self) -> Tensor:
        """Float32 vector: layer gradient norm / layer weight norm (0 where the weights are all zero)."""
        w = self.layer_weight_norms
        return torch.where(w > 0, self.layer_norms / w.clamp_min(torch.finfo(torch.float32).tiny), 0.0)

    def nonfinite_names(self) -> list[str]:
        """Names of the parameters whose gradient holds NaN or inf (synchronises with the host)."""
        flags = self.finite.cpu().tolist()
        return [n for n, ok in zip(self.names, flags) if not ok]

    def __repr__(self) -> str:
        return f"GradStats(params={len(self.names)}, norm_type={self.norm_type}, total_norm={self.total_norm64})"


#: a gradient at most this fraction of the step's largest tensor gradient counts as vanished (float32's epsilon: it
#: is below the rounding of the largest one; a dead ReLU passes exactly zero upstream)
VANISHED_RELATIVE = float(torch.finfo(torch.float32).eps)


def vanished_mask(stats: Sequence[GradStats]) -> tuple[bool, ...] | None:
    """Per gradient tensor (over every optimizer's ``stats``, in order): whether its norm is at most
    :data:`VANISHED_RELATIVE` x the largest one's (every tensor vanished when every gradient is zero); None when there
    are none or a norm is not finite. Reads one small vector to the host (used only while a dead-looking run is
    examined).

    Example:
        >>> import torch
        >>> w = [torch.zeros(n, requires_grad=True) for n in (3, 2, 1)]
        >>> for p, g in zip(w, ([0.0, 0.0, 0.0], [3.0, 4.0], [1e-9])):
        ...     p.grad = torch.tensor(g)
        >>> vanished_mask([compute_grad_stats(w)])
        (True, False, True)
    """
    vectors = [s.param_norms64 for s in stats if s.grads]
    if not vectors:
        return None
    norms = (torch.cat(vectors) if len(vectors) > 1 else vectors[0]).detach()
    values = norms.cpu().tolist()
    if not values or not all(math.isfinite(v) for v in values):
        return None
    top = max(values)
    return tuple(v <= VANISHED_RELATIVE * top for v in values)


def vanished_share(stats: Sequence[GradStats]) -> float | None:
    """The share of :func:`vanished_mask` that vanished: 1.0 when every gradient is zero; None when there are no
    gradients or a norm is not finite.

    Example:
        >>> import torch
        >>> w = [torch.zeros(n, requires_grad=True) for n in (3, 2, 1)]
        >>> for p, g in zip(w, ([0.0, 0.0, 0.0], [3.0, 4.0], [1e-9])):
        ...     p.grad = torch.tensor(g)
        >>> vanished_share([compute_grad_stats(w)])
        0.6666666666666666
    """
    mask = vanished_mask(stats)
    return None if mask is None else sum(mask) / len(mask)


def compute_grad_stats(
    params: Sequence[Tensor],
    names: Sequence[str] | None = None,
    norm_type: float = 2.0,
    *,
    rider: Rider | None = None,
    weight_norms: bool = False,
) -> GradStats:
    """Measure the gradients of ``params`` once.

    Args:
        params: the parameters (typically all parameters of one optimizer). Those with ``grad is None`` are skipped.
            ``DTensor`` parameters (FSDP2, tensor parallel) are measured shard by shard and combined across ranks:
            then this is a collective, to be called on every rank.
        names: a name per parameter (same order); layers are the owning modules' names. Defaults to ``param_<i>``.
        norm_type: p of the p-norm: a positive float or ``math.inf``.
        rider: under sharding over the whole world, values to carry in the measurement's collective (their maximum
            over the ranks comes back in :attr:`GradStats.carried`); ignored elsewhere (nothing is communicated, or
            the layout needs several collectives).
        weight_norms: under sharding over the whole world, measure the weight norms in the same collective (a
            logging step reads them); elsewhere they are measured when first read, as always.

    Raises:
        ValueError: ``norm_type`` not positive, ``names`` of the wrong length, a sparse gradient, or a ``DTensor``
            gradient with a ``Partial`` placement.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> compute_grad_stats([w], ["fc.weight"]).total_norm
        tensor(5.)
        >>> w.grad = torch.tensor([3e30, 4e30])  # finite elements, a float32 sum of squares would overflow
        >>> compute_grad_stats([w]).total_norm
        tensor(5.0000e+30)
    """
    if type(norm_type) is not float or norm_type not in (2.0, math.inf):  # the usual p needs no check per step
        norm_type = check_norm_type("norm_type", norm_type)
    if names is None:
        names = [f"param_{i}" for i in range(len(params))]
    elif len(names) != len(params):
        raise ValueError(f"names must have one entry per parameter: got {len(names)} names for {len(params)} params")
    # Whole-list passes through C-level ``map`` instead of one Python loop doing five things per tensor: on a model
    # of 1000 small tensors that loop cost as much as the norm kernel itself.
    grads = list(map(_GRAD, params))
    if any(map(is_, grads, repeat(None))):
        kept = [i for i, g in enumerate(grads) if g is not None]
        names, params, grads = [names[i] for i in kept], [params[i] for i in kept], [grads[i] for i in kept]
    if not grads:
        device = params[0].device if params else torch.device("cpu")
        return GradStats([], [], [], torch.zeros(0, dtype=torch.float64, device=device), norm_type)
    if any(map(_IS_SPARSE, grads)):
        name = next(n for n, g in zip(names, grads) if g.is_sparse)
        raise ValueError(
            f"parameter {name!r} has a sparse gradient; gradguard supports dense gradients only "
            "(e.g. use nn.Embedding(sparse=False))"
        )
    if any(map(_REQUIRES_GRAD, grads)):  # only after backward(create_graph=True): keep the graph out of our ops
        grads = [g.detach() for g in grads]
    if GradStats.host_fast_path and set(map(type, grads)) == _PLAIN:  # plain tensors: nothing is sharded
        host = _host_norms(grads, norm_type)
        if host is not None:
            stats = GradStats(names, params, grads, host[0], norm_type, local_grads=grads, total_norm64=host[1])
            stats._total64_value = host[2]
            return stats
    local, layout = local_tensors(grads, names)
    local_norms = _local_norms64(local, norm_type)
    if (rider is not None or weight_norms) and layout.groups:
        carrying = _carrying(names, params, grads, local, local_norms, layout, norm_type, rider, weight_norms)
        if carrying is not None:
            return carrying
    norms = reduce_norms(local_norms, layout, norm_type)
    return GradStats(names, params, grads, norms, norm_type, local_grads=local)


def _carrying(
    names: Sequence[str],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    local: list[Tensor],
    local_norms: Tensor,
    layout: ShardLayout,
    norm_type: float,
    rider: Rider | None,
    weight_norms: bool,
) -> GradStats | None:
    """The sharded measurement as one all-gather that also carries the weight norms and the rider's values, when the
    gradients are sharded alike over one group of every rank; None where that does not apply."""
    pg = world_group(layout, len(local))
    if pg is None:
        return None
    parts = [(local_norms, norm_type)]
    if weight_norms:
        weights, weight_layout = local_tensors([p.detach() for p in params])
        if weight_layout == layout:
            parts.append((_local_norms64(weights, 2.0), 2.0))
    size = sum(n.numel() for n, _ in parts) + _RIDER_ROOM
    if size * group_size(pg) > GATHER_MAX_VALUES:
        return None  # a gather that large would cost more than the collectives it replaces
    top = rider.values(local_norms.device) if rider is not None else None
    if top is None and len(parts) == 1:
        return None  # nothing rides along: the plain all-reduce
    combined, top_max = gather_norms(parts, top, pg)
    stats = GradStats(names, params, grads, combined[0], norm_type, local_grads=local)
    if len(parts) > 1:
        stats.__dict__["weight_norms64"] = combined[1]
    if rider is not None and top is not None:
        stats.carried = (rider, top_max)
    return stats
