"""NaNGuard's outcomes: take and trust snapshots, handle a fault (diagnose, decide, skip/roll back/halt), cut the LR.

A mixin of :class:`~lightning_gradguard.callbacks.guard_steps.GuardSteps` (which gathers each step's health): the
decisions come from ``core/`` (:class:`~lightning_gradguard.core.guard.GuardPolicy`); this module applies
them to the Trainer's model, optimizers, schedulers and precision plugin, and writes the event and the halt report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_gradguard.callbacks.step_context import context_for
from lightning_gradguard.core.guard._policy import GuardAction, GuardEvent, StepHealth
from lightning_gradguard.core.guard._step_judge import StepJudge, any_rank
from lightning_gradguard.core.recover._fault_trace import first_nonfinite_module, nonfinite_in
from lightning_gradguard.core.recover._rules import (
    StartState,
    halt_reason,
    halt_report,
    roll_back,
    snapshot_failure_message,
    stability_cut,
)
from lightning_gradguard.core.recover._snapshot import (
    BufferCopy,
    Snapshot,
    SnapshotStore,
    nonfinite_entries,
    nonfinite_weights_and_buffers,
    take_snapshot,
)
from lightning_gradguard.errors import DivergenceError

if TYPE_CHECKING:
    from lightning_gradguard.callbacks.nan_guard import NaNGuard

__all__ = ["GuardRecovery", "StrategyReducer"]

_NONFINITE_CAUSES = {"nonfinite_loss", "nonfinite_grad", "nonfinite_params", "nonfinite_buffers", "other_rank"}


class StrategyReducer:
    """The cross-rank maximum through ``trainer.strategy``: the
    :class:`~lightning_gradguard.core.guard._step_judge.RankReducer` the Trainer guard gives its step judge."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    @property
    def world_size(self) -> int:
        return int(self.trainer.world_size)

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(local, reduce_op="max")


