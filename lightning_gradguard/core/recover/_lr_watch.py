"""Learning rates a training loop sets by hand, found so that the guard's LR cut stays in force.

Many loops write the LR themselves every iteration (nanoGPT: ``param_group["lr"] = get_lr(it)``). Such a write
replaces whatever the guard left in the param group, so a cut made by a rollback or the stability controller (which
scales the param groups and the schedulers' constants, ``core/recover/_lr_scaling.py``) would last until the next
write only. :class:`LrWatch` remembers each param group's LR as the guard left it (at the end of ``before_step``
and of ``after_step``) and, when asked, names the groups whose LR changed since by another hand than a registered
scheduler's: a scheduler that stepped reports the new LR as its own last LR (``_last_lr``, kept by every
``torch.optim.lr_scheduler`` class, composites and ``ReduceLROnPlateau`` included), so a scheduler stepped before
or after ``after_step`` is never taken for a hand-set LR. :func:`reapply_scale` puts the cut on top of the value the
loop wrote; :func:`keep_cut` does it for every such group. The plain loop's ``GradGuard`` and the Lightning
``NaNGuard`` (a ``training_step`` that writes ``self.optimizers().param_groups[i]["lr"]``) both use it.

A scheduler the guard was not given cannot be told apart from a hand-set LR by its values, and re-applying the cut
after each step of a recursive one (``lr <- lr * gamma``, which already carries the cut) would compound it. Every
``torch.optim.lr_scheduler`` scheduler but ``ReduceLROnPlateau`` marks the ``step`` of its optimizer
(``_wrapped_by_lr_sched``), so an optimizer with such a mark and no registered scheduler is left alone and reported
(:attr:`LrWatch.unregistered`) instead.

LRs that are tensors on an accelerator are not read (reading one would synchronise the device every step); a CPU
tensor LR is read and scaled in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: what ``GradGuard(lr_overwrite=...)`` does about an LR the loop set by hand while the guard's cut is in force
LR_OVERWRITE = ("reapply", "warn", "ignore")


@dataclass(frozen=True)
class HandSetLr:
    """One param group whose LR the loop overwrote: ``optimizer`` and ``group`` indices, the LR the guard had left
    there (``left``) and the one the loop wrote (``now``)."""

    optimizer: int
    group: int
    left: float
    now: float


def _host_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.is_cpu and value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def _raw(optimizer: Any) -> Any:
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class LrWatch:
    """Each param group's LR as the guard left it, and the groups the loop has written since (see the module
    docstring).

    Args:
        optimizers: the raw torch optimizers.
        schedulers: the schedulers registered with the guard (their last LR explains a change).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        >>> watch = LrWatch([opt], [])
        >>> opt.param_groups[0]["lr"] = 1.0   # the loop's schedule, written by hand
        >>> watch.hand_set()
        [HandSetLr(optimizer=0, group=0, left=0.5, now=1.0)]
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], schedulers: list[Any]) -> None:
        self._optimizers = optimizers
        self._schedulers = schedulers
        self._left: list[list[float | None]] = []
        #: indices of optimizers whose LR changed under a scheduler the guard was not given (at the last
        #: :meth:`hand_set`); their groups are not reported as hand-set.
        self.unregistered: list[int] = []
        self.record()

    def record(self) -> None:
        """Remember every param group's LR as it is now (what the guard leaves)."""
        self._left = [[_host_float(g.get("lr")) for g in opt.param_groups] for opt in self._optimizers]

    def hand_set(self) -> list[HandSetLr]:
        """The param groups whose LR changed since :meth:`record`, other than to a registered scheduler's last LR."""
        found: list[HandSetLr] = []
        self.unregistered = []
        for i, (opt, left) in enumerate(zip(self._optimizers, self._left)):
            scheduled: list[list[float | None]] | None = None
            for j, group in enumerate(opt.param_groups):
                was = left[j] if j < len(left) else None  # a group added since: nothing to compare with
                now = _host_float(group.get("lr"))
                if was is None or now is None or now == was:
                    continue
                if scheduled is None:
                    scheduled = self._scheduler_lrs(opt)
                    if not scheduled and hasattr(opt.step, "_wrapped_by_lr_sched"):
                        self.unregistered.append(i)  # a torch scheduler the guard was not given: hands off
                if i in self.unregistered or any(j < len(lrs) and lrs[j] == now for lrs in scheduled):
                    continue  # a scheduler stepped: its values already carry the cut
                found.append(HandSetLr(i, j, was, now))
        return found

    def _scheduler_lrs(self, optimizer: torch.optim.Optimizer) -> list[list[float | None]]:
        """The last LRs of the registered schedulers of ``optimizer`` (empty: none registered)."""
        out = []
        for scheduler in self._schedulers:
            if _raw(getattr(scheduler, "optimizer", None)) is optimizer:
                last = getattr(scheduler, "_last_lr", None)
                out.append([_host_float(v) for v in last] if isinstance(last, (list, tuple)) else [])
        return out


def reapply_scale(optimizer: torch.optim.Optimizer, group: int, scale: float) -> None:
    """Multiply the LR of ``optimizer``'s param group ``group`` (the value the loop wrote) by ``scale``."""
    param_group = optimizer.param_groups[group]
    lr = param_group["lr"]
    if isinstance(lr, torch.Tensor):
        lr.mul_(scale)  # keep the tensor object (capturable/fused optimizers hold it)
    else:
        param_group["lr"] = lr * scale


def keep_cut(
    watch: LrWatch, optimizers: list[Any], scale: float, written: list[HandSetLr] | None = None
) -> list[HandSetLr]:
    """Re-apply ``scale`` (the guard's LR cut) to every param group of ``optimizers`` whose LR was set by hand since
    ``watch`` last recorded (``written``: :meth:`LrWatch.hand_set`'s answer, when already asked), then record;
    returns those groups (empty: nothing was written by hand)."""
    written = watch.hand_set() if written is None else written
    for item in written:
        reapply_scale(_raw(optimizers[item.optimizer]), item.group, scale)
    if written:
        watch.record()
    return written
