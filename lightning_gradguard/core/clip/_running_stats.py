"""Running statistics of a scalar stream (the global gradient norm), sync-free and poison-proof.

Two small stateful quantile estimators (the statistics of AutoClip's percentile threshold), each with
``update(x)``, ``compute()``, ``reset()``, ``state_dict()`` and ``load_state_dict()``:

- :class:`WindowQuantile`: exact quantiles of the last ``window`` values, kept in a fixed-size ring buffer.
- :class:`DecayedHistogramQuantile`: approximate quantiles from an exponentially decayed histogram with
  logarithmic buckets (``bins_per_decade`` per factor of 10), the memory of ``window`` steps without storing them.

Both use O(1) memory and O(1) work per step with respect to the run length (``window`` and the bucket count are
fixed at construction), keep their state as tensors on the device of the first value they see, and never
synchronise with the host: a non-finite value is masked out with ``torch.where`` instead of being tested with ``if``.
So NaN and inf never enter the statistics, whatever the input sequence. Finite values are clamped to
``[-VALUE_LIMIT, VALUE_LIMIT]`` (``1e100``, far above any float32 number, so a float32 norm is never changed) so that
squares and differences of float64 state cannot overflow either.

The state dicts hold tensors (on the CPU) and Python numbers only, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core._arg_checks import check_int, check_positive, check_unit_interval

#: Finite inputs are clamped to [-VALUE_LIMIT, VALUE_LIMIT]; float32 values (max 3.4e38) are never affected.
VALUE_LIMIT = 1e100

_DTYPE = torch.float64
# Apple's MPS backend has no float64: statistics there are kept in float32 with a lower clamp (squares stay finite).
_MPS_LIMIT = 1e18


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else _DTYPE


def sanitize(x: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(value, finite)``: ``x`` as a float64 scalar tensor (0 where not finite, clamped to ``VALUE_LIMIT``) and a
    bool scalar tensor telling whether ``x`` was finite. Never synchronises."""
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(x, dtype=_DTYPE)
    if t.numel() != 1:
        raise ValueError(f"expected a scalar value, got a tensor of shape {tuple(t.shape)}")
    finite = torch.isfinite(t.reshape(()))
    t = t.reshape(()).to(_dtype_for(t.device))
    limit = _MPS_LIMIT if t.device.type == "mps" else VALUE_LIMIT
    value = torch.where(finite, t, 0.0).clamp(-limit, limit)
    return value, finite


def _move(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device=device, dtype=_dtype_for(device)) if t.is_floating_point() else t.to(device)


def _load_tensor(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor) or value.shape != like.shape:
        return like
    return value.detach().clone().to(device=like.device, dtype=like.dtype)


