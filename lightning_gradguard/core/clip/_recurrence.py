"""Outliers that recur: a component of the gradient-norm stream, not a fault.

The z-score clipper treats a norm above its threshold as an outlier: it is clipped and enters the statistics as the
threshold, so one spike cannot capture them (ZClip, Kumar et al. 2025). That premise is that such norms are rare. In an
imbalanced classifier they are not: once the model predicts the majority class, the majority batches' gradients shrink,
and the batches that hold a rare positive (a few % of them) carry gradients 10-10,000x larger, again and again. Each
was cut to the threshold and learned as the threshold, so the statistics followed only the shrinking majority and the
cut grew with it (a binary classifier with 0.2 % positives, ``pos_weight=neg/pos``, batch 32, Adam: validation AUC
0.50-0.69 under ``default_callbacks()``, 0.97-0.99 without callbacks). The clipper was removing the signal the run
learns from.

:class:`RecurringOutliers` tells the two apart by recurrence at the statistics' own time scale: a step above the
threshold is part of the stream when it is the third or later of a chain of such steps in which each came within
``horizon`` steps (the statistics' horizon, ``1 / (1 - ema_decay)``) of the previous one, with at least one step at
or below the threshold in between. Isolated faults (a corrupt batch, a loss spike) are further apart than the horizon;
a blow-up is consecutive (its steps do not come back below the threshold), so neither builds a chain. Such a recurring
step is still clipped at its own step, but learned as measured (the clipper bounds it), so the statistics come to
describe the component and later members of it are cut less. Works on Python floats or on scalar tensors (no host
synchronisation). No input makes it raise.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from lightning_gradguard.core.clip._base import Number

#: a step above the threshold is learned as measured from this member of a chain on (the first ones are outliers
#: until repeated)
CHAIN = 3


class RecurringOutliers:
    """The chain of steps above the threshold in one clipper's norm stream.

    Args:
        horizon: the longest gap (in committed steps) between two members of a chain.

    Example:
        >>> r = RecurringOutliers(horizon=30.0)
        >>> out = []
        >>> for step in range(60):
        ...     over = step % 10 == 0  # above the threshold every 10th step, calm steps between
        ...     out.append(bool(r.recurring(over)))
        ...     r.update(over, calm=not over)
        >>> [s for s, v in enumerate(out) if v]
        [20, 30, 40, 50]
    """

    def __init__(self, horizon: float) -> None:
        self.horizon = float(horizon)
        self.gap: Number = math.inf  # committed steps since the last member
        self.chain: Number = 0  # members of the current chain
        self.calm: Number = False  # a step at or below the threshold came since the last member

    def recurring(self, over: Any) -> Any:
        """Whether a step above the threshold now (``over``: bool, or a bool tensor) is a recurring one: the third or
        later of the chain, within ``horizon`` steps of the previous member, with a calm step between."""
        if isinstance(self.gap, Tensor):
            over = torch.as_tensor(over, device=self.gap.device)
            return over & self.calm & (self.gap <= self.horizon) & (self.chain >= CHAIN - 1)
        return bool(over) and bool(self.calm) and self.gap <= self.horizon and self.chain >= CHAIN - 1

    def update(self, over: Any, calm: Any, present: Any = True) -> None:
        """After a committed step: ``over`` whether it was above the threshold, ``calm`` whether its norm was at or
        below it. A step that is not ``present`` (a NaN/inf or zero norm, which the statistics never learn) changes
        nothing: the chain is as if it never came."""
        if isinstance(self.gap, Tensor):
            old_gap, old_chain, old_calm = self.gap, cast(Tensor, self.chain), cast(Tensor, self.calm)
            dev = old_gap.device
            over_t, calm_t = torch.as_tensor(over, device=dev), torch.as_tensor(calm, device=dev)
            here = torch.as_tensor(present, device=dev)
            linked = torch.where(old_calm, old_chain + 1, old_chain)
            chain = torch.where(old_gap <= self.horizon, linked, torch.ones_like(old_chain))
            gap = old_gap + 1
            chain = torch.where(over_t, chain, torch.where(gap > self.horizon, torch.zeros_like(chain), old_chain))
            calm_new = torch.where(over_t, torch.zeros_like(old_calm), old_calm | calm_t)
            gap = torch.where(over_t, torch.zeros_like(gap), gap)
            self.gap = torch.where(here, gap, old_gap)
            self.chain = torch.where(here, chain, old_chain)
            self.calm = torch.where(here, calm_new, old_calm)
            return
        if not present:
            return
        if over:
            if self.gap <= self.horizon:
                if self.calm:
                    self.chain = int(self.chain) + 1
            else:
                self.chain = 1
            self.gap, self.calm = 0, False
            return
        self.gap = float(self.gap) + 1
        self.calm = bool(self.calm) or bool(calm)
        if self.gap > self.horizon:
            self.chain = 0

    def reset(self) -> None:
        """Forget the chain (the statistics restarted)."""
        if isinstance(self.gap, Tensor):
            self.gap = torch.full_like(self.gap, math.inf)
            self.chain = torch.zeros_like(cast(Tensor, self.chain))
            self.calm = torch.zeros_like(cast(Tensor, self.calm))
        else:
            self.gap, self.chain, self.calm = math.inf, 0, False

    def to_tensor(self, device: torch.device) -> None:
        def t(v: Number, dtype: torch.dtype = torch.float64) -> Tensor:
            return v.to(device) if isinstance(v, Tensor) else torch.tensor(v, dtype=dtype, device=device)

        self.gap, self.chain, self.calm = t(self.gap), t(self.chain), t(bool(self.calm), torch.bool)

    def to_host(self) -> None:
        self.gap, self.chain, self.calm = float(self.gap), int(self.chain), bool(self.calm)

    def state_dict(self) -> dict[str, Any]:
        return {"gap": float(self.gap), "chain": int(self.chain), "calm": bool(self.calm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        on_tensors = isinstance(self.gap, Tensor)
        device = self.gap.device if isinstance(self.gap, Tensor) else None
        gap = float(state.get("gap", math.inf))
        self.gap = gap if gap >= 0 else math.inf  # NaN or negative (garbage): no chain
        self.chain = max(0, int(state.get("chain", 0)))
        self.calm = bool(state.get("calm", False))
        if on_tensors and device is not None:
            self.to_tensor(device)
