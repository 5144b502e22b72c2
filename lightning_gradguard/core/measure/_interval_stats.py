"""Running aggregates of a per-step scalar between two log steps, kept on the device.

A callback that logs every n steps would otherwise show only the value at the logged step: a spike in between is
lost. :class:`IntervalAggregate` keeps the maximum, the sum and the count of the values seen since the last
:meth:`~IntervalAggregate.flush` as device tensors (no host synchronisation per update); ``flush`` reads them once and
starts a new interval.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor


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

    #: fold CPU values in as Python floats (False: the tensor path accelerators use, for tests on the CPU)
    host_fast_path: ClassVar[bool] = True

    def __init__(self) -> None:
        # host floats while every value came from the CPU; device tensors once one came from an accelerator
        self._max: Tensor | float | None = None
        self._sum: Tensor | float = 0.0
        self._finite: Tensor | int = 0
        self.count = 0

    def update(self, value: Tensor | float) -> None:
        """Add one value. A tensor on an accelerator stays there (no host synchronisation); CPU tensors and Python
        numbers are folded in as Python floats, since reading a CPU tensor costs no synchronisation and a handful of
        scalar tensor operations would cost more than the step they describe."""
        on_host = self.host_fast_path and value.is_cpu if isinstance(value, Tensor) else True
        top = self._max
        if on_host and not isinstance(top, Tensor):  # then the sum and count are Python numbers too
            v = float(value)
            if math.isnan(v):
                v = math.inf  # NaN compares false with everything: it must not hide
            elif math.isfinite(v):
                self._sum += v
                self._finite += 1
            self._max = v if top is None or v > top else top
            self.count += 1
            return
        if not isinstance(value, Tensor):  # an interval that began on the tensor path continues there
            value = torch.tensor(float(value), dtype=torch.float64)
        dev = self._max.device if isinstance(self._max, Tensor) else value.device
        v_t = value.detach().to(device=dev, dtype=torch.float64).reshape(())
        ok_t = torch.isfinite(v_t)
        top_t = torch.where(torch.isnan(v_t), torch.full_like(v_t, math.inf), v_t)
        prev_max = (
            self._max
            if isinstance(self._max, Tensor)
            else torch.tensor(-math.inf if self._max is None else self._max, dtype=torch.float64, device=dev)
        )
        self._max = torch.maximum(prev_max.to(dev), top_t)
        self._sum = torch.as_tensor(self._sum, dtype=torch.float64, device=dev) + torch.where(ok_t, v_t, 0.0)
        self._finite = torch.as_tensor(self._finite, dtype=torch.long, device=dev) + ok_t.to(torch.long)
        self.count += 1

    def flush(self) -> dict[str, float | int] | None:
        """The interval's ``max``, ``mean`` (of finite values), ``sum``, ``count`` and ``nonfinite``; None if empty.

        Reads device aggregates to the host (one transfer) and starts a new interval.
        """
        if self.count == 0 or self._max is None:
            return None
        if isinstance(self._max, Tensor):
            parts = [self._max, torch.as_tensor(self._sum), torch.as_tensor(self._finite).to(torch.float64)]
            top, total, finite = torch.stack([p.to(self._max.device) for p in parts]).cpu().tolist()
        else:
            top, total, finite = float(self._max), float(self._sum), float(self._finite)
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
        self._max, self._sum, self._finite = None, 0.0, 0
        self.count = 0
