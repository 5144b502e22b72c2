"""The stability controller: notice a learning rate that is too high before anything turns non-finite.

Clipping can hide a too-high learning rate for a long time: when the clipper cuts almost every step, the step size
is set by the threshold, not by the data, and the run stops learning without ever diverging. Only a lower LR helps.
:class:`StabilityController` watches three signals over ``window`` steps, each compared with the window before it
(so a run must be both unstable *and* not improving):

- **sustained clipping**: at least ``clip_fraction`` of the window's steps were clipped, and the median loss of the
  window is not below the median of the window before;
- **rising gradient norm**: the window's median norm is above ``norm_growth`` x the previous window's, and the loss
  is not improving;
- **climbing loss**: the window's median loss is above ``loss_growth`` x the previous window's.

When one fires, :meth:`update` returns a plain-words reason ("learning rate looks too high: ...") and the guard
lowers the LR; then the controller starts over (two fresh windows are needed before it can fire again). Healthy
runs improve their loss from one window to the next, so the controller stays quiet on them. Host floats only: the
guard reads the loss, the norm and the clip flags once per step anyway.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["StabilityController"]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class StabilityController:
    """Says when the LR should come down (see the module docstring).

    Args:
        window: steps per window (two windows are compared).
        clip_fraction: share of clipped steps in a window that counts as sustained clipping.
        norm_growth: growth of the median gradient norm between windows that counts as rising.
        loss_growth: growth of the median loss between windows that counts as climbing.

    Example:
        >>> ctl = StabilityController(window=4)
        >>> [ctl.update(1.0, 1.0, clipped=False) for _ in range(8)][-1] is None
        True
        >>> reasons = [ctl.update(1.0 + i, 1.0, clipped=True) for i in range(8)]
        >>> [r.split(":")[0] for r in reasons if r]
        ['learning rate looks too high']
    """

    def __init__(
        self, window: int = 100, clip_fraction: float = 0.8, norm_growth: float = 10.0, loss_growth: float = 2.0
    ) -> None:
        self.window = int(window)
        self.clip_fraction = float(clip_fraction)
        self.norm_growth = float(norm_growth)
        self.loss_growth = float(loss_growth)
        self.interventions = 0
        self.reset()

    def reset(self) -> None:
        """Start over: two fresh windows before the next judgement."""
        self._rows: deque[tuple[float, float, bool]] = deque(maxlen=2 * self.window)
        self._count = 0
        self._every = max(1, self.window // 10)

    def update(self, loss: float, grad_norm: float, clipped: bool) -> str | None:
        """Add one healthy step; returns why the LR should come down, or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return None
        self._rows.append((loss, grad_norm, bool(clipped)))
        self._count += 1
        if len(self._rows) < 2 * self.window or self._count % self._every:
            return None  # judged every window/10 steps: the medians move slowly, and sorting costs
        rows = list(self._rows)
        old, new = rows[: self.window], rows[self.window :]
        old_loss, new_loss = _median([r[0] for r in old]), _median([r[0] for r in new])
        old_norm, new_norm = _median([r[1] for r in old]), _median([r[1] for r in new])
        clipped_share = sum(r[2] for r in new) / self.window
        not_improving = new_loss >= old_loss
        reason = None
        if clipped_share >= self.clip_fraction and not_improving:
            reason = (
                f"the clipper cut {clipped_share:.0%} of the last {self.window} steps and the loss stopped falling "
                f"(median {old_loss:.4g} -> {new_loss:.4g})"
            )
        elif new_norm > self.norm_growth * old_norm and not_improving:
            reason = (
                f"the gradient norm keeps rising (median {old_norm:.4g} -> {new_norm:.4g} over {self.window} steps) "
                "while the loss does not improve"
            )
        elif new_loss > self.loss_growth * old_loss + 1e-12 * abs(old_loss) and new_loss > 0:
            reason = f"the loss keeps climbing (median {old_loss:.4g} -> {new_loss:.4g} over {self.window} steps)"
        if reason is None:
            return None
        self.interventions += 1
        self.reset()
        return "learning rate looks too high: " + reason

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [list(r) for r in self._rows], "count": self._count, "interventions": self.interventions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for row in state.get("rows", []):
            self._rows.append((float(row[0]), float(row[1]), bool(row[2])))
        self._count = int(state.get("count", len(self._rows)))
        self.interventions = int(state.get("interventions", 0))
