"""Finite divergence: a loss or gradient norm that leaves its healthy range, while every number is still finite.

NaN/inf are easy to see; a run whose loss goes from 0.1 to 1e12 and stays there is not, and it is the more common
way a too-high learning rate kills a model (nothing ever turns non-finite). :class:`DivergenceDetector` keeps a
robust baseline of the recent *healthy* values and flags:

- **loss jump**: the loss stays above ``jump_factor`` x the median of the recent healthy losses for ``persist``
  steps in a row (one bad batch is a spike, the clipper's business; a loss that stays up is a diverged model);
- **loss climb**: the loss stays above ``climb_factor`` x the lowest median seen so far for ``climb_steps`` steps in
  a row (a slow blow-up that a moving baseline would follow);
- **gradient norm**: the pre-clip norm stays above ``grad_factor`` x the median of the recent healthy norms for
  ``persist`` steps in a row.

The detector also says whether the run was **unsettled** just before a fault: whether any of the last ``recent``
judged steps had a loss above ``unsettled_factor`` x its median or a norm above ``grad_unsettled_factor`` x its
median. A NaN after such a stretch is the trajectory's (a too-high LR), one after healthy steps the batch's: the
guard policy uses this to tell a repeated fault that needs a lower LR from a burst of bad batches.

Medians over a short window (not means) are the baselines, so one spike does not move them, and values beyond the
factors never enter them, so a blow-up cannot become its own reference. The loss is judged from the second step on
(a too-high learning rate blows it up within a few steps); the gradient norm after ``min_samples`` healthy values.
The detector works on host floats: the guard reads the loss and the norm once per step anyway (its one host
transfer), so this costs a few Python comparisons and a sort of ``window`` numbers per step.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


def median(values: deque[float]) -> float:
    """``statistics.median`` of a non-empty window (the same arithmetic, without its checks and conversions: two to
    three medians a step)."""
    data = sorted(values)
    i = len(data) // 2
    return data[i] if len(data) % 2 else (data[i - 1] + data[i]) / 2


class DivergenceDetector:
    """Flags a loss or gradient norm that left its healthy range (see the module docstring).

    Args:
        jump_factor: loss above this multiple of its recent median counts as out of range (> 1).
        climb_factor: loss above this multiple of the lowest median seen counts as climbing (> 1).
        climb_steps: steps in a row the climb must last.
        grad_factor: gradient norm above this multiple of its recent median counts as out of range (> 1).
        persist: steps in a row a jump must last.
        window: how many recent healthy values the medians cover.
        min_samples: healthy gradient norms needed before the norm is judged.
        unsettled_factor: a loss above this multiple of its recent median makes the run unsettled.
        grad_unsettled_factor: a norm above this multiple of its recent median makes the run unsettled.
        recent: how many of the last judged steps :attr:`unsettled` looks at.
        floor: the loss factors apply to ``max(median, floor x the first loss)``: late in training a loss near zero
            may jump 100x on a hard batch and still be small next to where the run started.

    Example:
        >>> det = DivergenceDetector(persist=2)
        >>> [det.update(loss, 1.0) for loss in (1.0, 0.9, 1.1, 0.8)]
        [(False, False), (False, False), (False, False), (False, False)]
        >>> [det.update(loss, 1.0) for loss in (500.0, 600.0)]
        [(False, False), (True, False)]
    """

    def __init__(
        self,
        jump_factor: float = 100.0,
        climb_factor: float = 10.0,
        climb_steps: int = 20,
        grad_factor: float = 1000.0,
        persist: int = 3,
        window: int = 32,
        min_samples: int = 5,
        unsettled_factor: float = 3.0,
        grad_unsettled_factor: float = 10.0,
        recent: int = 10,
        floor: float = 0.1,
    ) -> None:
        self.jump_factor = float(jump_factor)
        self.climb_factor = float(climb_factor)
        self.climb_steps = int(climb_steps)
        self.grad_factor = float(grad_factor)
        self.persist = int(persist)
        self.window = int(window)
        self.min_samples = int(min_samples)
        self.unsettled_factor = float(unsettled_factor)
        self.grad_unsettled_factor = float(grad_unsettled_factor)
        self.recent = int(recent)
        self.floor = float(floor)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new baseline is learned)."""
        self._losses: deque[float] = deque(maxlen=self.window)
        self._norms: deque[float] = deque(maxlen=self.window)
        self._best: float = math.inf
        self._start: float | None = None  # the first loss judged (the untrained model's): sets the floor
        self._loss_run = 0
        self._climb_run = 0
        self._grad_run = 0
        self._last_unsettled: int | None = None  # judged steps since the last unsettled one (None: none seen)
        self.loss_reference: float | None = None
        self.grad_reference: float | None = None

    def restart_runs(self) -> None:
        """Forget the counting in progress but keep the baselines (after a rollback to a healthy state)."""
        self._loss_run = self._climb_run = self._grad_run = 0
        self._last_unsettled = None

    @property
    def unsettled(self) -> bool:
        """Whether one of the last ``recent`` judged steps had its loss or norm far above their medians."""
        return self._last_unsettled is not None and self._last_unsettled < self.recent

    def update(self, loss: float, grad_norm: float) -> tuple[bool, bool]:
        """Judge one step's loss and pre-clip gradient norm; returns ``(loss_divergence, grad_divergence)``.

        Non-finite values are neither judged nor learned (they are the non-finite checks' business).
        """
        if self._last_unsettled is not None:
            self._last_unsettled += 1
        loss_bad = self._judge_loss(loss) if math.isfinite(loss) else False
        grad_bad = self._judge_grad(grad_norm) if math.isfinite(grad_norm) else False
        return loss_bad, grad_bad

    def _judge_loss(self, loss: float) -> bool:
        # judged from the first healthy loss on: a too-high LR blows the loss up within the first few steps, and a
        # loss that stays 100x above where the run started is never healthy
        if self._start is None:
            self._start = abs(loss)
        if not self._losses:
            self._losses.append(loss)
            return False
        ref = median(self._losses)
        self.loss_reference = ref
        floor = self.floor * self._start  # a loss near zero that jumps 100x is still a small loss
        scale = max(abs(ref), floor) + 1e-12
        if loss > ref + (self.unsettled_factor - 1.0) * scale:
            self._last_unsettled = 0
        jumped = loss > ref + (self.jump_factor - 1.0) * scale
        self._loss_run = self._loss_run + 1 if jumped else 0
        best_scale = max(abs(self._best), floor) + 1e-12
        climbing = self._best < math.inf and loss > self._best + (self.climb_factor - 1.0) * best_scale
        self._climb_run = self._climb_run + 1 if climbing else 0
        if not jumped and not climbing:
            self._losses.append(loss)
            if len(self._losses) == self.window:
                self._best = min(self._best, median(self._losses))
        return self._loss_run >= self.persist or self._climb_run >= self.climb_steps

    def _judge_grad(self, norm: float) -> bool:
        if len(self._norms) < self.min_samples:
            self._norms.append(norm)
            return False
        ref = median(self._norms)
        self.grad_reference = ref
        if norm > self.grad_unsettled_factor * ref + 1e-30:
            self._last_unsettled = 0
        far = norm > self.grad_factor * ref + 1e-30
        self._grad_run = self._grad_run + 1 if far else 0
        if not far:
            self._norms.append(norm)
        return self._grad_run >= self.persist

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self._losses),
            "norms": list(self._norms),
            "best": self._best if math.isfinite(self._best) else None,
            "start": self._start,
            "runs": [self._loss_run, self._climb_run, self._grad_run],
            "last_unsettled": self._last_unsettled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._losses.extend(float(v) for v in state.get("losses", []))
        self._norms.extend(float(v) for v in state.get("norms", []))
        best = state.get("best")
        self._best = math.inf if best is None else float(best)
        start = state.get("start")
        self._start = None if start is None else float(start)
        runs = list(state.get("runs", [0, 0, 0])) + [0, 0, 0]
        self._loss_run, self._climb_run, self._grad_run = (int(r) for r in runs[:3])
        last = state.get("last_unsettled")
        self._last_unsettled = None if last is None else int(last)
