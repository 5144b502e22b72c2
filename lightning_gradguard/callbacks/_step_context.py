"""Per-Trainer context shared by the gradguard callbacks: parameter names and the once-per-step statistics cache.

Every gradguard callback asks :func:`grad_stats_for` for the statistics of the optimizer being stepped. The first
caller in a step computes them; the others get the same object, whatever the callback order. The measurement is
taken before any clipping (callbacks that clip do so after asking), so "grad_norm" is always the pre-clip norm.

Under sharding the measurement is a collective, and it is the step's only one: what the other callbacks need from
the other ranks travels with it. The guard registers a :func:`ride_with_measurement` source (its loss and flags,
whose cross-rank maximum comes back with the statistics), the monitor a :func:`weight_norms_with_measurement`
predicate (the weight norms of a logging step). Both are asked only at a new measurement, whoever triggers it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from lightning_gradguard.callbacks._pickling import WeakrefsNotPickled
from lightning_gradguard.core.measure._grad_stats import GradStats, Rider, compute_grad_stats
from lightning_gradguard.core.measure._step_cache import StepStatsCache

_PARAMS = itemgetter("params")

#: ``fn(stats, optimizer_idx, step)``: called once right after a new measurement, before any callback acts on the
#: gradients (so a listener sees pre-clip gradients whatever the callback order).
MeasuredListener = Callable[[GradStats, int, int], None]

#: ``fn(optimizer, norm_type, step) -> Rider | None``: values to carry in the collective of the new measurement of
#: ``optimizer``'s gradients (the raw torch optimizer) in ``norm_type`` at ``step``.
RiderSource = Callable[[Any, float, int], "Rider | None"]

#: ``fn(optimizer, norm_type, step) -> bool``: should that new measurement also take the weight norms.
WeightNormsDue = Callable[[Any, float, int], bool]


@dataclass
class StepRecord:
    """What the gradguard callbacks publish about one optimizer step (``step`` is ``trainer.global_step``).

    Attributes:
        step: the step this record belongs to.
        clips: optimizer index -> the clipper's record of what it did at this step.
        dropped: set by the guard when this step's update was skipped (its statistics must not be learned from).
        loss: the step's loss (device tensor) when a callback recorded it.
    """

    step: int
    clips: dict[int, Any] = field(default_factory=dict)
    dropped: bool = False
    loss: torch.Tensor | None = None


class TrainerContext(WeakrefsNotPickled):
    """What the gradguard callbacks of one Trainer share."""

    def __init__(self) -> None:
        self.cache = StepStatsCache()
        self.listeners: list[MeasuredListener] = []
        self.rider_source: RiderSource | None = None
        self.weight_norms_due: WeightNormsDue | None = None
        self.record: StepRecord | None = None
        self._names: dict[int, str] | None = None
        self._names_owner: weakref.ref[Any] | None = None
        self._labels: dict[int, tuple[tuple[int, ...], list[str]]] = {}  # optimizer id -> (param ids, their names)

    def labels(self, pl_module: torch.nn.Module, optimizer_id: int, params: list[torch.Tensor]) -> list[str]:
        """The names of ``params``, built once per optimizer and again only when its parameters change (a dict
        lookup per parameter each step cost ~10 % of a clip on a model of 1000 small tensors)."""
        ids = tuple(map(id, params))
        cached = self._labels.get(optimizer_id)
        if (
            cached is not None
            and cached[0] == ids
            and self._names_owner is not None
            and self._names_owner() is pl_module
        ):
            return cached[1]
        names = self.param_names(pl_module)
        labels = [names.get(i, f"param_{j}") for j, i in enumerate(ids)]
        self._labels[optimizer_id] = (ids, labels)
        return labels

    def param_names(self, pl_module: torch.nn.Module) -> dict[int, str]:
        if self._names is None or self._names_owner is None or self._names_owner() is not pl_module:
            self._names = {id(p): n for n, p in pl_module.named_parameters()}
            self._names_owner = weakref.ref(pl_module)
        return self._names

    def reset(self) -> None:
        self.cache.invalidate()
        self.listeners.clear()
        self.rider_source = None
        self.weight_norms_due = None
        self.record = None
        self._names = None
        self._names_owner = None
        self._labels.clear()


#: One context per live Trainer. The callbacks of a Trainer must share a measurement without the user wiring them
#: together, and Lightning has no slot for per-Trainer extension state; a weak mapping keyed by the Trainer neither
#: writes private attributes onto it nor keeps it alive (the entry goes with the Trainer).
_CONTEXTS: weakref.WeakKeyDictionary[Any, TrainerContext] = weakref.WeakKeyDictionary()


#: The Trainer asked for last and its context, both held weakly: several lookups per step, nearly always for the
#: same Trainer (a ``WeakKeyDictionary`` lookup builds a weak reference each time). Starts as nobody's.
_NOBODY = object()
_LAST: tuple[Callable[[], Any], Callable[[], TrainerContext | None]] = (lambda: _NOBODY, lambda: None)


def context_for(trainer: pl.Trainer) -> TrainerContext:
    """The context shared by the gradguard callbacks of ``trainer`` (created on first use)."""
    global _LAST
    last = _LAST
    if last[0]() is trainer:
        ctx = last[1]()
        if ctx is not None:
            return ctx
    ctx = _CONTEXTS.get(trainer)
    if ctx is None:
        ctx = _CONTEXTS[trainer] = TrainerContext()
    _LAST = (weakref.ref(trainer), weakref.ref(ctx))
    return ctx


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The raw torch optimizer behind a ``LightningOptimizer`` (state operations must use the raw one)."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not found)."""
    optimizers = trainer.optimizers
    if len(optimizers) <= 1:
        return 0  # the usual case: found or not, the answer is 0
    raw = unwrap_optimizer(optimizer)
    for i, opt in enumerate(optimizers):
        if opt is raw:
            return i
    return 0


