"""A hand-written loop as a guard host: the model, optimizers, schedulers and GradScaler the user handed over.

Cross-rank maxima through ``torch.distributed`` (or a custom reduce, e.g. Fabric's ``all_reduce``); scalars, event
text and the overview figure (``gradguard/overview``) to a ``SummaryWriter`` on rank 0 (with the same log10 twins as
the callbacks); events announced on rank 0 once on stderr and through the adapter's logger at WARNING
(``lightning_gradguard.plain`` for ``GradGuard``, ``lightning_gradguard.fabric`` for ``FabricGradGuard``; see
:mod:`lightning_gradguard.plain._announce`), so a skip or rollback is never silent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_gradguard.core._arg_checks import check_choice
from lightning_gradguard.core.clip import CLIPPERS, Clipper, check_clip_options
from lightning_gradguard.core.engine import GuardHost
from lightning_gradguard.core.engine._scalars import with_twins
from lightning_gradguard.core.engine._timeline import Timeline
from lightning_gradguard.core.recover._replica_shards import ReplicaSharding
from lightning_gradguard.core.recover._rerun import RerunResult, RngState, rerun_step
from lightning_gradguard.core.recover._snapshot import check_snapshot_covers
from lightning_gradguard.overview import OverviewBudget, write_overview
from lightning_gradguard.plain._announce import announce_line
from lightning_gradguard.plain._clip_slots import ClipSlots
from lightning_gradguard.plain._distributed import MaxReducer, replica_sharding

_LOG = logging.getLogger("lightning_gradguard.plain")


def _as_list(value: Any, name: str, kind: type, allowed: str, owner: str) -> list[Any]:
    """``value`` as a list of ``kind`` (one or a list/tuple of them); ``TypeError`` naming ``allowed`` otherwise."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{owner}: {name} must be a {allowed} or a list of them, got {type(item).__name__}")
    return items


def _raw_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a wrapper (Fabric's ``_FabricOptimizer``, Lightning's ``LightningOptimizer``)."""
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def check_loop_objects(
    model: Any, optimizers: Any, schedulers: Any, owner: str
) -> tuple[nn.Module, list[torch.optim.Optimizer], list[Any]]:
    """The loop's model, raw optimizers and schedulers as lists; ``TypeError`` naming ``owner`` for a wrong type."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    opts = [
        _raw_optimizer(x)
        for x in _as_list(optimizers, "optimizers", torch.optim.Optimizer, "torch.optim.Optimizer", owner)
    ]
    if not opts:
        raise ValueError(f"{owner}: optimizers must hold at least one torch.optim.Optimizer, got an empty list")
    check_snapshot_covers(model, opts, owner)
    scheds = [] if schedulers is None else (list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers])
    for i, sched in enumerate(scheds):
        where = f"schedulers[{i}]" if len(scheds) > 1 else "schedulers"
        if isinstance(sched, torch.optim.Optimizer) or not all(
            callable(getattr(sched, name, None)) for name in ("step", "state_dict", "load_state_dict")
        ):
            raise TypeError(
                f"{owner}: {where} must be an LR scheduler (a torch.optim.lr_scheduler object, with step, state_dict "
                f"and load_state_dict), or a list of them, got {type(sched).__name__}"
            )
        driven = getattr(sched, "optimizer", None)
        if isinstance(driven, torch.optim.Optimizer) and not any(_raw_optimizer(driven) is o for o in opts):
            raise ValueError(
                f"{owner}: {where} ({type(sched).__name__}) drives an optimizer that is not among optimizers: a "
                "rollback would restore and cut the LR of the optimizers given, not of the one it schedules"
            )
    return model, opts, scheds


def check_loop_extras(scaler: Any, writer: Any, all_reduce_max: Any, owner: str, process_group: Any = None) -> None:
    """``TypeError`` naming ``owner`` for a ``scaler`` that is no GradScaler, a ``writer`` without ``add_scalar``, an
    ``all_reduce_max`` that cannot be called or a ``process_group`` that is no ``torch.distributed`` group (each may
    be None); ``ValueError`` for a ``process_group`` without an initialised ``torch.distributed`` or together with
    ``all_reduce_max``."""
    if process_group is not None:
        import torch.distributed as dist

        group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
        if group_type is None or not isinstance(process_group, group_type):
            raise TypeError(
                f"{owner}: process_group must be a torch.distributed ProcessGroup (from dist.new_group) or None, got "
                f"{type(process_group).__name__}"
            )
        if not dist.is_initialized():
            raise ValueError(
                f"{owner}: process_group was given but torch.distributed is not initialised; call "
                "dist.init_process_group first, or leave process_group=None for a single process"
            )
        if all_reduce_max is not None:
            raise ValueError(
                f"{owner}: give process_group or all_reduce_max, not both: all_reduce_max replaces the "
                "torch.distributed reduce over process_group"
            )
    if scaler is not None and not all(callable(getattr(scaler, n, None)) for n in ("scale", "unscale_", "update")):
        raise TypeError(f"{owner}: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            f"{owner}: writer must be a TensorBoard SummaryWriter (anything with add_scalar) or None, got "
            f"{type(writer).__name__}"
        )
    if all_reduce_max is not None and not callable(all_reduce_max):
        raise TypeError(
            f"{owner}: all_reduce_max must be a function tensor -> tensor (a max all-reduce) or None, got "
            f"{type(all_reduce_max).__name__}"
        )


