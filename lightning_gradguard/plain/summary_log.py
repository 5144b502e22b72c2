"""The plain-loop guard's TensorBoard output: the callbacks' ``gradguard/`` tags, written to a ``SummaryWriter``.

Scalars every ``log_every_n_steps`` steps and at every event, with the interval's extremes (``grad_norm_max``,
``loss_max``, ``flagged_steps``, ``clipped_steps``) so a spike between two log steps is not lost; event lines as
text under ``gradguard/nan_guard_events``. The step axis is the guard's step counter (optimizer steps attempted
before this one, like the Trainer's ``global_step``). Rank 0 only; nothing at all without a writer. Per-optimizer
tags get ``_opt<i>`` for optimizers after the first; ``grad_norm_max``/``grad_norm_mean`` describe the norm the guard
judges (over all optimizers of the step; the same as ``grad_norm`` with one optimizer).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lightning_gradguard.core.guard._policy import GuardEvent
from lightning_gradguard.core.measure._grad_stats import norms_of

if TYPE_CHECKING:
    from lightning_gradguard.plain.grad_guard import GradGuard

__all__ = ["SummaryLog", "tag"]


def tag(name: str, optimizer_idx: int = 0) -> str:
    """``gradguard/<name>``, with ``_opt<i>`` appended for optimizers after the first (as the callbacks do)."""
    return f"gradguard/{name}" if optimizer_idx == 0 else f"gradguard/{name}_opt{optimizer_idx}"


class SummaryLog:
    """Writes a :class:`~lightning_gradguard.plain.GradGuard`'s scalars and events to ``writer`` (may be None)."""

    def __init__(self, guard: GradGuard, writer: Any) -> None:
        self.g = guard
        self.writer = writer
        self._reset()

    def _reset(self) -> None:
        self._norm_max = -math.inf
        self._norm_sum = 0.0
        self._norm_count = 0
        self._loss_max: float | None = None
        self._flagged = 0

    @property
    def active(self) -> bool:
        return self.writer is not None and self.g.rank in (0, None)

    def observe(self, norm: float, loss: float | None) -> None:
        """One step's (rank-agreed) pre-clip norm and loss, already on the host."""
        if not self.active:
            return
        self._norm_max = max(self._norm_max, norm) if not math.isnan(norm) else math.inf
        if math.isfinite(norm):
            self._norm_sum += norm
            self._norm_count += 1
        if loss is not None:
            self._loss_max = loss if self._loss_max is None or not loss <= self._loss_max else self._loss_max

    def scalars(self, step: int, final: bool = False) -> None:
        """Write every scalar for the interval ending at ``step`` and start a new interval."""
        if not self.active:
            return
        g, values = self.g, {}
        for idx, slot in enumerate(g._slots):
            stats, record = slot.stats, slot.record
            if stats is not None and stats.grads and not final:
                values[tag("grad_norm", idx)] = float(stats.total_norm)
                values[tag("grad_norm_clipped", idx)] = float(
                    torch.linalg.vector_norm(norms_of(stats.grads, stats.norm_type), stats.norm_type)
                )
            if record is not None:
                if record.threshold is not None:
                    values[tag("clip_threshold", idx)] = float(record.threshold)
                z = record.zscore
                if z is not None:
                    values[tag("grad_norm_zscore", idx)] = float(z)
            if slot.steps_since_log:
                values[tag("clip_fraction", idx)] = float(slot.clipped_since_log) / slot.steps_since_log
                values[tag("clipped_steps", idx)] = float(slot.clipped_since_log)
            slot.clipped_since_log = slot.steps_since_log = 0
            opt = g.optimizers[idx]
            values[tag("lr", idx)] = float(opt.param_groups[0]["lr"])
        if self._norm_count or self._norm_max > -math.inf:
            values[tag("grad_norm_max")] = self._norm_max
            values[tag("grad_norm_mean")] = self._norm_sum / self._norm_count if self._norm_count else math.nan
        self._guard_values(values)
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()
        self._reset()

    def _guard_values(self, values: dict[str, float]) -> None:
        g = self.g
        values[tag("skipped_steps")] = float(g.skipped_steps)
        values[tag("rollbacks")] = float(g.rollbacks)
        values[tag("lr_scale")] = g.lr_scale
        values[tag("flagged_steps")] = float(self._flagged)
        if self._loss_max is not None:
            values[tag("loss_max")] = self._loss_max
        if g.scaler is not None:
            values[tag("amp_overflow_steps")] = float(g.amp_overflow_steps)

    def event(self, event: GuardEvent) -> None:
        """An event: its text line and the guard's scalars, at the event's step."""
        if event.kind in ("skip", "rollback", "halt"):
            self._flagged += 1
        if not self.active:
            return
        values: dict[str, float] = {}
        self._guard_values(values)
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=event.step)
        self.writer.add_text(
            tag("nan_guard_events"), event.line().replace("NaNGuard", "GradGuard"), global_step=event.step
        )
        self.writer.flush()
        self._flagged = 0
        self._loss_max = None
