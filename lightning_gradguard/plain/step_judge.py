"""How the plain-loop guard judges one optimizer step: one stack of scalars, one cross-rank max, one host read.

The rules are the core detectors' (:class:`~lightning_gradguard.core.divergence.DivergenceDetector`,
:class:`~lightning_gradguard.core.stability.StabilityController`,
:class:`~lightning_gradguard.core.loss_spike.LossSpikeDetector`); this module feeds them the step's pre-clip norm,
loss and flags in the order ``NaNGuard`` does, so both guards see the same inputs, and returns a
:class:`~lightning_gradguard.core.guard_policy.StepHealth` for the policy.

An inf gradient norm with a GradScaler and a finite loss is an AMP overflow (the scaler skips the step itself), not a
fault. Under DDP the flags are the maximum over the ranks: a rank that saw nothing itself records ``other_rank``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core.divergence import DivergenceDetector
from lightning_gradguard.core.grad_stats import GradStats
from lightning_gradguard.core.guard_policy import StepHealth
from lightning_gradguard.core.loss_spike import LossSpikeDetector
from lightning_gradguard.core.stability import StabilityController
from lightning_gradguard.plain.distributed import MaxReducer

__all__ = ["StepJudge", "Verdict"]


@dataclass
class Verdict:
    """The judgement of one step.

    Attributes:
        health: what was wrong, or None for a step to take.
        overflow: a GradScaler overflow step (taken; the scaler skips it).
        lower_lr: the stability controller's reason to lower the LR after this step, or None.
        loss, norm: the rank-agreed loss (None when not given) and pre-clip gradient norm.
        stats: the measured statistics of the optimizers that had gradients.
    """

    health: StepHealth | None
    overflow: bool
    lower_lr: str | None
    loss: float | None
    norm: float
    stats: list[GradStats] = field(default_factory=list)


def total_norm(live: list[GradStats], device: torch.device) -> Tensor:
    """The pre-clip norm over every optimizer's gradients (the p-norm of their total norms)."""
    if not live:
        return torch.zeros((), dtype=torch.float32, device=device)
    if len(live) == 1:
        return live[0].total_norm
    p = live[0].norm_type
    norms = torch.stack([s.total_norm64.to(device) for s in live])
    return (norms.max() if p == math.inf else torch.linalg.vector_norm(norms, p)).to(torch.float32)


class StepJudge:
    """Feeds the detectors and builds each step's :class:`Verdict`."""

    def __init__(
        self,
        reduce: MaxReducer,
        divergence: bool,
        stability: bool,
        spike_zscore: float | None,
        spike_window: int,
        amp_scale_floor: float,
        history_size: int,
    ) -> None:
        self.reduce = reduce
        self.divergence = divergence
        self.stability = stability
        self.amp_scale_floor = amp_scale_floor
        self.detector = DivergenceDetector()
        self.controller = StabilityController()
        self.spike = LossSpikeDetector(spike_zscore, spike_window) if spike_zscore else None
        self.grad_history: deque[list[float]] = deque(maxlen=history_size)
        self.loss_history: deque[list[float]] = deque(maxlen=history_size)
        #: clip flags of the last step taken (the stability controller's input at the next step).
        self.clip_flags: list[bool] = []
        self._last: tuple[float, float] | None = None

    def judge(self, step: int, stats: list[GradStats], loss: Tensor | float | None, scaler: Any) -> Verdict:
        live = [s for s in stats if s.grads]
        dev = live[0].device if live else torch.device("cpu")
        has_loss = loss is not None
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        loss_t = torch.as_tensor(loss).detach().to(dev, torch.float64).reshape(()) if has_loss else zero
        scaled = scaler is not None and scaler.is_enabled()
        scale_bad = torch.as_tensor(float(scaled and scaler.get_scale() < self.amp_scale_floor), device=dev)
        spike = self.spike.update(loss_t) if (self.spike is not None and has_loss) else zero
        parts = [total_norm(live, dev), loss_t, ~torch.isfinite(loss_t), scale_bad, spike]
        parts += [torch.as_tensor(float(c), device=dev) for c in self.clip_flags]
        local = torch.stack([p.to(torch.float64).reshape(()) for p in parts])
        self.clip_flags = []
        reduced = self.reduce(local)
        values = reduced.tolist() if reduced is local else torch.cat([local, reduced]).tolist()
        mine, values = values[: len(parts)], values[-len(parts) :]
        norm, loss_v, loss_bad, scale_v, spike_v = values[:5]
        was_clipped = any(v > 0 for v in values[5:])
        self.grad_history.append([step, norm])
        if has_loss:
            self.loss_history.append([step, loss_v])
        health = StepHealth(step, nonfinite_loss=has_loss and loss_bad > 0, scale_collapse=scale_v > 0)
        health.loss_spike = spike_v > 0
        grad_bad = not math.isfinite(norm)
        overflow = scaled and grad_bad and not (health.nonfinite_loss or health.scale_collapse)
        health.nonfinite_grad = grad_bad and not overflow
        if self.divergence and has_loss and not overflow:
            health.loss_divergence, health.grad_divergence = self.detector.update(loss_v, norm)
        lower = None
        if self.stability and self._last is not None and health.cause is None:
            lower = self.controller.update(*self._last, clipped=was_clipped)
        self._last = (loss_v, norm) if has_loss and health.cause is None and not overflow else None
        verdict = Verdict(None, overflow, lower, loss_v if has_loss else None, norm, live)
        if health.cause is None:
            return verdict
        if self.reduce.world_size > 1:  # what this rank saw, for the event's cause
            local_bad = not math.isfinite(mine[0]) or any(v > 0 for v in mine[2:5])
            if not local_bad and not (health.loss_divergence or health.grad_divergence):
                health = StepHealth(step, other_rank=True)
        if health.nonfinite_grad:
            overflowed = any(bool(s.norm_overflow) for s in live)
            health.grad_norm_overflow, health.nonfinite_grad = overflowed, not overflowed
        verdict.health = health
        return verdict

    def after_state_change(self) -> None:
        """A rollback or LR cut: the run restarts from another state (baselines kept, counting in progress not)."""
        self._last = None
        self.detector.restart_runs()
        self.controller.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "divergence": self.detector.state_dict(),
            "stability": self.controller.state_dict(),
            "spike": self.spike.state_dict() if self.spike is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("divergence") or {})
        self.controller.load_state_dict(state.get("stability") or {})
        if self.spike is not None and state.get("spike"):
            self.spike.load_state_dict(state["spike"])
