"""The spike score: one number for how spiky a run has been, comparable between runs and settings.

OLMo-core's stability monitor (``olmo_core/train/callbacks/stability_monitor.py``) and the AdaGC paper (Wang et al.,
2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining") summarise a run by the share of
steps whose loss *or* gradient norm lies more than 6 standard deviations above the mean of the previous 128 values.
:class:`SpikeScore` computes that share for one loss stream, from the values the guard already reads every step:

- a value is compared with the previous ``window`` finite values of its own series (loss, norm), only once that
  window is full; the step is a spike when either series spikes;
- a non-finite loss or norm is a spike (the worst kind) at any step, even before a window is full, and never enters
  a window;
- the score is ``spikes / judged steps``, where judged steps are the finite steps with at least one full window and
  the non-finite ones (OLMo-core's cumulative score divides by every step, the first 128 included; dividing by the
  judged steps keeps short runs comparable with long ones; a run whose only judged step so far was a NaN scores 1);
- a window whose spread is at most ``1e-12`` of its mean magnitude (a constant series) judges nothing, as in
  OLMo-core (there a fixed ``1e-10``): a constant loss then a change is a level shift, not a spike of a distribution.

Running sums (of offsets from the window's mean, so large values with a small spread do not cancel) make an update
O(1); they are recomputed exactly each time the window has turned over once, so rounding never accumulates.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class _Window:
    """The last ``size`` finite values of one series, with running sums of their offsets from ``shift`` (the mean at
    the last exact recomputation: sums of squares of raw values of 1e6 +- 1e-3 would cancel to noise)."""

    __slots__ = ("count", "shift", "sum", "sumsq", "values")

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.shift = 0.0
        self.sum = 0.0
        self.sumsq = 0.0
        self.count = 0  # values added since the sums were last recomputed exactly

    def spikes(self, value: float, sigmas: float) -> bool | None:
        """Whether ``value`` exceeds mean + ``sigmas`` standard deviations (None: the window judges nothing)."""
        vals = self.values
        n = len(vals)
        if n < (vals.maxlen or 0):
            return None
        offset = self.sum / n
        mean = self.shift + offset
        std = math.sqrt(max(self.sumsq / n - offset * offset, 0.0))
        if not math.isfinite(std) or std <= 1e-12 * abs(mean):
            return None
        return value > mean + sigmas * std

    def add(self, value: float) -> None:
        vals = self.values
        if len(vals) == vals.maxlen:
            old = vals[0] - self.shift
            self.sum -= old
            self.sumsq -= old * old
        vals.append(value)
        d = value - self.shift
        self.sum += d
        self.sumsq += d * d
        self.count += 1
        if self.count >= (vals.maxlen or 1) or not math.isfinite(self.sumsq):
            self.recompute()

    def recompute(self) -> None:
        vals = self.values
        shift = _sum(vals) / len(vals) if vals else 0.0
        self.shift = shift if math.isfinite(shift) else 0.0
        offsets = [v - self.shift for v in vals]
        self.sum = _sum(offsets)
        self.sumsq = _sum([d * d for d in offsets])  # d * d: inf past 1e154, where ** would raise
        self.count = 0


def _sum(values: Any) -> float:
    """An exact sum where it exists; values near the float limit (whose exact sum overflows or meets inf - inf, where
    ``math.fsum`` raises) get the plain sum, inf or NaN: a window with no finite spread judges nothing."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        return float(sum(values))


class SpikeScore:
    """The share of judged steps whose loss or gradient norm spiked (see the module docstring).

    Args:
        window: previous values each new value is compared with (OLMo-core: 128).
        sigmas: how many standard deviations above the mean is a spike (OLMo-core: 6).

    Example:
        >>> s = SpikeScore(window=4)
        >>> for loss in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0]:
        ...     _ = s.update(loss, 1.0 + loss / 100)
        >>> s.spikes, s.judged, s.score
        (1, 2, 0.5)
    """

    def __init__(self, window: int = 128, sigmas: float = 6.0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"SpikeScore: window must be an int >= 2, got {window!r}")
        if isinstance(sigmas, bool) or not isinstance(sigmas, (int, float)) or not sigmas > 0:
            raise ValueError(f"SpikeScore: sigmas must be a number > 0, got {sigmas!r}")
        self.window = window
        self.sigmas = float(sigmas)
        self._loss = _Window(window)
        self._norm = _Window(window)
        self.spikes = 0
        self.judged = 0

    @property
    def score(self) -> float | None:
        """``spikes / judged`` (None before any step was judged)."""
        return self.spikes / self.judged if self.judged else None

    def update(self, loss: float | None, norm: float | None) -> bool:
        """Judge one step's ``loss`` and gradient ``norm`` (either None: not measured) and learn them; returns
        whether the step spiked."""
        verdicts: list[bool | None] = []
        for value, win in ((loss, self._loss), (norm, self._norm)):
            if value is None:
                continue
            value = float(value)
            if not math.isfinite(value):
                verdicts.append(True)  # a non-finite value is the worst spike; it enters no window
                continue
            verdicts.append(win.spikes(value, self.sigmas))
            win.add(value)
        judged = [v for v in verdicts if v is not None]
        if not judged:
            return False
        spiked = any(judged)
        self.judged += 1
        self.spikes += int(spiked)
        return spiked

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "sigmas": self.sigmas,
            "loss": list(self._loss.values),
            "norm": list(self._norm.values),
            "spikes": self.spikes,
            "judged": self.judged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, win in (("loss", self._loss), ("norm", self._norm)):
            win.values.clear()
            win.values.extend(float(v) for v in (state.get(key) or [])[-self.window :])
            win.recompute()
        self.spikes = int(state.get("spikes", 0))
        self.judged = int(state.get("judged", 0))
