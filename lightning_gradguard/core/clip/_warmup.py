"""The warm-up of the adaptive clippers: a robust reference norm and the fallback threshold while statistics fill.

:class:`WarmupReference` keeps the last ``size`` informative committed norms of a run (a sliding window; a norm above
``factor`` x the median so far enters as that median, so a blow-up moves nothing; the fixed ``cap`` clips the step
but never what is learned: a model whose healthy norms are 50 is capped for the warm-up only, and its statistics
start at 50; zero norms, of masked or empty batches, take no slot: the reference waits for real ones, so it is never
0) and gives

- the fallback threshold ``min(factor * median, cap)``, ``cap`` (inf by default) before any finite norm: a median,
  not a mean, so one spike among them moves nothing (with two values the lower one counts);
- :meth:`~WarmupReference.settled`: whether the window is a reference at all. A network whose initialisation
  explodes (a deep plain net with init gain > 1) starts with norms of 100s that fall by orders of magnitude within a
  few dozen steps as the clipped updates tame it: a window of those steps is a transient, not the run's scale, and
  statistics started from it would never clip the run's later, real norms. The window is settled when the medians
  of its older and newer halves agree within :data:`SETTLED_HALF_RATIO` (a factor sqrt(10): the halves' centres are
  half a window apart, so the norm's level moves by less than an order of magnitude across the window). A steady
  stream is settled as soon as the window is full, so its warm-up ends after exactly ``size`` steps, as before;
- :meth:`~WarmupReference.fell`: whether the window's newer half is an order of magnitude below its older half,
  the sign that a reference already started from was a transient (a plateau of exploding norms that then ends);
- :meth:`~WarmupReference.robust_start`: median and a MAD-based variance of the window to start the z-score
  statistics from, so a spike in it never enters them as itself.

It works on Python floats (the CPU fast path) or on a tensor ring buffer on the norms' device (no host
synchronisation, except :meth:`~WarmupReference.progress`, one read per step while the clipper waits for the window
to settle); both give the same numbers. NaN, inf and zero never enter (a NaN/inf step still takes a slot of the
window, left empty).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from lightning_gradguard.core.clip._thresholds import TINY_NORM, fallback_threshold

#: Scales a median absolute deviation to the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826
#: The window is settled when the medians of its older and newer halves are within this factor of each other: their
#: centres are half a window apart, so the level moves by less than an order of magnitude (10 = this squared) across
#: the window. Noise does not come near it (a norm with 50 % log-normal noise moves its half-medians by ~1.3x).
SETTLED_HALF_RATIO = math.sqrt(10.0)
#: A started reference is discarded when its window's newer half falls below its older half by more than this factor
#: (about 100x across the window): stronger evidence than the start needs, because undoing a start costs more (the
#: statistics restart and the fallback cap is back). Noise alone does not reach it (a norm with 70 % log-normal
#: noise, batch to batch, ~1 % of runs over the whole probation), a plateau of exploding norms that ends does.
FELL_HALF_RATIO = 10.0
#: The halves are compared only when each holds at least this many slots (a window of 6 or more): the median of one or
#: two norms is a single batch's, and batch-to-batch noise alone moves it by more than the settled test allows.
MIN_HALF = 3
#: The warm-up ends after at most this many times ``warmup_steps`` steps, settled or not (a run whose norm keeps
#: trending is then compared with its own recent window).
MAX_WARMUP_FACTOR = 10


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


class WarmupReference:
    """The warm-up window and fallback threshold of one optimizer's adaptive clipper.

    The window has ``size`` slots and slides: each warm-up step takes the next slot (the oldest one once all are
    taken): a finite norm fills it, a NaN/inf step leaves it empty, and a step whose norm is at or below
    :data:`~lightning_gradguard.core.clip._thresholds.TINY_NORM` (zero gradients of a masked or empty batch,
    subnormals) takes none: it says nothing about the run's scale, so a run whose first batches are masked still
    fills its reference with real norms, and the median is never 0. :meth:`filled` says how many slots are taken,
    :meth:`settled` whether the window's level is steady (the clipper's warm-up ends once both hold, or after
    :data:`MAX_WARMUP_FACTOR` x ``size`` steps).

    Args:
        size: how many warm-up steps the window covers (>= 1).
        factor: the fallback threshold is this multiple of the median (>= 1).
        cap: fixed ceiling on the fallback threshold (inf for none); the only bound before the first finite norm.

    Example:
        >>> w = WarmupReference(size=4, factor=10.0)
        >>> for v in (1e6, 0.0, 1.0, 3.0):  # a spike first, then a masked batch
        ...     w.add(v)
        >>> w.threshold(), w.filled()  # 10 x the median of (1e6, 1, 3); the zero took no slot
        (30.0, 3)
        >>> t = WarmupReference(size=6, factor=10.0)
        >>> verdicts = []
        >>> for v in (300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 1.2, 0.9, 1.1):  # a transient falling by 300x, then steady
        ...     t.add(v)
        ...     verdicts.append(int(t.settled()))
        >>> verdicts  # full from the 6th value on; settled once its halves are within sqrt(10) of each other
        [0, 0, 0, 0, 0, 0, 0, 0, 1]
    """

    def __init__(self, size: int, factor: float, cap: float = math.inf) -> None:
        self.size = size
        self.factor = factor
        self.cap = cap
        self.reset()

    def reset(self) -> None:
        self._host: list[float] = []  # host mode: the window's last <= size entries, oldest first, NaN where empty
        self._pos: int | Tensor = 0  # slots taken since the start (a long scalar on the device in tensor mode)
        self._buffer: Tensor | None = None  # tensor mode: a ring of size slots (step k's: k % size), NaN where empty

    @property
    def on_host(self) -> bool:
        return self._buffer is None

    def to_tensor(self, device: torch.device) -> None:
        """Switch to tensor mode on ``device`` (keeping what was collected)."""
        if self._buffer is None:
            pos = int(self._pos)
            self._buffer = torch.full((self.size,), math.nan, dtype=torch.float64, device=device)
            if self._host:
                n = len(self._host)
                slots = torch.tensor([(pos - n + k) % self.size for k in range(n)], device=device)
                self._buffer[slots] = torch.tensor(self._host, dtype=torch.float64, device=device)
            self._pos = torch.tensor(pos, dtype=torch.long, device=device)
            self._host = []
        elif self._buffer.device != device:
            self._buffer = self._buffer.to(device)
            self._pos = cast(Tensor, self._pos).to(device)

    def add(self, x: float | Tensor) -> None:
        """Add one committed (already capped) norm: a finite one above ``TINY_NORM`` enters, NaN/inf take a slot
        without entering, a smaller one is ignored; once the ``size`` slots are taken the oldest one makes room."""
        if isinstance(x, Tensor):
            if self._buffer is None:
                self.to_tensor(x.device)
            buffer, pos = cast(Tensor, self._buffer), cast(Tensor, self._pos)  # set just above
            x64 = x.detach().to(torch.float64).reshape(1)
            finite = torch.isfinite(x64)
            takes = ~finite | (x64 > TINY_NORM)
            slot = (pos % self.size).reshape(1)
            entry = torch.where(finite, x64, math.nan)
            buffer.scatter_(0, slot, torch.where(takes, entry, buffer.gather(0, slot)))
            self._pos = pos + takes.reshape(()).long()
            return
        if math.isfinite(x) and not x > TINY_NORM:
            return
        self._host.append(float(x) if math.isfinite(x) else math.nan)
        if len(self._host) > self.size:
            del self._host[0]
        self._pos = int(self._pos) + 1

    def _finite_host(self) -> list[float]:
        return [v for v in self._host if not math.isnan(v)]

    def median(self) -> float | Tensor:
        """The lower median of the finite values in the window (NaN when there is none)."""
        if self._buffer is not None:
            return torch.nanmedian(self._buffer)
        values = self._finite_host()
        return lower_median(values) if values else math.nan

    def count(self) -> int | Tensor:
        """How many finite values the window holds."""
        if self._buffer is not None:
            return (~torch.isnan(self._buffer)).sum()
        return len(self._finite_host())

    @property
    def tested(self) -> bool:
        """Whether the window is large enough for :meth:`settled` and :meth:`fell` to compare its halves (at least
        ``2 * MIN_HALF`` slots); a smaller one is settled once full and never falls."""
        return self.size >= 2 * MIN_HALF

    def filled(self) -> int:
        """How many of the ``size`` slots are taken, as a Python int (one host read in tensor mode)."""
        return min(int(self._pos), self.size)

    def _halves(self) -> tuple[Any, Any]:
        """The (lower) medians of the window's older and newer halves (``size // 2`` slots each, oldest first; NaN
        for a half without a finite value). Meaningful once the window is full."""
        half = self.size // 2
        if self._buffer is not None:
            pos = cast(Tensor, self._pos)
            order = (pos + torch.arange(self.size, device=pos.device)) % self.size  # oldest slot first, once full
            window = self._buffer.gather(0, order)
            return torch.nanmedian(window[:half]), torch.nanmedian(window[self.size - half :])
        older = [v for v in self._host[:half] if not math.isnan(v)]
        newer = [v for v in self._host[len(self._host) - half :] if not math.isnan(v)]
        return (lower_median(older) if older else math.nan), (lower_median(newer) if newer else math.nan)

    def _verdicts(self) -> tuple[Any, Any]:
        """``(settled, fell)`` without a host read (bool tensors in tensor mode): see :meth:`settled` and
        :meth:`fell`. A window of fewer than ``2 * MIN_HALF`` slots is not tested: settled once full, never fallen."""
        if not self.tested:
            full = self._pos >= self.size
            return full, torch.zeros_like(full) if isinstance(full, Tensor) else False
        older, newer = self._halves()
        r = SETTLED_HALF_RATIO
        if isinstance(older, Tensor):
            full = cast(Tensor, self._pos) >= self.size
            gap = torch.isnan(older) | torch.isnan(newer)
            settled = full & (gap | ((older <= r * newer) & (newer <= r * older)))
            return settled, full & ~gap & (FELL_HALF_RATIO * newer < older)
        if len(self._host) < self.size or math.isnan(older) or math.isnan(newer):
            return len(self._host) >= self.size, False
        return older <= r * newer and newer <= r * older, FELL_HALF_RATIO * newer < older

    def settled(self) -> bool:
        """Whether the window is full and its level steady: the (lower) medians of its older and newer halves within
        :data:`SETTLED_HALF_RATIO` of each other (a half without a finite norm compares with anything). A window of
        a transient (norms falling by orders of magnitude as an exploding initialisation is tamed) is not settled.
        One host read in tensor mode."""
        return bool(self._verdicts()[0])

    def fell(self) -> bool:
        """Whether the window is full and its newer half's median is more than :data:`FELL_HALF_RATIO` below its
        older half's: the level fell by about two orders of magnitude across the window. One host read in tensor
        mode."""
        return bool(self._verdicts()[1])

    def progress(self) -> tuple[int, bool, bool]:
        """``(slots taken since the start, settled, fell)``, with one host read in tensor mode."""
        settled, fell = self._verdicts()
        if self._buffer is None:
            return int(self._pos), bool(settled), bool(fell)
        pos = cast(Tensor, self._pos)
        taken, s, f = torch.stack([pos, torch.as_tensor(settled).long(), torch.as_tensor(fell).long()]).tolist()
        return int(taken), bool(s), bool(f)

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
        """``(median, variance, count)`` of the window to start running statistics from: variance =
        ``(MAD_TO_STD * MAD) ** 2``.

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
        values = self._finite_host()
        if not values:
            return 0.0, 0.0, 0
        center = lower_median(values)
        spread = lower_median([abs(v - center) for v in values])
        return center, (MAD_TO_STD * spread) ** 2, len(values)

    def _window(self) -> list[float]:
        """The window's entries, oldest first (NaN where empty)."""
        if self._buffer is None:
            return list(self._host)
        pos = int(self._pos)
        n = min(pos, self.size)
        ring = self._buffer.cpu().tolist()
        return [ring[(pos - n + k) % self.size] for k in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """``values``: the window's finite values, oldest first; ``pos``: slots taken since the start; ``empty``:
        the window positions of the slots left empty (NaN/inf steps)."""
        window = self._window()
        return {
            "values": [v for v in window if not math.isnan(v)],
            "pos": int(self._pos),
            "empty": [i for i, v in enumerate(window) if math.isnan(v)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load the window and the slots taken. Older states (no ``empty``: the first values of the run, at most
        ``size`` slots) load with their empty slots first; zeros that an older version kept are left out."""
        device = None if self._buffer is None else self._buffer.device
        self.reset()
        values = [float(v) for v in state.get("values", [])]
        pos = max(len(values), int(state.get("pos", len(values))))
        if "empty" in state:
            empty = {int(i) for i in state["empty"]}
            window: list[float] = []
            it = iter(values)
            for i in range(len(values) + len(empty)):
                window.append(math.nan if i in empty else next(it, math.nan))
        else:
            window = [math.nan] * max(0, min(pos, self.size) - len(values)) + values
        window = [v if math.isfinite(v) and v > TINY_NORM else math.nan for v in window][-self.size :]
        self._host = window
        self._pos = max(pos, len(window))
        if device is not None:
            self.to_tensor(device)
