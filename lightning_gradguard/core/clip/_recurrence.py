"""Far outliers that recur: a component of the gradient-norm stream, not a fault.

The z-score clipper treats a norm far above its threshold as an outlier: it is clipped and enters the statistics as the
threshold, so one spike cannot capture them (ZClip, Kumar et al. 2025). That premise is that such norms are rare. In an
imbalanced classifier they are not: once the model predicts the majority class, the majority batches' gradients shrink,
and the batches that hold a rare positive (a few % of them) carry gradients 100-10,000x larger, again and again. Each
was cut to the threshold and learned as the threshold, so the statistics followed only the shrinking majority and the
cut grew with it (a binary classifier with 0.2 % positives, batch 32, Adam: validation AUC 0.50-0.69 under
``default_callbacks()``, 0.97-0.99 without callbacks). The clipper was removing the signal the run learns from.

:class:`RecurringOutliers` tells the two apart by recurrence at the statistics' own time scale: a far exceeder is part
of the stream when it is the third or later of a chain of far exceeders in which each came within ``horizon`` steps
(the statistics' horizon, ``1 / (1 - ema_decay)``) of the previous one, with at least one step at or below the
threshold in between. Isolated faults (a corrupt batch, a loss spike) are further apart than the horizon; a blow-up
is consecutive (its steps never come back below the threshold), so neither builds a chain. Such a recurring exceeder is
still clipped at its own step, but learned as measured, so the statistics come to describe the component and later
members of it are cut less. Works on Python floats or on scalar tensors (no host synchronisation). No input makes it
raise.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from lightning_gradguard.core.clip._base import Number

#: a far exceeder is learned as measured from this member of a chain on (the first ones are outliers until repeated)
CHAIN = 3


class RecurringOutliers:
    """The chain of far exceeders of one clipper's norm stream.

    Args:
        horizon: the longest gap (in committed steps) between two members of a chain.

    Example:
        >>> r = RecurringOutliers(horizon=30.0)
        >>> out = []
        >>> for step in range(60):
        ...     member = r.member(over=step % 10 == 0, far=step % 10 == 0)  # far every 10th step, calm between
        ...     out.append(bool(r.recurring(member)))
        ...     r.update(member, calm=not member)
        >>> [s for s, v in enumerate(out) if v]
        [20, 30, 40, 50]
    """

    def __init__(self, horizon: float) -> None:
        self.horizon = float(horizon)
        self.gap: Number = math.inf  # committed steps since the last far exceeder
        self.chain: Number = 0  # members of the current chain
        self.calm: Number = False  # a step at or below the threshold came since the last far exceeder

    def member(self, over: Any, far: Any) -> Any:
        """Whether a step above the threshold (``over``), far above it (``far``), would join the chain: a far
        exceeder always; once the chain is established (:data:`CHAIN` members), any exceeder (the statistics have
        come to describe the component, so its members are no longer far). Bools, or bool tensors."""
        if isinstance(self.chain, Tensor):
            dev = self.chain.device
            return torch.as_tensor(far, device=dev) | (torch.as_tensor(over, device=dev) & (self.chain >= CHAIN))
        return bool(far) or (bool(over) and self.chain >= CHAIN)

    def recurring(self, member: Any) -> Any:
        """Whether a ``member`` (:meth:`member`) now is a recurring one: the third or later of the chain, within
        ``horizon`` steps of the previous, with a calm step between."""
        if isinstance(self.gap, Tensor):
            member = torch.as_tensor(member, device=self.gap.device)
            return member & self.calm & (self.gap <= self.horizon) & (self.chain >= CHAIN - 1)
        return bool(member) and bool(self.calm) and self.gap <= self.horizon and self.chain >= CHAIN - 1

    def update(self, far: Any, calm: Any) -> None:
        """After a committed step: ``far`` whether it was a member (:meth:`member`), ``calm`` whether its norm was at
        or below the threshold (a NaN/inf step is neither)."""
        if isinstance(self.gap, Tensor):
            old_chain, old_calm = cast(Tensor, self.chain), cast(Tensor, self.calm)
            far_t = torch.as_tensor(far, device=self.gap.device)
            calm_t = torch.as_tensor(calm, device=self.gap.device)
            linked = torch.where(old_calm, old_chain + 1, old_chain)
            chain = torch.where(self.gap <= self.horizon, linked, torch.ones_like(old_chain))
            gap = self.gap + 1
            self.chain = torch.where(far_t, chain, torch.where(gap > self.horizon, torch.zeros_like(chain), old_chain))
            self.calm = torch.where(far_t, torch.zeros_like(old_calm), old_calm | calm_t)
            self.gap = torch.where(far_t, torch.zeros_like(gap), gap)
            return
        if far:
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
