"""The share of recent steps the guard skipped: a run that skips most of its steps is not training.

Each skip is correct on its own (the step's loss or gradients were non-finite, the rerun found the batch at fault),
and each is announced; but a bad batch is rare by nature. When most steps of a window fail, the cause is the run's
(fp16 autocast without a GradScaler, a too-high LR, a damaged state) whatever each rerun said, and the run learns
nothing while every single event looks harmless. :class:`SkipRate` keeps one flag per step of the last ``window``
steps and finds the moment at least ``share`` of a full window was skipped; it says so once per window (a warning
event: the run is not training, with the numbers and the causes).

Example:
    >>> rate = SkipRate(window=10, share=0.5)
    >>> found = [rate.update(s % 3 != 0, "nonfinite_grad") for s in range(12)]
    >>> [i for i, f in enumerate(found) if f]
    [9]
    >>> found[9]
    '6 of the last 10 steps were skipped (nonfinite grad 6): the run is not training'
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any


class SkipRate:
    """One flag per step of the last ``window`` steps (skipped or not, with the cause of a skip).

    Args:
        window: how many recent steps are counted (>= 1).
        share: the share of a full window that must have been skipped (0 < share <= 1).
    """

    def __init__(self, window: int = 100, share: float = 0.5) -> None:
        self.window = max(1, int(window))
        self.share = float(share)
        self._marks: deque[str] = deque(maxlen=self.window)  # "" for a step that was not skipped, else its cause
        self._quiet = 0  # steps left before the finding may be given again

    def update(self, skipped: bool, cause: str = "") -> str | None:
        """Count one step; returns the finding (plain words) when a full window reaches the share, else None."""
        self._marks.append((cause or "unknown") if skipped else "")
        if self._quiet:
            self._quiet -= 1
            return None
        if len(self._marks) < self.window:
            return None
        causes = Counter(m for m in self._marks if m)
        skipped_n = sum(causes.values())
        if skipped_n < self.share * self.window:
            return None
        self._quiet = self.window - 1  # once per window: next judged on the following window alone
        parts = ", ".join(f"{c.replace('_', ' ')} {n}" for c, n in causes.most_common())
        return f"{skipped_n} of the last {self.window} steps were skipped ({parts}): the run is not training"

    def state_dict(self) -> dict[str, Any]:
        return {"marks": list(self._marks), "quiet": self._quiet}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self._marks = deque((str(m) for m in state.get("marks", [])), maxlen=self.window)
        self._quiet = int(state.get("quiet", 0))