def grad_stats_for(
    trainer: pl.Trainer, pl_module: torch.nn.Module, optimizer: Any, norm_type: float = 2.0, step: int | None = None
) -> GradStats:
    """The gradient statistics of ``optimizer``'s parameters at the current step, computed once per step.

    The cache key is (optimizer, norm type) and the step is ``trainer.global_step``, which counts every optimizer
    step, manual ones included (``step``: that value, when the caller has already read it). Under sharding
    (``DTensor`` gradients) the first call of a step is a collective: the callbacks call it on every rank at the same
    hook.
    """
    ctx = context_for(trainer)
    raw = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
    if type(norm_type) is not float:
        norm_type = float(norm_type)
    if step is None:
        step = trainer.global_step
    key = (id(raw), norm_type if norm_type != math.inf else "inf")
    stats = ctx.cache.peek(key, step)  # every caller but the first of a step stops here
    if stats is not None:
        return stats
    return ctx.cache.get(key, step, lambda: _measure(ctx, trainer, pl_module, raw, norm_type, step))


def _measure(
    ctx: TrainerContext, trainer: pl.Trainer, pl_module: torch.nn.Module, raw: Any, norm_type: float, step: int
) -> GradStats:
    """The step's measurement of ``raw``'s gradients, shown to the listeners."""
    params = list(chain.from_iterable(map(_PARAMS, raw.param_groups)))
    labels = ctx.labels(pl_module, id(raw), params)
    source, due = ctx.rider_source, ctx.weight_norms_due
    if source is None and due is None:
        stats = compute_grad_stats(params, labels, norm_type)
    else:  # what travels with the measurement's collective, when it is one (sharded gradients)
        rider = source(raw, norm_type, step) if source is not None else None
        weights = due(raw, norm_type, step) if due is not None else False
        stats = compute_grad_stats(params, labels, norm_type, rider=rider, weight_norms=weights)
    if ctx.listeners:
        idx = optimizer_index(trainer, raw)
        for listener in list(ctx.listeners):
            listener(stats, idx, step)
    return stats


def on_measured(trainer: pl.Trainer, listener: MeasuredListener) -> None:
    """Register ``listener`` to see every new measurement of this Trainer before any gradient is changed."""
    ctx = context_for(trainer)
    if listener not in ctx.listeners:
        ctx.listeners.append(listener)


def ride_with_measurement(trainer: pl.Trainer, source: RiderSource | None) -> None:
    """Register the source of the values that travel with each new measurement's collective (the guard's; None:
    none). One source per Trainer: the one guard."""
    context_for(trainer).rider_source = source


def weight_norms_with_measurement(trainer: pl.Trainer, due: WeightNormsDue | None) -> None:
    """Register when a new measurement should also take the weight norms in its collective (the monitor's logging
    steps; None: never, they are measured when read)."""
    context_for(trainer).weight_norms_due = due


def step_record(trainer: pl.Trainer, step: int | None = None) -> StepRecord:
    """The shared record of the current optimizer step (a fresh one when ``global_step`` moved on; ``step``: its
    value, when the caller has already read it)."""
    ctx = context_for(trainer)
    if step is None:
        step = trainer.global_step
    record = ctx.record
    if record is None or record.step != step:
        record = ctx.record = StepRecord(step)
    return record


def log_due(trainer: pl.Trainer, every_n_steps: int) -> bool:
    """The one meaning of ``log_every_n_steps`` for every gradguard callback.

    Counts the batches that made an optimizer step (Lightning's own logging counter, restored on resume), so
    every optimizer of a multi-optimizer batch logs at the same batch and the guard logs with the others.
    """
    try:
        count = trainer.fit_loop.epoch_loop._batches_that_stepped
    except AttributeError:
        count = None
    if not isinstance(count, int):
        count = trainer.global_step
    if type(every_n_steps) is not int or every_n_steps < 1:
        every_n_steps = max(1, int(every_n_steps))
    return count % every_n_steps == 0
