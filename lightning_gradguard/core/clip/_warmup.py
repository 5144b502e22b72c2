"""The warm-up of the adaptive clippers: a robust reference norm and the fallback threshold while statistics fill.

:class:`WarmupReference` keeps the first ``size`` informative committed norms of a run (a norm above ``factor`` x
the median so far enters as that median, so a blow-up moves nothing; the fixed ``cap`` clips the step but never what
is learned: a model whose healthy norms are 50 is capped for the warm-up only, and its statistics start at 50; zero
norms, of masked or empty batches, take no slot: the reference waits for real ones, so it is never 0) and gives

- the fallback threshold ``min(factor * median, cap)``, ``cap`` (inf by default) before any finite norm: a median,
  not a mean, so one spike among them moves nothing (with two values the lower one counts);
- :meth:`~WarmupReference.robust_start`: median and a MAD-based variance to start the z-score statistics from, so a
  spike at step 0 never enters them as itself.

It works on Python floats (the CPU fast path) or on a tensor buffer on the norms' device (no host synchronisation);
both give the same numbers. NaN, inf and zero never enter (a NaN/inf step still counts as a warm-up step).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from lightning_gradguard.core.clip._thresholds import TINY_NORM, fallback_threshold

#: Scales a median absolute deviation to the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


def _lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


class WarmupReference:
    """The warm-up buffer and fallback threshold of one optimizer's adaptive clipper.

    The buffer has ``size`` slots, one per warm-up step: a finite norm fills one, a NaN/inf step takes one and
    leaves it empty, and a step whose norm is at or below
    :data:`~lightning_gradguard.core.clip._thresholds.TINY_NORM` (zero gradients of a masked or empty batch,
    subnormals) takes none: it says nothing about the run's scale, so a run whose first batches are masked still
    fills its reference with real norms, and the median is never 0. :meth:`filled` says how many slots are taken (the
    clipper's warm-up ends once it is ``size``).

    Args:
        size: how many warm-up steps the reference covers (>= 1).
        factor: the fallback threshold is this multiple of the median (>= 1).
        cap: fixed ceiling on the fallback threshold (inf for none); the only bound before the first finite norm.

    Example:
        >>> w = WarmupReference(size=4, factor=10.0)
        >>> for v in (1e6, 0.0, 1.0, 3.0):  # a spike first, then a masked batch
        ...     w.add(v)
        >>> w.threshold(), w.filled()  # 10 x the median of (1e6, 1, 3); the zero took no slot
        (30.0, 3)
    """

    def __init__(self, size: int, factor: float, cap: float = math.inf) -> None:
        self.size = size
        self.factor = factor
        self.cap = cap
        self.reset()

    def reset(self) -> None:
        self._host: list[float] = []
        self._pos: int | Tensor = 0  # slots taken (a long scalar on the device in tensor mode)
        self._buffer: Tensor | None = None  # tensor mode: size slots, NaN where empty

    @property
    def on_host(self) -> bool:
        return self._buffer is None

    def to_tensor(self, device: torch.device) -> None:
        """Switch to tensor mode on ``device`` (keeping what was collected)."""
        if self._buffer is None:
            self._buffer = torch.full((self.size,), math.nan, dtype=torch.float64, device=device)
            if self._host:
                self._buffer[: len(self._host)] = torch.tensor(self._host, dtype=torch.float64, device=device)
            self._pos = torch.tensor(int(self._pos), dtype=torch.long, device=device)
            self._host = []
        elif self._buffer.device != device:
            self._buffer = self._buffer.to(device)
            self._pos = cast(Tensor, self._pos).to(device)

    def add(self, x: float | Tensor) -> None:
        """Add one committed (already capped) norm: a finite one above ``TINY_NORM`` enters, NaN/inf take a slot
        without entering, a smaller one is ignored; nothing once the ``size`` slots are taken."""
        if isinstance(x, Tensor):
            if self._buffer is None:
                self.to_tensor(x.device)
            buffer, pos = cast(Tensor, self._buffer), cast(Tensor, self._pos)  # set just above
            x64 = x.detach().to(torch.float64).reshape(1)
            finite = torch.isfinite(x64)
            takes = (~finite | (x64 > TINY_NORM)) & (pos < self.size)
            slot = pos.clamp_max(self.size - 1).reshape(1)
            entry = torch.where(finite, x64, math.nan)
            buffer.scatter_(0, slot, torch.where(takes, entry, buffer.gather(0, slot)))
            self._pos = pos + takes.reshape(()).long()
            return
        if self._pos >= self.size or (math.isfinite(x) and not x > TINY_NORM):
            return
        if math.isfinite(x):
            self._host.append(float(x))
        self._pos = int(self._pos) + 1

    def median(self) -> float | Tensor:
        """The lower median of the finite values kept (NaN when there is none)."""
        if self._buffer is not None:
            return torch.nanmedian(self._buffer)
        return _lower_median(self._host) if self._host else math.nan

    def count(self) -> int | Tensor:
        """How many finite values are kept."""
        if self._buffer is not None:
            return (~torch.isnan(self._buffer)).sum()
        return len(self._host)

    def filled(self) -> int:
        """How many of the ``size`` slots are taken, as a Python int (one host read in tensor mode)."""
        return int(self._pos)

    def threshold(self, capped: bool = True) -> float | Tensor:
        """``min(factor * median, cap)``, or ``cap`` while no finite value was seen; with ``capped=False``,
        ``factor * median`` (inf while no finite value was seen): the reference's own bound, which decides what the
        reference learns from whatever the cap clips."""
        cap = self.cap if capped else math.inf
        med = self.median()
        if isinstance(med, Tensor):
            return torch.where(torch.isnan(med), cap, fallback_threshold(med, self.factor, cap))
        return cap if math.isnan(med) else fallback_threshold(med, self.factor, cap)

    def robust_start(self) -> tuple[Any, Any, Any]:
        """``(median, variance, count)`` to start running statistics from: variance = ``(MAD_TO_STD * MAD) ** 2``.

        All 0 when no finite value was kept.
        """
        if self._buffer is not None:
            med = torch.nanmedian(self._buffer)
            mad = torch.nanmedian((self._buffer - med).abs())
            count = (~torch.isnan(self._buffer)).sum()
            ok = count > 0
            return (
                torch.where(ok, med, 0.0),
                torch.where(ok, (MAD_TO_STD * mad) ** 2, 0.0),
                count.to(torch.float64),
            )
        if not self._host:
            return 0.0, 0.0, 0
        center = _lower_median(self._host)
        spread = _lower_median([abs(v - center) for v in self._host])
        return center, (MAD_TO_STD * spread) ** 2, len(self._host)

    def state_dict(self) -> dict[str, Any]:
        values = self._host if self._buffer is None else [v for v in self._buffer.cpu().tolist() if not math.isnan(v)]
        return {"values": list(values), "pos": int(self._pos)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load the kept values and the slots taken (zeros that an older version kept are left out)."""
        device = None if self._buffer is None else self._buffer.device
        self.reset()
        values = (float(v) for v in state.get("values", []))
        self._host = [v for v in values if math.isfinite(v) and v > TINY_NORM][: self.size]
        self._pos = max(len(self._host), min(int(state.get("pos", len(self._host))), self.size))
        if device is not None:
            self.to_tensor(device)
