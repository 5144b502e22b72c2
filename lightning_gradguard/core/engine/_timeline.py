"""The run's scalars kept in memory, bounded: what the overview figure draws and what is written again at an event.

Every ``gradguard/`` scalar a loop writes passes through its host (``log_scalars`` for the Trainer, ``LoopHost`` for
a plain loop), which folds it into a :class:`Timeline` with :meth:`Timeline.update`: a few appends per *logging*
step, nothing on the other steps. Memory stays bounded in week-long runs: once a series holds more than ``capacity``
points it is thinned to half as many, two neighbours merged into one by the tag's own rule (:func:`merge_rule`): the
larger for norms, losses and layer counts (a NaN/inf wins, so a spike or a non-finite value is never thinned away),
the sum for per-interval counts, the mean for per-interval means and shares, the later value for levels (the LR,
cumulative counters); later writes are then collected as many to a point, so the resolution stays even over the whole
run. The latest write of each tag is kept as it was (:meth:`Timeline.held`).

``_log10`` twins are not kept (they follow from their value). Pure Python: no torch, no lightning.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterator, Mapping

from lightning_gradguard.core.engine._scalars import INTERVAL_NAMES, split_tag

__all__ = ["Timeline", "merge_rule"]

#: tags whose merged value is the larger one (NaN/inf first): a spike must survive thinning
PEAK_NAMES = frozenset(
    {
        "grad_norm",
        "grad_norm_max",
        "grad_norm_clipped",
        "grad_norm_zscore",
        "loss_max",
        "vanishing_layers",
        "exploding_layers",
        "nonfinite_layers",
    }
)
#: per-interval counts: merged by their sum
SUM_NAMES = frozenset({"clipped_steps", "flagged_steps"})
#: per-interval means and shares: merged by their mean
MEAN_NAMES = frozenset({"grad_norm_mean", "clip_fraction"})


def _peak(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return a if a >= b else b


def _sum(a: float, b: float) -> float:
    return a + b


def _mean(a: float, b: float) -> float:
    return (a + b) / 2.0


def _later(a: float, b: float) -> float:
    return b


def merge_rule(tag: str) -> Callable[[float, float], float]:
    """How two neighbouring values of ``tag`` merge into one when a series is thinned (or written twice at a step).

    Example:
        >>> merge_rule("gradguard/grad_norm_max")(3.0, float("inf")), merge_rule("gradguard/clipped_steps_opt1")(2, 3)
        (inf, 5)
        >>> merge_rule("gradguard/lr")(0.1, 0.05), merge_rule("gradguard/clip_fraction")(0.5, 0.0)
        (0.05, 0.25)
    """
    parts = split_tag(tag)
    name = parts[0] if parts else tag
    if name in PEAK_NAMES:
        return _peak
    if name in SUM_NAMES:
        return _sum
    if name in MEAN_NAMES:
        return _mean
    return _later


class _Series:
    """One tag's points; each point merges ``stride`` consecutive writes (the newest point may hold fewer)."""

    __slots__ = ("fill", "last", "merge", "steps", "stride", "values")

    def __init__(self, tag: str) -> None:
        self.steps = array("q")
        self.values = array("d")
        self.merge = merge_rule(tag)
        self.stride = 1  # writes per point
        self.fill = 0  # writes in the newest point
        self.last: tuple[int, float] = (0, math.nan)  # the latest write itself (a point may hold a merged value)

    def add(self, step: int, value: float) -> None:
        self.last = (step, value)
        steps = self.steps
        if steps and steps[-1] == step:  # written twice at one step (its owner and a repeat, two intervals)
            self.values[-1] = self.merge(self.values[-1], value)
        elif steps and self.fill < self.stride:  # the newest point still collects writes: it moves to this step
            self.values[-1] = self.merge(self.values[-1], value)
            steps[-1] = step
            self.fill += 1
        else:
            steps.append(step)
            self.values.append(value)
            self.fill = 1

    def thin(self) -> None:
        """Merge neighbours pairwise (each pair at its later step): half the points, each covering twice the writes
        (the resolution stays the same over the whole run)."""
        steps, values, merge, n = self.steps, self.values, self.merge, len(self.steps)
        paired = n - n % 2
        new_steps = array("q", steps[1:paired:2])
        new_values = array("d", (merge(values[i], values[i + 1]) for i in range(0, paired, 2)))
        if paired < n:  # an odd point out: the newest, alone
            new_steps.append(steps[-1])
            new_values.append(values[-1])
        else:
            self.fill += self.stride  # the newest point took in its (full) neighbour
        self.steps, self.values = new_steps, new_values
        self.stride *= 2


