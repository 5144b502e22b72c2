"""Running aggregates of a per-step scalar between two log steps, kept on the device.

A callback that logs every n steps would otherwise show only the value at the logged step: a spike in between is
lost. :class:`IntervalAggregate` keeps the maximum, the sum and the count of the values seen since the last
:meth:`~IntervalAggregate.flush` as device tensors (no host synchronisation per update); ``flush`` reads them once and
starts a new interval.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["IntervalAggregate"]


class IntervalAggregate:
    """Maximum, mean, sum and count of a scalar stream since the last flush.

    Non-finite values are kept in the maximum (an inf or NaN step must show) but left out of the sum and mean,
    and counted in ``nonfinite``.

    Example:
        >>> agg = IntervalAggregate()
        >>> for v in (1.0, 5.0, 3.0):
        ...     agg.update(torch.tensor(v))
        >>> agg.flush()
        {'max': 5.0, 'mean': 3.0, 'sum': 9.0, 'count': 3, 'nonfinite': 0}
        >>> agg.flush() is None
        True
    """

    def __init__(self) -> None:
        self._max: Tensor | None = None
        self._sum: Tensor | None = None
        self._finite: Tensor | None = None
        self.count = 0

    def update(self, value: Tensor | float) -> None:
        """Add one value (a 0-d tensor stays on its device; nothing is read to the host)."""
        v = torch.as_tensor(value).detach().to(torch.float64).reshape(())
        ok = torch.isfinite(v)
        # NaN compares false with everything: make it the maximum explicitly so it cannot hide
        top = torch.where(torch.isnan(v), torch.full_like(v, math.inf), v)
        if self._max is None or self._sum is None or self._finite is None:
            self._max, self._sum, self._finite = top, torch.where(ok, v, 0.0), ok.to(torch.long)
        else:
            if self._max.device != v.device:
                self._max, self._sum, self._finite = (t.to(v.device) for t in (self._max, self._sum, self._finite))
            self._max = torch.maximum(self._max, top)
            self._sum = self._sum + torch.where(ok, v, 0.0)
            self._finite = self._finite + ok.to(torch.long)
        self.count += 1

    def flush(self) -> dict[str, float | int] | None:
        """The interval's ``max``, ``mean`` (of finite values), ``sum``, ``count`` and ``nonfinite``; None if empty.

        Reads the aggregates to the host (one transfer) and starts a new interval.
        """
        if self.count == 0 or self._max is None or self._sum is None or self._finite is None:
            return None
        top, total, finite = torch.stack([self._max, self._sum, self._finite.to(torch.float64)]).cpu().tolist()
        count, finite_count = self.count, int(finite)
        self.reset()
        return {
            "max": top,
            "mean": total / finite_count if finite_count else math.nan,
            "sum": total,
            "count": count,
            "nonfinite": count - finite_count,
        }

    def reset(self) -> None:
        self._max = self._sum = self._finite = None
        self.count = 0
