"""A per-step cache so that several callbacks share one gradient measurement."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from lightning_gradguard.core.measure._grad_stats import GradStats


class StepStatsCache:
    """Holds the :class:`GradStats` of the current step, one entry per optimizer.

    ``get(key, step, compute)`` returns the entry for ``(key, step)`` and calls ``compute`` only on a miss; ``key``
    names what is measured (e.g. ``(id(optimizer), norm_type)``). Entries of older steps are dropped as soon as a
    new step is seen, so the cache never grows.

    Attributes:
        computations: how many times ``compute`` ran (tests use it to prove one measurement per step).
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, GradStats] = {}  # all of step ``_step``
        self._step: Hashable = None
        self.computations = 0

    def peek(self, key: Hashable, step: Hashable) -> GradStats | None:
        """The entry for ``(key, step)``, or None."""
        if step != self._step:
            self._entries.clear()
            self._step = step
        return self._entries.get(key)

    def get(self, key: Hashable, step: Hashable, compute: Callable[[], GradStats]) -> GradStats:
        stats = self.peek(key, step)
        if stats is None:
            stats = compute()
            self.computations += 1
            self._entries[key] = stats
        return stats

    def invalidate(self) -> None:
        """Forget everything (e.g. after gradients were changed by hand)."""
        self._entries.clear()
        self._step = None
