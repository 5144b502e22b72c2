"""The stability controller: notice a learning rate that is too high before anything turns non-finite.

Clipping can hide a too-high learning rate for a long time: when the clipper cuts almost every step, the step size
is set by the threshold, not by the data, and the run stops learning without ever diverging. Only a lower LR helps.
:class:`StabilityController` watches three signals over ``window`` steps, each compared with the window before it
(so a run must be both unstable *and* not improving):

- **worse than untrained**: the median loss of both windows is above ``start_margin`` x the run's first loss (the
  untrained model's): a too-high LR from the first step, which clipping may keep finite but never makes learn;
- **killed at the start**: after a blow-up (a loss above twice the first), the median loss of both windows is
  back at the untrained level, not improving, while the gradient norm collapsed far below its first value (units
  killed by the violent first updates: the model sits at chance);
- **sustained clipping**: at least ``clip_fraction`` of the window's steps were clipped, the median loss of the
  window is not below the median of the window before, and it is above ``start_margin`` x the first loss. Clipping
  alone is no evidence: a threshold that lags a norm growing as the model learns clips most steps of a healthy run
  (measured on the LSTM example at its stable LR, and in the demo's plateau at the untrained loss after a rollback);
- **rising gradient norm**: the window's median norm is above ``norm_growth`` x the previous window's, and the loss
  is not improving;
- **climbing loss**: the window's median loss is above ``loss_growth`` x the previous window's, or above
  ``loss_growth`` x the lowest window median seen so far (a slow climb over several windows); the previous window
  must already be ``rising`` x above that lowest median (a climb spans windows: one bad batch that the clipper cut
  can double a single window's median, and that is no reason to cut the LR), and the loss above ``floor`` x the
  run's first loss (so that noise around a loss near zero never counts).

When one fires, :meth:`update` returns a plain-words reason ("learning rate looks too high: ...") and the guard
lowers the LR by ``lr_factor ** lr_power``; then the controller starts over (two fresh windows are needed before it
can fire again). A cut that follows the previous one within ``repeat_windows`` windows doubles ``lr_power``: an LR
10x too high is found in a few cuts, not in ten. Healthy runs improve their loss from one window to the next, so the
controller stays quiet on them. Host floats only: the
guard reads the loss, the norm and the clip flags once per step anyway.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import median
from typing import Any

__all__ = ["StabilityController"]


class StabilityController:
    """Says when the LR should come down, and by how much (see the module docstring).

    Args:
        window: steps per window (two windows are compared).
        clip_fraction: share of clipped steps in a window that counts as sustained clipping.
        norm_growth: growth of the median gradient norm between windows that counts as rising.
        loss_growth: growth of the median loss (over the previous window, or over the lowest window median seen)
            that counts as climbing.
        floor: a climbing loss must also be above this fraction of the run's first loss (a loss near zero that
            doubles from 0.004 to 0.008 is noise, not instability).
        start_margin: two windows in a row with a median loss above this multiple of the run's first loss: the
            model is worse than untrained (a too-high LR from the first step).
        stuck_margin, collapse: two windows with a median loss of at least ``stuck_margin`` x the first loss, no
            progress from one to the next, and the median gradient norm ``collapse`` x below the first norm: a
            network killed in its first steps (dead units; the loss sits at the untrained level), provided a loss
            above ``blowup`` x the first one was seen (the violent update that killed them). A warm-up from a tiny LR
            or a slow start at a sane LR also leave the loss where it started (the deep-CNN example at its stable LR
            sits at chance for 50 steps on one seed), but without that blow-up.
        rising: a climbing loss must already be above this multiple of its best window median in the window before.
        repeat_windows: a cut within this many windows of the previous one doubles the exponent of the cut
            (:attr:`lr_power`: 1, 2, 4, ...), a geometric search for a stable LR.

    Example:
        >>> ctl = StabilityController(window=4)
        >>> [ctl.update(1.0, 1.0, clipped=False) for _ in range(8)][-1] is None
        True
        >>> reasons = [ctl.update(1.0 + i, 1.0, clipped=True) for i in range(8)]
        >>> [r.split(":")[0] for r in reasons if r]
        ['learning rate looks too high']
    """

    def __init__(
        self,
        window: int = 25,
        clip_fraction: float = 0.8,
        norm_growth: float = 10.0,
        loss_growth: float = 2.0,
        floor: float = 0.1,
        repeat_windows: int = 4,
        start_margin: float = 1.1,
        rising: float = 1.2,
        stuck_margin: float = 0.85,
        collapse: float = 3.0,
        blowup: float = 2.0,
    ) -> None:
        self.window = int(window)
        self.clip_fraction = float(clip_fraction)
        self.norm_growth = float(norm_growth)
        self.loss_growth = float(loss_growth)
        self.floor = float(floor)
        self.repeat_windows = int(repeat_windows)
        self.start_margin = float(start_margin)
        self.rising = float(rising)
        self.stuck_margin = float(stuck_margin)
        self.collapse = float(collapse)
        self.blowup = float(blowup)
        self.interventions = 0
        self.lr_power = 1  # the exponent of the last cut (lr_factor ** lr_power)
        self.worse_than_start = False  # the last cut's reason: the model is worse than untrained
        self.damaged = False  # the last cut's reason: the loss climbed, the state is worse than two windows ago
        self._start: float | None = None  # the first loss seen (the untrained model's)
        self._start_norm: float | None = None  # the first gradient norm seen
        self._peak = -math.inf  # the highest loss seen
        self._best = math.inf  # the lowest window median seen
        self._steps = 0  # healthy steps seen
        self._last_fire: int | None = None
        self._streak = 0
        self.reset()

    def reset(self) -> None:
        """Start over: two fresh windows before the next judgement (the start loss and best median are kept)."""
        self._rows: deque[tuple[float, float, bool]] = deque(maxlen=2 * self.window)
        self._count = 0
        self._every = max(1, self.window // 5)

    def update(self, loss: float, grad_norm: float, clipped: bool) -> str | None:
        """Add one healthy step; returns why the LR should come down, or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return None
        if self._start is None:
            self._start, self._start_norm = abs(loss), grad_norm
        self._steps += 1
        self._peak = max(self._peak, loss)
        self._rows.append((loss, grad_norm, bool(clipped)))
        self._count += 1
        if len(self._rows) < 2 * self.window or self._count % self._every:
            return None  # judged every window/5 steps: the medians move slowly, and sorting costs
        rows = list(self._rows)
        old, new = rows[: self.window], rows[self.window :]
        old_loss, new_loss = median([r[0] for r in old]), median([r[0] for r in new])
        old_norm, new_norm = median([r[1] for r in old]), median([r[1] for r in new])
        clipped_share = sum(r[2] for r in new) / self.window
        not_improving = new_loss >= old_loss
        above_floor = new_loss > self.floor * (self._start or 0.0) and new_loss > 0
        best = self._best
        self._best = min(self._best, new_loss)
        # climbing: already rising in the window before (one bad batch that the clipper cut can leave a window's
        # loss twice the last one's for a while; a loss that keeps climbing is above its best in both windows)
        climbing = above_floor and best < math.inf and old_loss > self.rising * best
        start = self._start or 0.0
        reason, worse, damaged = None, False, False
        if new_norm > self.norm_growth * old_norm and not_improving:
            reason = (
                f"the gradient norm keeps rising (median {old_norm:.4g} -> {new_norm:.4g} over {self.window} steps) "
                "while the loss does not improve"
            )
        elif climbing and new_loss > self.loss_growth * old_loss:
            damaged = True
            reason = f"the loss keeps climbing (median {old_loss:.4g} -> {new_loss:.4g} over {self.window} steps)"
        elif climbing and new_loss > self.loss_growth * best:
            damaged = True
            reason = f"the loss climbed from its best (window median {best:.4g} -> {new_loss:.4g})"
        elif old_loss > self.start_margin * start and new_loss > self.start_margin * start and start > 0:
            worse = True
            reason = (
                f"after {self._steps} steps the loss is still above the untrained model's ({start:.4g}; medians of "
                f"the last two windows {old_loss:.4g}, {new_loss:.4g}; the clipper cut {clipped_share:.0%})"
            )
        elif (
            min(old_loss, new_loss) >= self.stuck_margin * start > 0
            and new_loss >= 0.99 * old_loss
            and new_norm * self.collapse < (self._start_norm or 0.0)
            and self._peak > self.blowup * start
        ):
            worse = True
            reason = (
                f"after {self._steps} steps the loss has not moved from the untrained model's ({start:.4g}; medians "
                f"{old_loss:.4g}, {new_loss:.4g}) and the gradient norm collapsed ({self._start_norm:.4g} -> median "
                f"{new_norm:.4g}): units killed in the first steps"
            )
        elif clipped_share >= self.clip_fraction and not_improving and new_loss > self.start_margin * start:
            reason = (
                f"the clipper cut {clipped_share:.0%} of the last {self.window} steps and the loss stopped falling "
                f"(median {old_loss:.4g} -> {new_loss:.4g})"
            )
        if reason is None:
            return None
        self.worse_than_start, self.damaged = worse, damaged
        repeated = self._last_fire is not None and self._steps - self._last_fire <= self.repeat_windows * self.window
        self._streak = self._streak + 1 if repeated else 0
        # a model made worse than untrained is an LR an order of magnitude off, not 2x: the first cut is squared
        self.lr_power = 2 ** (self._streak + (1 if worse and not repeated else 0))
        self._last_fire = self._steps
        self.interventions += 1
        self.reset()
        return "learning rate looks too high: " + reason

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": [list(r) for r in self._rows],
            "count": self._count,
            "interventions": self.interventions,
            "start": self._start,
            "start_norm": self._start_norm,
            "peak": self._peak if math.isfinite(self._peak) else None,
            "best": self._best if math.isfinite(self._best) else None,
            "steps": self._steps,
            "last_fire": self._last_fire,
            "streak": self._streak,
            "lr_power": self.lr_power,
            "worse_than_start": self.worse_than_start,
            "damaged": self.damaged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for row in state.get("rows", []):
            self._rows.append((float(row[0]), float(row[1]), bool(row[2])))
        self._count = int(state.get("count", len(self._rows)))
        self.interventions = int(state.get("interventions", 0))
        start, best, last = state.get("start"), state.get("best"), state.get("last_fire")
        self._start = None if start is None else float(start)
        peak = state.get("peak")
        self._peak = -math.inf if peak is None else float(peak)
        start_norm = state.get("start_norm")
        self._start_norm = None if start_norm is None else float(start_norm)
        self._best = math.inf if best is None else float(best)
        self._steps = int(state.get("steps", self._count))
        self._last_fire = None if last is None else int(last)
        self._streak = int(state.get("streak", 0))
        self.lr_power = int(state.get("lr_power", 1))
        self.worse_than_start = bool(state.get("worse_than_start", False))
        self.damaged = bool(state.get("damaged", False))
