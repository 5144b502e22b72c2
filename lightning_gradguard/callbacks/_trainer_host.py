"""The Trainer as a guard host: what :class:`~lightning_gradguard.core.engine.GuardEngine` needs, read from a fit.

Model, raw optimizers and schedulers from the Trainer; the precision plugin's state (GradScaler) kept in snapshots;
cross-rank maxima through ``trainer.strategy.reduce``; events announced above the progress bar and written to every
logger (scalars) and TensorBoard (text, the overview figure); checkpoint files of this fit as rollback sources; a
halt that stops the fit even before ``min_steps``/``min_epochs`` (the limits are put back at teardown).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - such builds cannot shard either
    DTensor = None  # type: ignore[assignment,misc]
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradguard.callbacks._checkpoint_snapshots import CheckpointSnapshots
from lightning_gradguard.callbacks._log_writer import (
    announce,
    log_scalars,
    log_text,
    repeat_scalars,
    tensorboard_writers,
    timeline_for,
)
from lightning_gradguard.callbacks._step_context import context_for
from lightning_gradguard.core.engine import GuardHost
from lightning_gradguard.core.recover._fault_trace import FaultTrace, trace_fault
from lightning_gradguard.core.recover._replica_shards import ReplicaSharding
from lightning_gradguard.core.recover._rerun import BackwardRecorder, RerunResult, RngState, rerun_step
from lightning_gradguard.core.recover._snapshot import Snapshot
from lightning_gradguard.overview import OverviewBudget, write_overview

# events are announced under NaNGuard's own logger name (what users filter on)
_LOG = logging.getLogger("lightning_gradguard.callbacks.nan_guard")


def _plain_reduces() -> tuple[Any, ...]:
    """The ``reduce`` methods of Lightning's strategies that are a barrier plus an all-reduce over the world
    (``lightning.fabric.utilities.distributed._sync_ddp``)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    return (DDPStrategy.reduce, FSDPStrategy.reduce, ModelParallelStrategy.reduce)


