"""Scale the learning rate of an optimizer and its schedulers so that the change survives every later scheduler step.

Multiplying ``param_group["lr"]`` is enough for schedulers that update the LR recursively (``lr <- lr * gamma``),
but not for those that recompute it from stored constants: closed forms read ``base_lrs`` (and the param groups'
``initial_lr``), OneCycleLR reads each group's ``max_lr``/``min_lr``, cosine schedules read ``eta_min``, CyclicLR
reads ``max_lrs`` and ReduceLROnPlateau clamps at ``min_lrs``. Scaling only ``lr`` then looks right for one step and
is undone at the next one (or at a milestone or restart). :func:`scale_lr` scales every one of those quantities by
the same factor, so that the LR sequence that follows is exactly ``factor`` times the one the unscaled run would have
produced: every formula the torch schedulers use is linear in these constants. Composite schedulers
(``SequentialLR``, ``ChainedScheduler``) are handled by scaling their children.

All scaled quantities live in the optimizer's ``param_groups`` or in the scheduler's ``__dict__``, which are what
their ``state_dict()`` saves, so a checkpoint written after scaling resumes with the scaled LR and the factor must
not be applied again on resume.

Custom schedulers get their ``base_lrs``/``_last_lr`` and any attribute named in ``extra_attrs`` scaled; closed-form
constants they keep under other names are unknown to this module (see :func:`is_known_scheduler`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import lr_scheduler as lrs

#: Param-group keys holding learning rates: the live LR, the schedulers' starting LR and OneCycleLR's bounds.
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")

#: Scheduler attributes that are lists of per-group learning rates.
_LIST_ATTRS = ("base_lrs", "max_lrs", "min_lrs", "_last_lr")


def _children(scheduler: Any) -> list[Any]:
    return list(getattr(scheduler, "_schedulers", None) or [])


def is_known_scheduler(scheduler: Any) -> bool:
    """Whether every LR constant of ``scheduler`` (and of its children) is known to :func:`scale_lr`.

    True for the schedulers of ``torch.optim.lr_scheduler`` (including ReduceLROnPlateau) and composites of them.
    """
    module = type(scheduler).__module__
    if module != lrs.__name__:
        return False
    return all(is_known_scheduler(child) for child in _children(scheduler))


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * factor
    if value is None:
        return None
    return value * factor


def scale_param_groups(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply the LR keys (:data:`GROUP_LR_KEYS`) of every param group of ``optimizer`` by ``factor``.

    Tensor-valued LRs (capturable/fused optimizers) are scaled in place so that the tensor object is kept; a tensor
    shared by two keys, or by several param groups (``Adam(groups, lr=torch.tensor(...))`` gives every group the
    same tensor), is scaled once.
    """
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for key in GROUP_LR_KEYS:
            if key not in group or group[key] is None:
                continue
            value = group[key]
            if isinstance(value, torch.Tensor):
                if id(value) not in seen:
                    seen.add(id(value))
                    value.mul_(factor)
            else:
                group[key] = value * factor


def scale_scheduler(scheduler: Any, factor: float, extra_attrs: Iterable[str] = ()) -> None:
    """Multiply the LR constants kept by ``scheduler`` (not its optimizer's param groups) by ``factor``.

    Scales ``base_lrs``, ``max_lrs`` (CyclicLR), ``min_lrs`` and ``default_min_lr`` (ReduceLROnPlateau), ``eta_min``
    (cosine schedules), ``_last_lr``, every attribute named in ``extra_attrs``, and recurses into the children of
    ``SequentialLR`` and ``ChainedScheduler``. A child shared with another composite is scaled once.
    """
    _scale_scheduler(scheduler, factor, tuple(extra_attrs), set())


def _scale_scheduler(scheduler: Any, factor: float, extra: tuple[str, ...], seen: set[int]) -> None:
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    for child in _children(scheduler):
        _scale_scheduler(child, factor, extra, seen)
    for attr in _LIST_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, (list, tuple)):
            setattr(scheduler, attr, type(values)(_scaled(v, factor) for v in values))
    default_min_lr = getattr(scheduler, "default_min_lr", None)
    if isinstance(scheduler, lrs.ReduceLROnPlateau) and default_min_lr is not None:
        scheduler.default_min_lr = default_min_lr * factor
    if isinstance(scheduler, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)):
        scheduler.eta_min = scheduler.eta_min * factor
    for attr in extra:
        value = getattr(scheduler, attr, None)
        if isinstance(value, (list, tuple)):
            setattr(scheduler, attr, type(value)(_scaled(v, factor) for v in value))
        elif value is not None:
            setattr(scheduler, attr, _scaled(value, factor))