def check_loop_clipping(clipping: Any, options: Any, owner: str) -> dict[str, Any]:
    """Check ``clipping`` (a method name, a core clipper or None) and its ``options``; returns the checked options."""
    if clipping is not None and not isinstance(clipping, Clipper):
        check_choice("clipping", clipping, tuple(CLIPPERS), owner=owner)
    if options is not None and not (isinstance(options, Mapping) and all(isinstance(k, str) for k in options)):
        raise TypeError(
            f"{owner}: clipping_options must be a dict of option name -> value, got {type(options).__name__}"
        )
    if options and not isinstance(clipping, str):
        raise ValueError(
            f"{owner}: clipping_options is only for a method name; got clipping={clipping!r} "
            "(configure a clipper object through its own arguments)"
        )
    return check_clip_options(clipping, owner=owner, **options) if options else {}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model without DDP or Fabric wrappers (its parameter names carry no wrapper prefix)."""
    inner, wrapped = model, getattr(model, "module", None)
    while isinstance(wrapped, nn.Module) and wrapped is not inner:
        inner, wrapped = wrapped, getattr(wrapped, "module", None)
    return inner


class LoopHost(GuardHost):
    """The objects of one plain training loop (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        scaler: Any,
        reducer: MaxReducer,
        rank: int | None,
        writer: Any,
        report_dir: str | None,
        *,
        logger: logging.Logger = _LOG,
        terminal: bool = True,
    ) -> None:
        self._model = model
        self._inner = unwrap_model(model)
        #: the loop's clippers (set by the guard once built): their statistics travel with the snapshots
        self.clips: ClipSlots | None = None
        self._optimizers = optimizers
        self._schedulers = schedulers
        self._scaler = scaler
        self._reducer = reducer
        self._rank = rank
        self.writer = writer if rank in (0, None) else None
        self._report_dir = None if report_dir is None else Path(report_dir)
        self.timeline = Timeline()  # what this loop wrote (rank 0): the overview figure and the repeat at events
        self._budget = OverviewBudget()
        self._logger = logger
        self.terminal = terminal  # announce on stderr too (else only through logging)
        self.recompute: Callable[[], Any] | None = None  # this step's loss again (GradGuard.before_step)
        self.busy = False  # True while the guard runs the loop's code itself (a rerun): no new step window opens

    def model(self) -> nn.Module:
        return self._model

    def named_module(self) -> nn.Module:
        return self._inner

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._optimizers

    def schedulers(self) -> list[Any]:
        return self._schedulers

    def scaler(self) -> Any:
        scaler = self._scaler
        return scaler if scaler is not None and scaler.is_enabled() else None

    def extra_state(self) -> dict[str, Any]:
        """The GradScaler's state and the clippers' learned statistics (a rollback puts the clipping threshold back
        where it was at the snapshot)."""
        extra: dict[str, Any] = {}
        scaler = self.scaler()
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        if self.clips is not None:
            extra["clippers"] = self.clips.snapshot_state()
        return extra

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        if "scaler" in extra and self._scaler is not None:
            self._scaler.load_state_dict(extra["scaler"])
        if "clippers" in extra and self.clips is not None:
            self.clips.restore_snapshot_state(extra["clippers"])

    def clipping_in_probation(self) -> bool:
        return self.clips.in_probation() if self.clips is not None else False

    def pin_clipping(self) -> bool:
        return self.clips.pin() if self.clips is not None else False

    def rebase_clipping(self, optimizer: int, norms: list[float]) -> bool:
        return self.clips.rebase(optimizer, norms) if self.clips is not None else False

    def reducer(self) -> MaxReducer:
        return self._reducer

    def replica_sharding(self) -> ReplicaSharding | None:
        return replica_sharding(self._model, self._reducer.group)

    def rank(self) -> int:
        return int(self._rank or 0)

    def is_global_zero(self) -> bool:
        return self._rank in (0, None)

    def announce(self, line: str) -> None:
        if self.is_global_zero():
            announce_line(self._logger, line, terminal=self.terminal)

    def emit_scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None or not values:
            return
        self.timeline.update(values, step)
        for name, value in with_twins(values).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def repeat_scalars(self, step: int, fresh: Mapping[str, float], before: int | None = None) -> None:
        if self.writer is not None:
            self.emit_scalars(
                self.timeline.held(step if before is None else before, fresh, at_event=before is None), step
            )

    def emit_overview(
        self, step: int, reason: str, events: Sequence[Mapping[str, Any]], losses: Sequence[Sequence[float]]
    ) -> None:
        if self.writer is not None and hasattr(self.writer, "add_image"):
            write_overview([self.writer], self.timeline, step, reason, events, losses, self._budget)

    def emit_text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)
            self.writer.flush()

    def report_dir(self) -> Path | None:
        return self._report_dir

    def rerun(
        self,
        items: list[tuple[Any, int]],
        rngs: list[RngState | None],
        weights: dict[str, Any] | None,
        step: int | None = None,
    ) -> RerunResult | None:
        """Recompute the step with the loop's ``recompute`` callable (None without one), on the unwrapped model
        (snapshot weights are loaded there); a DDP wrapper that the callable calls runs under ``no_sync`` (its
        gradient sync would be a collective that only the ranks with a fault join)."""
        if self.recompute is None:
            return None
        no_sync = getattr(self._model, "no_sync", None)  # a DDP wrapper in the user's closure: no gradient sync
        self.busy = True
        try:
            with no_sync() if callable(no_sync) else contextlib.nullcontext():
                return rerun_step(self._inner, [self.recompute], rngs[:1], weights)
        finally:
            self.busy = False