class Timeline:
    """The scalars written so far, per tag, bounded (see the module docstring).

    Args:
        capacity: points per tag before the older half is thinned (>= 8).

    Example:
        >>> t = Timeline(capacity=8)
        >>> for step in range(20):
        ...     t.update({"gradguard/grad_norm": 1000.0 if step == 3 else 1.0, "gradguard/lr": 0.1}, step)
        >>> len(t.series("gradguard/grad_norm")) <= 8, max(v for _, v in t.series("gradguard/grad_norm"))
        (True, 1000.0)
        >>> t.series("gradguard/lr")[-1], t.last_step("gradguard/lr")
        ((19, 0.1), 19)
    """

    def __init__(self, capacity: int = 1024) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"Timeline: capacity must be an int, got {type(capacity).__name__}")
        if capacity < 8:
            raise ValueError(f"Timeline: capacity must be >= 8, got {capacity}")
        self.capacity = capacity
        self._series: dict[str, _Series] = {}

    def update(self, values: Mapping[str, float], step: int) -> None:
        """Fold one write (``tag -> value`` at ``step``) in; ``_log10`` twins are skipped."""
        for key, value in values.items():
            if "_log10" in key:
                continue
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(key)
            series.add(int(step), float(value))
            if len(series.steps) > self.capacity:
                series.thin()

    def tags(self) -> list[str]:
        """Every tag written so far, sorted."""
        return sorted(self._series)

    def __contains__(self, tag: object) -> bool:
        return tag in self._series

    def __iter__(self) -> Iterator[str]:
        return iter(self.tags())

    def series(self, tag: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of ``tag``, oldest first (empty when it was never written)."""
        s = self._series.get(tag)
        return [] if s is None else list(zip(s.steps, s.values))

    def last_step(self, tag: str) -> int | None:
        """The step of ``tag``'s latest write (None: never written)."""
        s = self._series.get(tag)
        return int(s.last[0]) if s is not None and len(s.steps) else None

    def held(self, before: int, fresh: Mapping[str, float] | None = None, at_event: bool = False) -> dict[str, float]:
        """The latest value of every level tag (not :data:`~lightning_gradguard.core.engine._scalars.INTERVAL_NAMES`)
        whose latest write is before step ``before``: what to write again at ``before`` so that no chart ends before
        the run did (an interval's value covers only its own steps, so it is never repeated). ``fresh``: values known
        at ``before`` (the LR now), taken instead of the held ones of the same tags; ``at_event``: ``before`` is an
        event's own step, and a fresh value goes in also where its tag was written at that very step with another
        value (the event changed it after the write: a rollback's LR cut on a logging step).

        Example:
            >>> t = Timeline()
            >>> t.update({"gradguard/lr": 0.1, "gradguard/grad_norm_max": 5.0, "gradguard/rollbacks": 0.0}, 0)
            >>> t.update({"gradguard/rollbacks": 1.0}, 7)
            >>> t.held(7, fresh={"gradguard/lr": 0.05, "gradguard/clip_threshold": 1.0})
            {'gradguard/lr': 0.05}
        """
        out: dict[str, float] = {}
        for key, s in self._series.items():
            parts = split_tag(key)
            if parts is not None and parts[0] in INTERVAL_NAMES:
                continue
            if len(s.steps) and s.last[0] < before:
                out[key] = float(fresh[key]) if fresh and key in fresh else s.last[1]
            elif (
                at_event
                and fresh
                and key in fresh
                and len(s.steps)
                and s.last[0] == before
                and float(fresh[key]) != s.last[1]
            ):
                # written at this very step before the event changed it (a rollback's LR cut on a logging step):
                # the value after the event goes in too, or the chart showed the cut one logging interval late
                out[key] = float(fresh[key])
        return out

    def clear(self) -> None:
        self._series.clear()

    def __len__(self) -> int:
        """Points kept, all tags together."""
        return sum(len(s.steps) for s in self._series.values())
