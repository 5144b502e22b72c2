"""The plain-loop guard's clippers: one per optimizer, each with its counters, measured once per step.

Also the interval aggregate of the judged gradient norm (``grad_norm_max``/``grad_norm_mean`` between two logging
steps, so a spike between them is not lost) and the clip scalars of a logging step, written with the same rules as
the Lightning callbacks (``core/engine/_scalars.py``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core.clip import Clipper, ClipRecord, PerParameterClipper, make_clipper
from lightning_gradguard.core.engine._scalars import clip_scalars, tag
from lightning_gradguard.core.measure import GradStats, compute_grad_stats


class _Slot:
    """One optimizer's clipper and counters."""

    def __init__(self, clipper: Clipper | None) -> None:
        self.clipper = clipper
        self.steps = 0
        # counts of clipped steps: device tensors once a clipper answers with one (read only when reported)
        self.clipped_total: Any = 0
        self.clipped_since_log: Any = 0
        self.steps_since_log = 0
        self.record: ClipRecord | None = None
        self.params_key: tuple[tuple[int, int], ...] = ()
        self.params: list[Tensor] = []
        self.names: list[str] = []
        self.pending = False  # the clipper holds statistics of a step whose verdict is not in yet
        self.stats: GradStats | None = None


class ClipSlots:
    """The clippers of a loop's optimizers (``clipping``: a method name with ``options``, a clipper to copy, or
    None), their measurement and their scalars."""

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        names: dict[int, str],
        clipping: str | Clipper | None,
        options: dict[str, Any],
        owner: str,
    ) -> None:
        self.optimizers = optimizers
        self._names = names
        self.slots = [self._new_slot(clipping, options, owner) for _ in optimizers]
        self.last: dict[int, ClipRecord] = {}
        self.last_dropped = False  # the step the clippers last clipped was dropped: they must not learn from it
        self._norm_max = -math.inf
        self._norm_sum = 0.0
        self._norm_count = 0
        for opt, slot in zip(optimizers, self.slots):  # e.g. complex parameters under clipping="value"
            if slot.clipper is not None:
                named = [(names.get(id(p), "?"), p) for g in opt.param_groups for p in g["params"]]
                slot.clipper.check_parameters(named, owner=owner)

    @staticmethod
    def _new_slot(clipping: str | Clipper | None, options: dict[str, Any], owner: str) -> _Slot:
        if clipping is None:
            return _Slot(None)
        if isinstance(clipping, Clipper):
            return _Slot(copy.deepcopy(clipping))
        return _Slot(make_clipper(clipping, owner=owner, **options))

    def measure_and_clip(self) -> list[GradStats]:
        """Every optimizer's statistics (pre-clip), then each clipped (committing the previous step first)."""
        stats = [self._measure(i, opt) for i, opt in enumerate(self.optimizers)]
        for i, s in enumerate(stats):
            self._clip(i, s)
        return stats

    def _measure(self, idx: int, opt: torch.optim.Optimizer) -> GradStats:
        slot = self.slots[idx]
        key = tuple((id(g["params"]), len(g["params"])) for g in opt.param_groups)
        if slot.params_key != key:  # built once; again only when the param groups change
            slot.params = [p for g in opt.param_groups for p in g["params"]]
            slot.names = [self._names.get(id(p), f"opt{idx}.param_{j}") for j, p in enumerate(slot.params)]
            slot.params_key = key
        clipper = slot.clipper
        return compute_grad_stats(slot.params, slot.names, clipper.norm_type if clipper is not None else 2.0)

    def _clip(self, idx: int, stats: GradStats) -> None:
        slot = self.slots[idx]
        slot.stats = stats
        if not stats.grads or slot.clipper is None:
            return
        if slot.pending:
            slot.clipper.commit(dropped=self.last_dropped)
        record = slot.clipper.clip_(stats)
        record.step = slot.steps
        slot.record = self.last[idx] = record
        slot.pending = True
        slot.steps += 1
        slot.steps_since_log += 1
        slot.clipped_total = slot.clipped_total + record.clipped  # no host read: a tensor stays on its device
        slot.clipped_since_log = slot.clipped_since_log + record.clipped

    def clip_flags(self) -> list[Any]:
        return [s.record.clipped for s in self.slots if s.record is not None]

    def commit(self) -> None:
        """Let every clipper learn from its pending step (before saving its state)."""
        for slot in self.slots:
            if slot.pending and slot.clipper is not None:
                slot.clipper.commit(dropped=self.last_dropped)
                slot.pending = False

    def observe(self, norm: float) -> None:
        """One step's (rank-agreed) pre-clip norm, already on the host."""
        self._norm_max = max(self._norm_max, norm) if not math.isnan(norm) else math.inf
        if math.isfinite(norm):
            self._norm_sum += norm
            self._norm_count += 1

    def scalars(self, final: bool = False) -> dict[str, float]:
        """The interval's clip and norm scalars (a new interval starts)."""
        values: dict[str, float] = {}
        for idx, slot in enumerate(self.slots):
            stats, record = slot.stats, slot.record
            if stats is not None and stats.grads and not final:
                values[tag("grad_norm", idx)] = float(stats.total_norm)
                if record is not None:
                    per_param = isinstance(slot.clipper, PerParameterClipper)
                    values.update(clip_scalars(idx, stats, record, per_parameter=per_param))
            if slot.steps_since_log:
                values[tag("clip_fraction", idx)] = float(slot.clipped_since_log) / slot.steps_since_log
                values[tag("clipped_steps", idx)] = float(slot.clipped_since_log)
            slot.clipped_since_log = slot.steps_since_log = 0
            values[tag("lr", idx)] = float(self.optimizers[idx].param_groups[0]["lr"])
        if self._norm_count or self._norm_max > -math.inf:
            values[tag("grad_norm_max")] = self._norm_max
            values[tag("grad_norm_mean")] = self._norm_sum / self._norm_count if self._norm_count else math.nan
        self._norm_max, self._norm_sum, self._norm_count = -math.inf, 0.0, 0
        return values

    def state_dict(self) -> list[dict[str, Any]]:
        self.commit()
        return [
            {
                "steps": s.steps,
                "clipped_total": int(s.clipped_total),
                "clipper": s.clipper.state_dict() if s.clipper is not None else {},
            }
            for s in self.slots
        ]

    def snapshot_state(self) -> list[dict[str, Any] | None]:
        """A copy of each clipper's learned statistics, for a rollback snapshot (:meth:`restore_snapshot_state`);
        the counters of clipped steps are not part of it."""
        self.commit()  # the guard snapshots after its verdict on the step: the step is learned (or not) now
        return [copy.deepcopy(s.clipper.state_dict()) if s.clipper is not None else None for s in self.slots]

    def in_probation(self) -> bool:
        """Whether any clipper's learned statistics took over from the warm-up cap only recently."""
        return any(s.clipper.in_probation for s in self.slots if s.clipper is not None)

    def pin(self) -> bool:
        """Hold every clipper's threshold at its warm-up cap for good (:meth:`Clipper.pin`); whether any changed."""
        return any([s.clipper.pin() for s in self.slots if s.clipper is not None])

    def rebase(self, idx: int, norms: list[float]) -> bool:
        """Restart optimizer ``idx``'s learned statistics from ``norms`` (:meth:`Clipper.rebase`); whether it did."""
        slot = self.slots[idx] if 0 <= idx < len(self.slots) else None
        return slot is not None and slot.clipper is not None and slot.clipper.rebase(norms)

    def restore_snapshot_state(self, saved: list[dict[str, Any] | None]) -> None:
        """A rollback: each clipper's statistics go back to what the snapshot held (the statistics learned since
        then describe the discarded trajectory); the step that triggered it is not learned. Counters keep
        counting."""
        for slot, state in zip(self.slots, saved):
            slot.pending = False
            if slot.clipper is not None and state is not None:
                slot.clipper.load_state_dict(copy.deepcopy(state))

    def load_state_dict(self, saved: list[dict[str, Any]]) -> None:
        for slot, state in zip(self.slots, saved):
            slot.steps = int(state.get("steps", 0))
            slot.clipped_total = int(state.get("clipped_total", 0))
            if slot.clipper is not None:
                slot.clipper.load_state_dict(state.get("clipper") or {})
            slot.pending = False