class WindowQuantile:
    """Exact quantiles of the last ``window`` finite values (a fixed-size ring buffer on the device).

    ``update`` writes one slot (a scatter at a device-side position that only advances for finite values), so a NaN
    never evicts a good value. ``compute`` is ``torch.nanquantile`` over the buffer with unused slots set to NaN:
    O(window log window), independent of the run length.

    Args:
        q: default quantile for :meth:`compute`, in [0, 1] (0.1 = the 10th percentile).
        window: how many recent finite values are kept (>= 1).

    Example:
        >>> wq = WindowQuantile(q=0.5, window=3)
        >>> for v in (10.0, 1.0, float("inf"), 2.0, 3.0):
        ...     wq.update(v)
        >>> float(wq.compute()), float(wq.compute(1.0)), int(wq.count)
        (2.0, 3.0, 3)
    """

    def __init__(self, q: float = 0.1, window: int = 1000) -> None:
        self.q = check_unit_interval("q", q, closed=True)
        self.window = check_int("window", window, 1)
        self.reset()

    def reset(self) -> None:
        self._values = torch.full((self.window,), math.nan, dtype=_DTYPE)
        self._pos = torch.zeros((), dtype=torch.long)
        self._count = torch.zeros((), dtype=torch.long)

    def _to(self, device: torch.device) -> None:
        if self._values.device != device:
            self._values, self._pos, self._count = (_move(t, device) for t in (self._values, self._pos, self._count))

    @property
    def count(self) -> Tensor:
        """How many finite values the window holds (a long scalar tensor, at most ``window``)."""
        return self._count

    def update(self, x: Tensor | float) -> None:
        """Add ``x`` (a scalar) to the window if it is finite, evicting the oldest value when the window is full."""
        value, finite = sanitize(x)
        self._to(value.device)
        pos = self._pos.reshape(1)
        old = self._values.gather(0, pos)
        self._values.scatter_(0, pos, torch.where(finite, value.reshape(1), old))
        step = finite.long()
        self._pos = (self._pos + step) % self.window
        self._count = (self._count + step).clamp_max(self.window)

    def compute(self, q: float | None = None) -> Tensor:
        """The ``q``-quantile (default ``self.q``) of the window, linear interpolation; 0 when the window is empty."""
        q = self.q if q is None else check_unit_interval("q", q, closed=True)
        result = torch.nanquantile(self._values, q)
        return torch.where(self._count > 0, result, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "q": self.q,
            "window": self.window,
            "values": self._values.detach().cpu().clone(),
            "pos": self._pos.detach().cpu().clone(),
            "count": self._count.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Load a saved window; returns False (and starts afresh) when it was saved with another window size or by
        the histogram estimator."""
        self.reset()
        if int(state.get("window", self.window)) != self.window or "values" not in state:
            return False  # a different window size: start afresh rather than mis-read the buffer
        self._values = _load_tensor(state, "values", self._values)
        self._pos = _load_tensor(state, "pos", self._pos) % self.window
        self._count = _load_tensor(state, "count", self._count).clamp(0, self.window)
        return True


class DecayedHistogramQuantile:
    """Approximate quantiles of a non-negative stream from an exponentially decayed log-bucket histogram.

    Buckets are spaced ``bins_per_decade`` per factor of 10 between ``min_value`` and ``max_value`` (plus one
    bucket for everything at or below ``min_value``, zero included, and one for everything above ``max_value``).
    Each update multiplies all counts by ``decay = 1 - 1 / window`` and adds 1 to the value's bucket, so a value
    ``window`` steps old weighs ``1/e``. :meth:`compute` finds the bucket where the cumulative weight crosses
    ``q`` and interpolates geometrically inside it: the relative error is below ``10 ** (1 / bins_per_decade) - 1``
    (15% at the default 16). Memory and time per step are O(number of buckets), whatever the run length.

    Args:
        q: default quantile for :meth:`compute`, in [0, 1].
        window: effective memory in steps (>= 2): ``decay = 1 - 1 / window``.
        min_value: lower edge of the log range (> 0).
        max_value: upper edge of the log range (> min_value).
        bins_per_decade: resolution (>= 1).

    Example:
        >>> h = DecayedHistogramQuantile(q=0.5, window=100)
        >>> for v in (1.0, 10.0, 100.0):
        ...     h.update(v)
        >>> 5.0 < float(h.compute()) < 15.0
        True
    """

    def __init__(
        self,
        q: float = 0.1,
        window: int = 1000,
        min_value: float = 1e-12,
        max_value: float = 1e12,
        bins_per_decade: int = 16,
    ) -> None:
        self.q = check_unit_interval("q", q, closed=True)
        self.window = check_int("window", window, 2)
        self.bins_per_decade = check_int("bins_per_decade", bins_per_decade, 1)
        min_value = check_positive("min_value", min_value)
        max_value = check_positive("max_value", max_value)
        if not min_value < max_value:
            raise ValueError(
                "min_value and max_value must satisfy 0 < min_value < max_value < inf, "
                f"got min_value={min_value!r}, max_value={max_value!r}"
            )
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.decay = 1.0 - 1.0 / self.window
        self._log_lo = math.log10(self.min_value)
        self._n_inner = max(1, math.ceil((math.log10(self.max_value) - self._log_lo) * self.bins_per_decade))
        self.reset()

    @property
    def num_buckets(self) -> int:
        return self._n_inner + 2

    def reset(self) -> None:
        self._counts = torch.zeros(self.num_buckets, dtype=_DTYPE)
        self._count = torch.zeros((), dtype=torch.long)

    def _to(self, device: torch.device) -> None:
        if self._counts.device != device:
            self._counts, self._count = _move(self._counts, device), self._count.to(device)

    @property
    def count(self) -> Tensor:
        """How many finite values were added (not decayed; a long scalar tensor)."""
        return self._count

    def _bucket(self, value: Tensor) -> Tensor:
        # bucket 0: value <= min_value; 1..n_inner: log-spaced; n_inner + 1: value > max_value
        logv = torch.log10(value.clamp_min(self.min_value))
        inner = torch.floor((logv - self._log_lo) * self.bins_per_decade).long() + 1
        inner = inner.clamp(1, self._n_inner + 1)
        return torch.where(value <= self.min_value, 0, inner)

    def update(self, x: Tensor | float) -> None:
        """Decay the histogram and add ``x`` (a scalar; negative values count as 0) if it is finite."""
        value, finite = sanitize(x)
        self._to(value.device)
        weight = finite.to(value.dtype)
        decay = torch.where(finite, self.decay, 1.0)
        self._counts = self._counts * decay
        self._counts = self._counts.index_add(0, self._bucket(value).reshape(1), weight.reshape(1))
        self._count = self._count + finite.long()

    def compute(self, q: float | None = None) -> Tensor:
        """The approximate ``q``-quantile (default ``self.q``); 0 when nothing was added."""
        q = self.q if q is None else check_unit_interval("q", q, closed=True)
        counts = self._counts
        total = counts.sum()
        cum = counts.cumsum(0)
        # the smallest bucket whose cumulative weight reaches q * total (q = 0: the first non-empty bucket)
        target = torch.maximum(q * total, total * 1e-12).reshape(1)
        idx = torch.searchsorted(cum, target).clamp(0, self.num_buckets - 1).reshape(())
        below = torch.where(idx > 0, cum.gather(0, (idx - 1).clamp_min(0).reshape(1)).reshape(()), 0.0)
        inside = counts.gather(0, idx.reshape(1)).reshape(())
        frac = ((target.reshape(()) - below) / inside.clamp_min(1e-300)).clamp(0.0, 1.0)
        # geometric interpolation inside an inner bucket [lo, lo * 10**(1/bpd)]
        log_left = self._log_lo + (idx.to(counts.dtype) - 1.0) / self.bins_per_decade
        inner_value = torch.pow(10.0, log_left + frac / self.bins_per_decade)
        value = torch.where(idx == 0, 0.0, torch.where(idx > self._n_inner, self.max_value, inner_value))
        return torch.where(total > 0, value, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "q": self.q,
            "window": self.window,
            "min_value": self.min_value,
            "max_value": self.max_value,
            "bins_per_decade": self.bins_per_decade,
            "counts": self._counts.detach().cpu().clone(),
            "count": self._count.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Load a saved histogram; returns False (and starts afresh) when its bucket layout differs or it was saved
        by the window estimator. A different ``window`` (decay) applies from now on to the loaded counts."""
        self.reset()
        layout = (state.get("min_value"), state.get("max_value"), state.get("bins_per_decade"))
        if layout != (self.min_value, self.max_value, self.bins_per_decade):
            return False  # a different bucket layout: start afresh
        self._counts = _load_tensor(state, "counts", self._counts).clamp_min(0.0)
        self._count = _load_tensor(state, "count", self._count)
        return True
