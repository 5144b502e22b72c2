"""Loss-spike detection: a one-sided z-score of the loss against a bounded window of recent losses.

A loss is a *spike* when ``(loss - mean) / std > zscore`` over the last ``window`` steps. Memory is O(window): the
recent values live in a fixed ring buffer. Non-finite losses never enter the window (they are the NaN guard's other
trigger) and neither do spikes, so one blow-up does not inflate the statistics that should flag the next one. The
state stays on the loss's device and :meth:`LossSpikeDetector.update` returns a bool tensor: no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["LossSpikeDetector", "spike_zscore"]


def spike_zscore(value: Tensor, mean: Tensor, std: Tensor, rel_floor: float = 1e-3, abs_floor: float = 1e-12) -> Tensor:
    """``(value - mean) / std`` with ``std`` floored at ``rel_floor * |mean| + abs_floor`` (a flat loss is not 0/0)."""
    floor = rel_floor * mean.abs() + abs_floor
    return (value - mean) / torch.maximum(std, floor)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LossSpikeDetector:
    """Flags a loss whose z-score against the recent window exceeds ``zscore``.

    Args:
        zscore: threshold on ``(loss - mean) / std`` (> 0). Only rises count (one-sided).
        window: how many recent steps the statistics cover (>= 2).
        min_samples: finite, non-spike values needed in the window before anything is flagged
            (default: ``min(window, 10)``).

    Raises:
        ValueError: for a non-positive ``zscore``, a ``window`` < 2 or ``min_samples`` outside [2, window].

    Example:
        >>> import torch
        >>> det = LossSpikeDetector(zscore=4.0, window=8, min_samples=4)
        >>> [bool(det.update(torch.tensor(v))) for v in (1.0, 1.1, 0.9, 1.0, 1.05, 9.0)]
        [False, False, False, False, False, True]
    """

    def __init__(self, zscore: float = 6.0, window: int = 100, min_samples: int | None = None) -> None:
        number = isinstance(zscore, (int, float)) and not isinstance(zscore, bool)
        if not number or not (zscore > 0 and math.isfinite(zscore)):
            raise ValueError(f"zscore must be a finite number > 0, got {zscore!r}")
        if not _is_int(window) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if min_samples is None:
            min_samples = min(window, 10)
        if not _is_int(min_samples) or not 2 <= min_samples <= window:
            raise ValueError(f"min_samples must be an int in [2, window={window}], got {min_samples!r}")
        self.zscore = float(zscore)
        self.window = window
        self.min_samples = min_samples
        self.reset()

    def reset(self) -> None:
        self._values: Tensor | None = None
        self._valid: Tensor | None = None
        self._pos = 0
        self.last_zscore: Tensor | None = None

    def _buffers(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._values is None or self._valid is None:
            self._values = torch.zeros(self.window, dtype=torch.float64, device=device)
            self._valid = torch.zeros(self.window, dtype=torch.bool, device=device)
        elif self._values.device != device:
            self._values = self._values.to(device)
            self._valid = self._valid.to(device)
        return self._values, self._valid

    def update(self, loss: Tensor | float) -> Tensor:
        """Score ``loss`` against the window, then add it to the window if it is finite and not a spike.

        Returns:
            A bool scalar tensor: is ``loss`` a spike. Non-finite losses return False (they are not scored).
        """
        value = torch.as_tensor(loss).detach().reshape(()).to(torch.float64)
        values, valid = self._buffers(value.device)
        n = valid.sum()
        safe_n = n.clamp_min(1).to(torch.float64)
        mean = torch.where(valid, values, 0.0).sum() / safe_n
        var = torch.where(valid, (values - mean) ** 2, 0.0).sum() / (safe_n - 1).clamp_min(1)
        z = spike_zscore(value, mean, var.sqrt())
        finite = torch.isfinite(value)
        scored = finite & (n >= self.min_samples)
        spike = scored & (z > self.zscore)
        self.last_zscore = torch.where(scored, z, torch.nan)
        keep = finite & ~spike
        values[self._pos] = torch.where(keep, value, 0.0)
        valid[self._pos] = keep
        self._pos = (self._pos + 1) % self.window
        return spike

    def compute(self) -> dict[str, Tensor]:
        """Mean, standard deviation (unbiased) and count of the values in the window."""
        zero = torch.zeros((), dtype=torch.float64)
        if self._values is None or self._valid is None:
            return {"mean": zero, "std": zero, "count": zero.long()}
        vals = self._values[self._valid]
        return {
            "mean": vals.mean() if vals.numel() else zero,
            "std": vals.std() if vals.numel() > 1 else zero,
            "count": self._valid.sum(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "zscore": self.zscore,
            "window": self.window,
            "min_samples": self.min_samples,
            "values": None if self._values is None else self._values.detach().cpu().clone(),
            "valid": None if self._valid is None else self._valid.detach().cpu().clone(),
            "pos": self._pos,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values, valid = state.get("values"), state.get("valid")
        if values is None or valid is None or int(state.get("window", self.window)) != self.window:
            self.reset()
            return
        self._values = values.detach().clone().to(torch.float64)
        self._valid = valid.detach().clone().to(torch.bool)
        self._pos = int(state.get("pos", 0)) % self.window