class GuardRecovery:
    """What the guard does once a step's health is known (attributes set by ``GuardSteps``)."""

    g: NaNGuard
    store: SnapshotStore
    buffers: BufferCopy
    judge: StepJudge
    _batches: list[tuple[Any, int]]
    _loop_limits: tuple[Any, Any] | None
    _since_snapshot: int
    # provided by GuardSteps (which also writes the scalars that every event updates)
    record_event: Callable[[pl.Trainer, GuardEvent], None]
    warn: Callable[[str, bool], None]
    start_state: StartState  # the untrained state, for a too-high LR from the first step

    def take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trusted: bool = False) -> None:
        """Copy the state; keep it only if every rank copied it and it is finite (else the older ones stay)."""
        snap, error, bad = None, None, []
        try:
            snap = take_snapshot(
                pl_module,
                trainer.optimizers,
                [cfg.scheduler for cfg in trainer.lr_scheduler_configs],
                step=trainer.global_step,
                extra={"precision": trainer.precision_plugin.state_dict()}
                if trainer.precision_plugin.state_dict()
                else {},
                meta={"lr_scale": self.g.lr_scale},
            )
            bad = nonfinite_entries(snap.model) if self.g.check_params else []
        except Exception as err:  # e.g. host memory exhausted: must not end the run the guard keeps alive
            error = err
        failed, damaged = any_rank(
            StrategyReducer(trainer), error is not None, bool(bad), device=trainer.strategy.root_device
        )
        step = trainer.global_step
        if failed:
            self.warn(snapshot_failure_message("NaNGuard", step, error, self.store.compute()), error is not None)
        elif damaged:  # the last update made the weights non-finite before any loss or gradient could show it
            health = StepHealth(max(step - 1, 0), update_skipped=False)
            self._diagnose_state(trainer, pl_module, health)
            health.nonfinite_params = health.nonfinite_params or not health.nonfinite_buffers
            self.handle_fault(trainer, pl_module, health)
        elif snap is not None:
            self.store.update(snap, trusted=trusted)
            if trusted:
                self.start_state.offer(snap)
        self.start_state.expire(step)

    def handle_fault(self, trainer: pl.Trainer, pl_module: pl.LightningModule, health: StepHealth) -> None:
        g = self.g
        loss, norm, stats = (
            getattr(self, "_pending_values", (None, None, None)) if health.update_skipped else (None, None, None)
        )
        event = GuardEvent(health.step, "", "", g.lr_scale, loss=loss, grad_norm=norm)
        if health.update_skipped:
            g.skipped_steps += 1
            if self._batches:
                event.nonfinite_batch = any(nonfinite_in(b) for b, _ in self._batches)
                health.nonfinite_batch = event.nonfinite_batch
                if health.cause is not None and health.cause.value in _NONFINITE_CAUSES:
                    event.first_nonfinite_module = _replay(pl_module, self._batches[-1])
            self.buffers.restore()  # undo what the bad batch (and the replay) did to BatchNorm statistics
            if stats is not None and health.nonfinite_grad:
                event.nonfinite_grads = stats.nonfinite_names()[:20]
        if g.check_params and (health.update_skipped or health.weights_damaged):
            names = self._diagnose_state(trainer, pl_module, health)
            event.nonfinite_params, event.nonfinite_buffers = names[0][:20], names[1][:20]
        if g.save_bad_batch and self._batches:
            event.bad_batch_path = self._save_batches(trainer, health.step)
        decision = g.policy.decide(health, can_roll_back=self.store.compute() is not None or g.snapshot == "checkpoint")
        event.cause, event.reason = decision.cause.value if decision.cause else "", decision.reason
        g.cause = decision.cause
        if decision.action is GuardAction.ROLLBACK:
            restored = self.rollback(trainer, pl_module, decision.lr_power)
            if isinstance(restored, str):
                g.policy.rollbacks -= 1
                if health.weights_damaged:
                    decision.action, event.reason = GuardAction.HALT, restored
                else:
                    decision.action, event.reason = GuardAction.SKIP, f"skipped instead: {restored}"
            else:
                event.snapshot_step, event.snapshot_path = restored
                note, self._fallback_note = getattr(self, "_fallback_note", ""), ""
                event.reason = "; ".join(r for r in (event.reason, note) if r)
        event.lr_scale = g.lr_scale
        if decision.action is GuardAction.HALT:
            event.kind = "halt"
            self.halt(trainer, event)
            return
        event.kind = decision.action.value
        g.reason = type(g.reason).ROLLED_BACK if event.kind == "rollback" else type(g.reason).SKIPPED
        self.record_event(trainer, event)

    def _diagnose_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, health: StepHealth
    ) -> tuple[list[str], list[str]]:
        """Names of non-finite weights and buffers here; the health flags OR-ed over the ranks."""
        names = nonfinite_weights_and_buffers(pl_module)
        health.nonfinite_params, health.nonfinite_buffers = any_rank(
            StrategyReducer(trainer), bool(names[0]), bool(names[1]), device=trainer.strategy.root_device
        )
        return names

    def rollback(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, lr_power: int = 1
    ) -> tuple[int, str | None] | str:
        """Restore the newest trusted snapshot and cut the LR; returns (step, file) or why it could not."""
        snap: Snapshot | None = None
        tried: list[str] = []
        if self.g.snapshot == "checkpoint":
            snap, tried = self.g.files.best(trainer, self._survived)
        listing = "; ".join(tried) if tried else "none written yet"
        if snap is None and self.g.snapshot == "checkpoint":
            self._fallback_note = f"no usable checkpoint file ({listing}): used the in-memory start state"
        snap = snap or self.store.compute()  # no usable file yet: the in-memory start state
        if snap is None:
            return f"no trusted snapshot to roll back to (checkpoint files: {listing})"
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        g = self.g
        extra, g.lr_scale = roll_back(
            snap, self.store, pl_module, trainer.optimizers, schedulers, g.lr_scale, g.lr_factor, lr_power
        )
        if "precision" in extra:
            trainer.precision_plugin.load_state_dict(extra["precision"])
        self._after_state_change(trainer)
        return snap.step, snap.meta.get("path")

    def lower_lr(self, trainer: pl.Trainer, step: int, reason: str) -> None:
        """The stability controller's cut (``core.recovery_rules.stability_cut``: from the untrained state when the
        model is worse than it, from before the climb when the loss climbed, else in place)."""
        g = self.g
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        model = trainer.lightning_module
        snap, extra, g.lr_scale = stability_cut(
            self.start_state, self.store, self.judge.controller, g.policy, model, trainer.optimizers, schedulers,
            g.lr_scale, g.lr_factor, step,
        )  # fmt: skip
        if "precision" in extra:
            trainer.precision_plugin.load_state_dict(extra["precision"])
        g.reason = type(g.reason).ROLLED_BACK if snap is not None else type(g.reason).LOWERED_LR
        self._after_state_change(trainer)
        kind = "rollback" if snap is not None else "lower_lr"
        event = GuardEvent(step, kind, "lr_too_high", g.lr_scale, reason=reason)
        event.snapshot_step = snap.step if snap is not None else None
        self.record_event(trainer, event)

    def _after_state_change(self, trainer: pl.Trainer) -> None:
        self._since_snapshot = 0
        self.judge.after_state_change()
        context_for(trainer).cache.invalidate()  # cached statistics describe the discarded state

    def _survived(self, ckpt_step: int) -> bool:
        faults = [int(e["step"]) for e in self.g.events if int(e["step"]) >= ckpt_step]
        first_bad = min(faults) if faults else self._current_step
        return ckpt_step + self.g.snapshot_confirm_steps <= min(first_bad, self._current_step)

    @property
    def _current_step(self) -> int:
        return int(self.judge.grad_history[-1][0]) if self.judge.grad_history else 0

    def halt(self, trainer: pl.Trainer, event: GuardEvent) -> None:
        g = self.g
        g.reason = type(g.reason).HALTED
        event.reason = reason = halt_reason(event)
        counters = {
            "skipped_steps": g.skipped_steps,
            "rollbacks": g.rollbacks,
            "amp_overflow_steps": g.amp_overflow_steps,
        }
        report = halt_report(
            event,
            trainer.optimizers,
            g.lr_scale,
            counters,
            self.judge.grad_history,
            self.judge.loss_history,
            g.events,
            extra={
                "epoch": trainer.current_epoch,
                "precision": str(trainer.precision),
                "world_size": trainer.world_size,
            },
        )
        if g._out_dir is not None:
            event.report_path = g.report_path = str(g._out_dir / "nan_guard_report.json")
            if trainer.is_global_zero:
                report.write(g._out_dir, "nan_guard_report")
        self.record_event(trainer, event)
        g.halt_error = DivergenceError(reason, step=event.step, report_path=event.report_path)
        # should_stop alone waits for min_steps/min_epochs: lift both for the rest of this fit (restored at teardown)
        trainer.should_stop = True
        if self._loop_limits is None:
            self._loop_limits = (trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps)
        trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = 0, None
        if g.raise_on_halt:
            raise g.halt_error

    def _save_batches(self, trainer: pl.Trainer, step: int) -> str | None:
        out = self.g._out_dir
        if out is None:
            return None
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"nan_guard_bad_batch_step{step}_rank{trainer.global_rank}.pt"
        batches = [move_data_to_device(b, "cpu") for b, _ in self._batches]
        torch.save(
            {"step": step, "epoch": trainer.current_epoch, "rank": trainer.global_rank, "batches": batches}, path
        )
        return str(path)


def _replay(pl_module: pl.LightningModule, item: tuple[Any, int]) -> str | None:
    """Run the bad batch through ``training_step`` once more (no gradients, logging muted) and name the first
    module whose output went non-finite."""
    batch, batch_idx = item
    log = pl_module.__dict__.get("log")
    pl_module.log = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        return first_nonfinite_module(pl_module, lambda: pl_module.training_step(batch, batch_idx))
    finally:
        if log is None:
            del pl_module.log
        else:
            pl_module.log = log  # type: ignore[method-assign]
