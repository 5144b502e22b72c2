"""How the plain-loop guard judges one optimizer step: one stack of scalars, one cross-rank max, one host read.

The rules are the core detectors' (:class:`~lightning_gradguard.core.divergence.DivergenceDetector`,
:class:`~lightning_gradguard.core.stability.StabilityController`,
:class:`~lightning_gradguard.core.loss_spike.LossSpikeDetector`); this module feeds them the step's pre-clip norm,
loss and flags in the order ``NaNGuard`` does, so both guards see the same inputs, and returns a
:class:`~lightning_gradguard.core.guard_policy.StepHealth` for the policy.

An inf gradient norm with a GradScaler and a finite loss is an AMP overflow (the scaler skips the step itself), not a
fault. The norm is the float64 one, finite exactly when every gradient element is. Under DDP the step's causes are
what this rank saw and the decision inputs (overflow, divergence, stability) are the maximum over the ranks, so the
detectors stay in lockstep; a rank that saw nothing itself records ``other_rank``.
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


def total_norm64(live: list[GradStats], device: torch.device) -> Tensor:
    """The float64 pre-clip norm over every optimizer's gradients (the p-norm of their total norms): finite exactly
    when every gradient element is (a huge finite gradient is the clipper's business, not a fault)."""
    if not live:
        return torch.zeros((), dtype=torch.float64, device=device)
    if len(live) == 1:
        return live[0].total_norm64
    p = live[0].norm_type
    norms = torch.stack([s.total_norm64.to(device) for s in live])
    return norms.max() if p == math.inf else torch.linalg.vector_norm(norms, p)


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
        #: clip flags (bools or device tensors) of the last step taken: the stability controller's input next step.
        self.clip_flags: list[Any] = []
        self._last: tuple[float, float] | None = None

    def judge(self, step: int, stats: list[GradStats], loss: Tensor | float | None, scaler: Any) -> Verdict:
        live = [s for s in stats if s.grads]
        dev = live[0].device if live else torch.device("cpu")
        has_loss = loss is not None
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        loss_t = torch.as_tensor(loss).detach().to(dev, torch.float64).reshape(()) if has_loss else zero
        scaled = scaler is not None and scaler.is_enabled()
        scale_bad = zero
        scale = getattr(scaler, "_scale", None) if scaled else None
        if isinstance(scale, Tensor):  # the scale tensor itself: get_scale() would read it to the host
            scale_bad = (scale.to(dev).reshape(()) < self.amp_scale_floor).to(torch.float64)
        spike = self.spike.update(loss_t) if (self.spike is not None and has_loss) else zero
        parts = [total_norm64(live, dev), loss_t, (~torch.isfinite(loss_t)).to(torch.float64), scale_bad, spike]
        parts += [torch.as_tensor(c, device=dev).to(torch.float64) for c in self.clip_flags]  # tensors: no read
        local = torch.stack([p.to(torch.float64).reshape(()) for p in parts])
        self.clip_flags = []
        reduced = self.reduce(local)
        values = reduced.tolist() if reduced is local else torch.cat([local, reduced]).tolist()
        mine, glob = values[: len(parts)], values[-len(parts) :]
        norm, loss_v = mine[0], (mine[1] if has_loss else math.nan)
        self.grad_history.append([step, norm])
        if has_loss:
            self.loss_history.append([step, loss_v])
        # what this rank saw; the decision below uses what every rank shares
        health = StepHealth(
            step,
            nonfinite_loss=has_loss and mine[2] > 0,
            nonfinite_grad=not math.isfinite(norm),
            scale_collapse=mine[3] > 0,
            loss_spike=mine[4] > 0,
        )
        global_grad_bad = not math.isfinite(glob[0])
        overflow = scaled and global_grad_bad and not (glob[2] > 0 or glob[3] > 0)
        if overflow:
            health.nonfinite_grad = False  # the GradScaler's business
        elif self.divergence and has_loss:  # judged on shared values: the detectors stay in lockstep
            health.loss_divergence, health.grad_divergence = self.detector.update(glob[1], glob[0])
        if health.cause is None and ((global_grad_bad and not overflow) or any(v > 0 for v in glob[2:5])):
            health.other_rank = True
        healthy = health.cause is None and not overflow
        lower = None
        if self.stability and healthy and self._last is not None:
            lower = self.controller.update(*self._last, clipped=any(v > 0 for v in glob[5:]))
        self._last = (glob[1], glob[0]) if healthy and has_loss else None
        verdict = Verdict(None, overflow, lower, loss_v if has_loss else None, norm, live)
        if health.cause is not None:
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
            "grad_history": [list(r) for r in self.grad_history],
            "loss_history": [list(r) for r in self.loss_history],
            "pending_row": list(self._last) if self._last is not None else None,
            "clip_flags": [bool(c) for c in self.clip_flags],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("divergence") or {})
        self.controller.load_state_dict(state.get("stability") or {})
        if self.spike is not None and state.get("spike"):
            self.spike.load_state_dict(state["spike"])
        self.grad_history.clear()
        self.grad_history.extend(list(r) for r in state.get("grad_history", []))
        self.loss_history.clear()
        self.loss_history.extend(list(r) for r in state.get("loss_history", []))
        row = state.get("pending_row")
        self._last = None if row is None else (float(row[0]), float(row[1]))
        self.clip_flags = [bool(c) for c in state.get("clip_flags", [])]