def scale_lr(
    optimizers: Sequence[torch.optim.Optimizer] | torch.optim.Optimizer,
    schedulers: Sequence[Any] | Any = (),
    factor: float = 0.5,
    extra_attrs: Iterable[str] = (),
) -> None:
    """Scale the learning rate of ``optimizers`` by ``factor`` so that every later LR their ``schedulers`` produce
    is ``factor`` times what it would have been.

    Pass the raw torch optimizers (not Lightning's ``LightningOptimizer`` wrappers) and every scheduler attached to
    them; composite schedulers are followed into their children. Each optimizer and each scheduler is scaled once,
    even when listed twice. Call it *after* restoring any state (a restore brings back the old LR).

    Args:
        optimizers: one optimizer or a sequence of them.
        schedulers: one scheduler, a sequence of them, or nothing.
        factor: the multiplier, a finite number > 0.
        extra_attrs: further scheduler attributes (numbers or lists of numbers) to scale, for custom schedulers.

    Raises:
        ValueError: if ``factor`` is not a finite number > 0.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=1.0)
        >>> sch = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        >>> scale_lr(opt, sch, 0.5)
        >>> opt.param_groups[0]["lr"], sch.base_lrs
        (0.5, [0.5])
    """
    factor_f = float(factor)
    if not (factor_f > 0 and factor_f != float("inf")):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    if schedulers is None:
        schedulers = ()
    scheds = list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]
    done: set[int] = set()
    for opt in opts:
        if id(opt) not in done:
            done.add(id(opt))
            scale_param_groups(opt, factor_f)
    seen: set[int] = set()
    extra = tuple(extra_attrs)
    for sch in scheds:
        _scale_scheduler(sch, factor_f, extra, seen)


class LRCeiling:
    """The highest LR a schedule may reach after it was shown to be too high, per optimizer and param group.

    A cut multiplies the schedule, but a schedule that keeps raising the LR (a warm-up that overshoots, an LR ramp)
    walks back past a 0.5x cut within a few steps. When the loss climbed *because the LR grew* (the stability
    controller's climbing rules act only then), the guard knows two LRs: the one of the best window, at which the
    run trained well, and the newer one, at which it climbed. :meth:`hold` makes the better one a ceiling for the
    optimizer whose loss climbed; :meth:`apply` clamps its param groups to it before each update, so the schedule
    runs on below it and takes over again once it falls under it (a cosine decay after a warm-up).

    The ceiling is kept at the guard's cumulative LR scale 1 (``unit`` values): every later cut lowers it with the
    schedule and every LR recovery raises it, so a cut is never absorbed by the ceiling. Once the recoveries have
    brought the scale back to 1, :meth:`release` drops it (the user's schedule is in force again). Host floats only;
    a tensor LR is clamped in place (no device read).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
        >>> ceiling = LRCeiling()
        >>> ceiling.hold(0, opt, best_lr=0.1, lr_scale=0.5)
        True
        >>> opt.param_groups[0]["lr"] = 0.8  # the schedule raises the LR
        >>> ceiling.apply([opt], lr_scale=0.5), opt.param_groups[0]["lr"]
        (True, 0.1)
        >>> ceiling.apply([opt], lr_scale=0.25), opt.param_groups[0]["lr"]  # a later cut lowers the ceiling too
        (True, 0.05)
    """

    def __init__(self) -> None:
        self.units: dict[int, list[float]] = {}  # optimizer index -> the ceiling of each param group at LR scale 1

    def __bool__(self) -> bool:
        return bool(self.units)

    def hold(self, index: int, optimizer: Any, best_lr: float, lr_scale: float) -> bool:
        """Cap optimizer ``index`` (``optimizer``, its LRs as they are now) so that its largest LR is ``best_lr`` at
        the current cumulative ``lr_scale``; its other groups keep their ratio to it. A lower existing ceiling stays.
        Returns whether a ceiling is set (False: no usable LR, e.g. a tensor LR on an accelerator, never read)."""
        groups = getattr(optimizer, "param_groups", ())
        lrs = [_host_lr(group.get("lr")) for group in groups]
        top = max((lr for lr in lrs if lr is not None), default=None)
        if top is None or not (top > 0 and best_lr > 0 and math.isfinite(best_lr) and lr_scale > 0):
            return False
        ratio = best_lr / top
        units = [(lr if lr is not None else top) * ratio / lr_scale for lr in lrs]
        old = self.units.get(index)
        if old is not None and len(old) == len(units):
            units = [min(a, b) for a, b in zip(old, units)]
        self.units[index] = units
        return True

    def apply(self, optimizers: Sequence[Any], lr_scale: float) -> bool:
        """Clamp every capped param group's LR to its ceiling at ``lr_scale``; returns whether any was above it."""
        clamped = False
        for index, units in self.units.items():
            if index >= len(optimizers):
                continue
            for group, unit in zip(getattr(optimizers[index], "param_groups", ()), units):
                cap, lr = unit * lr_scale, group.get("lr")
                if isinstance(lr, torch.Tensor):
                    lr.clamp_(max=cap)  # in place: a capturable optimizer keeps its tensor; no host read
                elif isinstance(lr, (int, float)) and lr > cap:
                    group["lr"] = cap
                    clamped = True
        return clamped

    def release(self) -> None:
        """Drop every ceiling (the LR scale is back at the user's schedule)."""
        self.units = {}

    def state_dict(self) -> dict[str, Any]:
        return {"units": {str(k): list(v) for k, v in self.units.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        units = dict((state or {}).get("units") or {})
        self.units = {int(k): [float(u) for u in v] for k, v in units.items()}


def _host_lr(lr: Any) -> float | None:
    if isinstance(lr, torch.Tensor):
        return float(lr.item()) if lr.is_cpu else None
    return float(lr) if isinstance(lr, (int, float)) else None