class StrategyReducer:
    """The cross-rank maximum through ``trainer.strategy`` (a
    :class:`~lightning_gradguard.core.guard._step_judge.RankReducer`).

    Lightning's DDP, FSDP and model-parallel strategies reduce with a barrier and then an all-reduce over the world;
    the barrier orders nothing the all-reduce does not (it is itself a collective), so for those strategies, unless a
    subclass overrides ``reduce``, the same all-reduce over the world is called directly: one collective per
    reduce. Any other strategy reduces its own way.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.world_size = int(trainer.world_size)
        self._direct = type(trainer.strategy).reduce in _plain_reduces()

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        if self._direct and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
            return local
        return self.trainer.strategy.reduce(local, reduce_op="max")


class TrainerHost(GuardHost):
    """One fit's Trainer, module and checkpoint files, as the guard engine sees them."""

    def __init__(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, files: CheckpointSnapshots, out_dir: Path | None
    ) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.files = files
        self.out_dir = out_dir
        self.precision = trainer.precision_plugin  # three calls deep on the Trainer, read twice a step: kept
        self._reducer = StrategyReducer(trainer)
        self._loop_limits: tuple[Any, Any] | None = None
        self._budget = OverviewBudget()

    def model(self) -> torch.nn.Module:
        return self.pl_module

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.trainer.optimizers)

    def schedulers(self) -> list[Any]:
        return [cfg.scheduler for cfg in self.trainer.lr_scheduler_configs]

    def scaler(self) -> Any:
        scaler = getattr(self.precision, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def extra_state(self) -> dict[str, Any]:
        """The precision plugin's state (a GradScaler's) and every gradguard clipper's learned statistics: a
        rollback puts the clipping threshold back where it was at the snapshot (the statistics learned since then
        describe the discarded trajectory: a blow-up's inflated norms would loosen the clipping after a restart)."""
        extra: dict[str, Any] = {}
        state = self.precision.state_dict()
        if state:
            extra["precision"] = state
        clippers = {cb.state_key: cb.snapshot_state() for cb in self._clippers()}
        if clippers:
            extra["clippers"] = clippers
        return extra

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        if "precision" in extra:
            self.precision.load_state_dict(extra["precision"])
        saved = extra.get("clippers") or {}
        for cb in self._clippers():
            if cb.state_key in saved:
                cb.restore_snapshot_state(saved[cb.state_key])

    def clipping_in_probation(self) -> bool:
        return any(cb.clipping_in_probation() for cb in self._clippers())

    def pin_clipping(self) -> bool:
        return any([cb.pin_clipping() for cb in self._clippers()])

    def rebase_clipping(self, optimizer: int, norms: list[float]) -> bool:
        return any([cb.rebase_clipping(optimizer, norms) for cb in self._clippers()])

    def _clippers(self) -> list[Any]:
        from lightning_gradguard.callbacks.adaptive_gradient_clipping import AdaptiveGradientClipping

        return [cb for cb in getattr(self.trainer, "callbacks", []) if isinstance(cb, AdaptiveGradientClipping)]

    def reducer(self) -> StrategyReducer:
        return self._reducer

    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def local_processes(self) -> int:
        return int(self.trainer.num_devices) if self.trainer.world_size > 1 else 1

    def replica_sharding(self) -> ReplicaSharding | None:
        """DDP (every rank a replica): split snapshots over the world; sharded (DTensor) parameters or one process:
        None."""
        from lightning.pytorch.strategies import DDPStrategy

        t = self.trainer
        if t.world_size <= 1 or not isinstance(t.strategy, DDPStrategy) or not torch.distributed.is_initialized():
            return None
        if DTensor is not None and any(isinstance(p, DTensor) for p in self.pl_module.parameters()):
            return None
        nccl = torch.distributed.get_backend() == "nccl"
        return ReplicaSharding(int(t.global_rank), int(t.world_size), None, t.strategy.root_device if nccl else None)

    def rank(self) -> int:
        return int(self.trainer.global_rank)

    def is_global_zero(self) -> bool:
        return bool(self.trainer.is_global_zero)

    def warn(self, message: str, local: bool) -> None:
        if local:
            warnings.warn(message, UserWarning, stacklevel=4)
        else:
            rank_zero_warn(message)

    def announce(self, line: str) -> None:
        announce(self.trainer, line, logger=_LOG)

    def emit_scalars(self, values: dict[str, float], step: int) -> None:
        log_scalars(self.trainer, values, step)

    def emit_text(self, tag: str, text: str, step: int) -> None:
        log_text(self.trainer, tag, text, step)

    def repeat_scalars(self, step: int, fresh: Mapping[str, float], before: int | None = None) -> None:
        repeat_scalars(self.trainer, step, fresh, before)

    def emit_overview(
        self, step: int, reason: str, events: Sequence[Mapping[str, Any]], losses: Sequence[Sequence[float]]
    ) -> None:
        writers = tensorboard_writers(self.trainer)  # TensorBoard loggers on rank zero only: nothing drawn elsewhere
        timeline = timeline_for(self.trainer) if writers else None
        if timeline is not None:
            write_overview(writers, timeline, step, reason, events, losses, self._budget)

    def state_changed(self) -> None:
        context_for(self.trainer).cache.invalidate()  # cached statistics describe the discarded state

    def report_dir(self) -> Path | None:
        return self.out_dir

    def epoch(self) -> int | None:
        return self.trainer.current_epoch

    def report_extra(self) -> dict[str, Any]:
        t = self.trainer
        return {"epoch": t.current_epoch, "precision": str(t.precision), "world_size": t.world_size}

    def stop_training(self) -> None:
        # should_stop alone waits for min_steps/min_epochs: lift both for the rest of this fit (see restore_limits)
        t = self.trainer
        t.should_stop = True
        if self._loop_limits is None:
            self._loop_limits = (t.fit_loop.min_epochs, t.fit_loop.epoch_loop.min_steps)
        t.fit_loop.min_epochs, t.fit_loop.epoch_loop.min_steps = 0, None

    def restore_limits(self) -> None:
        """Put back the loop limits a halt lifted (at teardown)."""
        if self._loop_limits is not None:
            self.trainer.fit_loop.min_epochs, self.trainer.fit_loop.epoch_loop.min_steps = self._loop_limits
            self._loop_limits = None

    @contextlib.contextmanager
    def _quiet_module(self, backward: BackwardRecorder | None = None) -> Iterator[pl.LightningModule]:
        """The LightningModule with ``self.log`` muted (a replay or rerun must not log a second value) and, under
        manual optimization, its backward and optimizer calls made harmless (:meth:`_manual_steps_muted`; the
        backward calls go to ``backward``, or nowhere)."""
        pl_module = self.pl_module
        log = pl_module.__dict__.get("log")
        pl_module.log = lambda *a, **k: None  # type: ignore[method-assign]
        try:
            if pl_module.automatic_optimization:
                yield pl_module
            else:
                with self._manual_steps_muted(backward or BackwardRecorder(pl_module)):
                    yield pl_module
        finally:
            if log is None:
                del pl_module.log
            else:
                pl_module.log = log  # type: ignore[method-assign]

    def replay(self, item: tuple[Any, int], step: int | None = None) -> FaultTrace | None:
        """Run the bad batch through ``training_step`` once more (no gradients, logging muted, the step counter at
        ``step``) with hooks on every module: which one produced the fault, which only passed it on."""
        batch, batch_idx = item
        with self._quiet_module() as pl_module, self._at_step(step):
            return trace_fault(pl_module, lambda: pl_module.training_step(batch, batch_idx))

    @contextlib.contextmanager
    def _at_step(self, step: int | None) -> Iterator[None]:
        """``trainer.global_step`` at ``step`` for a replay or rerun: the engine decides after the optimizer step
        has been counted, and a ``training_step`` that reads ``self.global_step`` (a KL weight, a curriculum) must
        compute what it computed then. Manual optimization counts ``opt.step()`` calls: ``step`` is the flagged
        optimizer's (exact with one optimizer; with several, what the flagged one's part of the step read)."""
        loop = self.trainer.fit_loop.epoch_loop
        if self.pl_module.automatic_optimization:
            total = loop.automatic_optimization.optim_progress.optimizer.step.total
        else:
            total = loop.manual_optimization.optim_step_progress.total
        delta = total.completed - step if step is not None else 0
        if delta <= 0:
            yield
            return
        total.completed -= delta
        try:
            yield
        finally:
            total.completed += delta

    def _sharded(self) -> bool:
        return DTensor is not None and any(isinstance(p, DTensor) for p in self.pl_module.parameters())

    def rerun_takes_items(self) -> bool:
        return True  # training_step on the batches given

    def rerun_is_collective(self) -> bool:
        """Sharded (DTensor) parameters: a rerun's forward all-gathers them, every rank reruns together."""
        return self._sharded()

    @contextlib.contextmanager
    def _manual_steps_muted(self, backward: BackwardRecorder) -> Iterator[None]:
        """For a replay or rerun of a manual-optimization ``training_step``: ``manual_backward`` records through
        ``backward`` (``torch.autograd.grad``: ``.grad`` untouched, no callback hooks), the optimizers' ``step``
        only runs its closure (no update, no step counted, no ``on_before_optimizer_step``), their ``zero_grad``,
        the schedulers' ``step`` and ``clip_gradients`` do nothing. Instance attributes, put back afterwards (a
        scheduler's own wrapper of ``optimizer.step`` included)."""
        pl_module, trainer = self.pl_module, self.trainer

        def step(closure: Callable[[], Any] | None = None, **_: Any) -> Any:
            return closure() if closure is not None else None

        def nothing(*_: Any, **__: Any) -> None:
            return None

        patches: list[tuple[Any, str, Any]] = [
            (pl_module, "manual_backward", backward),
            (pl_module, "clip_gradients", nothing),
        ]
        wrapped = list(getattr(trainer.strategy, "_lightning_optimizers", []))
        for opt in [*wrapped, *trainer.optimizers]:
            patches += [(opt, "step", step), (opt, "zero_grad", nothing)]
        for cfg in trainer.lr_scheduler_configs:
            patches.append((cfg.scheduler, "step", nothing))
        missing = object()
        saved = [(obj, name, obj.__dict__.get(name, missing)) for obj, name, _ in patches]
        try:
            for obj, name, value in patches:
                obj.__dict__[name] = value
            yield
        finally:
            for obj, name, old in reversed(saved):
                if old is missing:
                    obj.__dict__.pop(name, None)
                else:
                    obj.__dict__[name] = old

    def rerun(
        self,
        items: list[tuple[Any, int]],
        rngs: list[RngState | None],
        weights: dict[str, Any] | None,
        step: int | None = None,
    ) -> RerunResult | None:
        """Recompute the step through ``training_step`` under the precision plugin's context (autocast), logging
        muted. Manual optimization: its backward calls are recorded and its optimizer calls do nothing
        (:meth:`_manual_steps_muted`; the step's loss is the sum of its losses). Sharded (DTensor) parameters: a
        forward-only rerun that every rank runs together (:meth:`rerun_is_collective`; see
        ``core/recover/_rerun.py``). Never with SyncBatchNorm across processes (its forward is a collective)."""
        pl_module, trainer = self.pl_module, self.trainer
        if not items:
            return None
        if trainer.world_size > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()):
            return None
        plugin = trainer.precision_plugin
        manual = not pl_module.automatic_optimization
        recorder = BackwardRecorder(pl_module)

        def loss_of(batch: Any, batch_idx: int) -> Callable[[], Any]:
            def compute() -> Any:
                recorder.reset()  # one record per micro-batch
                with plugin.train_step_context():
                    out = pl_module.training_step(batch, batch_idx)
                return recorder if manual else out

            return compute

        computes = [loss_of(b, i) for b, i in items]
        with self._quiet_module(recorder) as pl_module, self._at_step(step):
            return rerun_step(pl_module, computes, rngs, weights, grads=not self._sharded())

    def save_batches(self, batches: list[tuple[Any, int]], step: int) -> str | None:
        out, t = self.out_dir, self.trainer
        if out is None:
            return None
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"nan_guard_bad_batch_step{step}_rank{t.global_rank}.pt"
        moved = [move_data_to_device(b, "cpu") for b, _ in batches]
        torch.save({"step": step, "epoch": t.current_epoch, "rank": t.global_rank, "batches": moved}, path)
        return str(path)

    def checkpoint_snapshot(self, survived: Callable[[int], bool]) -> tuple[Snapshot | None, list[str]]:
        # a distributed checkpoint is loaded collectively: the ranks agree through the guard's own reducer
        return self.files.best(self.trainer, survived, self._reducer)
