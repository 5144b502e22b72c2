"""What every clipper is: the :class:`Clipper` interface and the :class:`ClipRecord` it returns for each step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_gradguard.core.clip._thresholds import zscore
from lightning_gradguard.core.measure._grad_stats import GradStats

Number = float | Tensor


@dataclass
class ClipRecord:
    """What a clipper did at one step. Values are tensors on the gradients' device (no sync), or Python numbers on
    the z-score CPU fast path; ``float()``/``bool()`` read either.

    Attributes:
        grad_norm: pre-clip global norm (``norm_type``), the float32 view the monitor logs (inf above float32's
            range; the decision itself uses the float64 norm, finite for every finite gradient).
        threshold: the global-norm threshold in force (zscore, percentile, norm), the per-parameter bound
            (per_parameter), the element bound (value); None for agc. ``inf`` means "no clipping".
        clipped: did the step clip anything.
        coefficient: the factor all gradients were multiplied by (global methods), per-parameter factors
            (per_parameter), None otherwise.
        warmup: whether the warm-up fallback was in force.
        step: the optimizer's own step counter (0-based), set by the caller.
        zscore: (property) z-score of ``grad_norm`` against the statistics before the step; zscore method only,
            NaN while warming up.
    """

    grad_norm: Number
    threshold: Number | None
    clipped: Tensor | bool
    coefficient: Number | None = None
    warmup: bool = False
    step: int = 0
    stat_mean: Number | None = None
    stat_var: Number | None = None

    @property
    def zscore(self) -> Number | None:
        if self.stat_mean is None or self.stat_var is None:
            return None
        if self.warmup:
            return math.nan
        if isinstance(self.stat_mean, Tensor):
            return zscore(torch.as_tensor(self.grad_norm).to(self.stat_mean.dtype), self.stat_mean, self.stat_var)
        return zscore(float(self.grad_norm), self.stat_mean, float(self.stat_var))


def false_tensor(device: torch.device) -> Tensor:
    """A bool scalar tensor False on ``device`` (nothing clipped)."""
    return torch.zeros((), dtype=torch.bool, device=device)


class Clipper:
    """Base of the clippers: stateless by default (nothing to commit, nothing to save)."""

    #: the method name (key in :data:`CLIPPERS`).
    method: ClassVar[str] = ""
    #: the callback options this method uses (besides ``norm_type``, which every method but agc uses).
    options: ClassVar[tuple[str, ...]] = ()
    #: the p of the norms this clipper needs from the shared measurement.
    norm_type: float = 2.0

    def clip_(self, stats: GradStats) -> ClipRecord:
        raise NotImplementedError

    def commit(self, dropped: bool = False) -> None:
        """Learn from the step last clipped (nothing for stateless methods)."""

    @property
    def in_probation(self) -> bool:
        """Whether learned statistics took over from the warm-up's cap only recently (False for fixed methods)."""
        return False

    def pin(self) -> bool:
        """Hold the threshold at the warm-up's capped fallback for the rest of the run (a guard restarting a network
        that died after the learned statistics released the cap); returns whether anything changed (False for a
        method with no learned threshold, or no cap to hold)."""
        return False

    def rebase(self, norms: Sequence[float]) -> bool:
        """Restart the learned statistics from ``norms``, the run's gradient norms at a new level (the guard's
        divergence detector found far norms that hold while the loss did not rise: a new task, new data); returns
        whether anything changed (False for a method with no learned threshold)."""
        return False

    def check_parameters(self, named_params: Sequence[tuple[str, Tensor]], owner: str | None = None) -> None:
        """Raise ``ValueError`` naming a parameter this method cannot clip (called at setup; ``owner``: the class
        the user called, named at the start of the message)."""

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Load what applies; returns a description of each part that could not be applied (for a warning)."""
        return []
