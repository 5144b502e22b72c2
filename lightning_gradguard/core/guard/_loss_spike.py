"""Loss-spike detection: a one-sided z-score of the loss against a bounded window of recent losses.

A loss is a *spike* when ``(loss - mean) / std > zscore`` over the last ``window`` steps, with the z-score rule of
``core/clip/_thresholds.py`` (the clipper's: std floored at 5 % of the mean, so a flat loss is not 0/0). Memory is
O(window): the recent values live in a fixed ring buffer. Non-finite losses never enter the window (they are the NaN
guard's other trigger) and neither do spikes, so one blow-up does not inflate the statistics that should flag the
next one. The state stays on the loss's device and :meth:`LossSpikeDetector.update` returns a bool tensor: no host
synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core._arg_checks import check_int, check_positive
from lightning_gradguard.core.clip._thresholds import zscore


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
        zscore = check_positive("zscore", zscore, owner="LossSpikeDetector")
        window = check_int("window", window, 2, owner="LossSpikeDetector")
        if min_samples is None:
            min_samples = min(window, 10)
        min_samples = check_int("min_samples", min_samples, 2, high=window, owner="LossSpikeDetector")
        self.zscore = float(zscore)
        self.window = window
        self.min_samples = min_samples
        self.reset()

    def reset(self) -> None:
        self._values: Tensor | None = None
        self._valid: Tensor | None = None
        self._pos = 0

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
        spike, commit = self.score(loss)
        commit()
        return spike

    def score(self, loss: Tensor | float) -> tuple[Tensor, Callable[[], None]]:
        """:meth:`update` in two halves: the spike flag of ``loss`` now, and a function that adds ``loss`` to the
        window (call it once, before any other update; not calling it leaves the detector as it was).

        Example:
            >>> det = LossSpikeDetector(zscore=4.0, window=8, min_samples=2)
            >>> spike, commit = det.score(torch.tensor(1.0))
            >>> int(det.compute()["count"]), bool(spike)
            (0, False)
            >>> commit(); int(det.compute()["count"])
            1
        """
        value = torch.as_tensor(loss).detach().reshape(()).to(torch.float64)
        values, valid = self._buffers(value.device)
        n = valid.sum()
        safe_n = n.clamp_min(1).to(torch.float64)
        mean = torch.where(valid, values, 0.0).sum() / safe_n
        var = torch.where(valid, (values - mean) ** 2, 0.0).sum() / (safe_n - 1).clamp_min(1)
        z = zscore(value, mean, var)  # the one z-score rule (std floored relative to the mean), as the clipper's
        finite = torch.isfinite(value)
        scored = finite & (n >= self.min_samples)
        spike = scored & (z > self.zscore)
        keep = finite & ~spike

        def commit() -> None:
            values[self._pos] = torch.where(keep, value, 0.0)
            valid[self._pos] = keep
            self._pos = (self._pos + 1) % self.window

        return spike, commit

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
