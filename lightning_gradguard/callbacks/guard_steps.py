"""NaNGuard's per-step work: gather one step's health (one host read, one cross-rank reduce), carry out the policy.

The decisions themselves live in ``core/``: :class:`~lightning_gradguard.core.guard._step_judge.StepJudge` (the step's
health: non-finite values, finite divergence, loss spikes, AMP scale collapse, LR too high; the same object the
plain-loop ``GradGuard`` uses), :class:`~lightning_gradguard.core.guard.GuardPolicy` (what to do), the
snapshot store and sources. This module turns Lightning hooks into their inputs and applies their answers to the
Trainer's objects.

Healthy-step cost: the shared gradient statistics, then one stack of a few scalars (gradient norm, loss, flags, the
clipper's previous decision), all-reduced once under DDP (max: every rank then judges the same numbers and the
detectors stay in lockstep) and read to the host once. Nothing reads the weights on a healthy step: non-finite
weights turn the next loss and gradients non-finite, and the weights are checked on every fault, before each
snapshot is trusted and at the end of the fit.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradguard.callbacks.guard_recovery import GuardRecovery, StrategyReducer
from lightning_gradguard.callbacks.log_writer import announce, log_scalars, log_text, tag
from lightning_gradguard.callbacks.step_context import grad_stats_for, log_due, step_record
from lightning_gradguard.core.guard._policy import StepHealth
from lightning_gradguard.core.guard._step_judge import StepJudge
from lightning_gradguard.core.recover._rules import START_KEEP_WINDOWS, StartState
from lightning_gradguard.core.recover._snapshot import BufferCopy, SnapshotStore

if TYPE_CHECKING:
    from lightning_gradguard.callbacks.nan_guard import NaNGuard

__all__ = ["GuardSteps"]

# events are announced under NaNGuard's own logger name (what users filter on)
_LOG = logging.getLogger("lightning_gradguard.callbacks.nan_guard")


class GuardSteps(GuardRecovery):
    """The per-step state of one NaNGuard (reset at each fit start) and what it does with it."""

    def __init__(self, guard: NaNGuard) -> None:
        self.g = guard
        self.judge = StepJudge(
            None,  # the Trainer's reducer is set at each fit start
            guard.divergence,
            guard.stability,
            guard.spike_zscore,
            guard.spike_window,
            guard.amp_scale_floor,
            guard.history_size,
        )
        self._resumed = False
        self.store = SnapshotStore(capacity=2, confirm_steps=guard.snapshot_confirm_steps)
        self.start_state = StartState(START_KEEP_WINDOWS * self.judge.controller.window)
        self.buffers = BufferCopy()
        self._loop_limits: tuple[Any, Any] | None = None
        self._precision: Any = None  # the precision plugin of the fit in progress
        self._reset()

    @property
    def grad_history(self) -> deque[list[float]]:
        return self.judge.grad_history

    @property
    def loss_history(self) -> deque[list[float]]:
        return self.judge.loss_history

    def _reset(self) -> None:
        self._batches: list[tuple[Any, int]] = []
        self._window_open = False
        self._loss: torch.Tensor | None = None
        self._pending: StepHealth | None = None
        self._lower: str | None = None
        self._stepped = False
        self._overflow = False
        self._record: Any = None
        self._since_snapshot = 0
        self._flagged = 0
        self._loss_max: float | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**self.judge.state_dict(), "snapshots": self.store.state_dict()["snapshots"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.judge.load_state_dict(state)
        self._resumed = True  # the judge's last row and clip flags carry into the next fit

    # ------------------------------------------------------------------ fit start / end
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self.store.reset()
        self.buffers.clear()
        g, judge = self.g, self.judge
        self._precision = trainer.precision_plugin
        judge.reduce = StrategyReducer(trainer)
        judge.divergence, judge.stability, judge.amp_scale_floor = g.divergence, g.stability, g.amp_scale_floor
        if not self._resumed:
            self.judge.forget_last_step()
        self._resumed = False
        if self.g.action != "halt":  # the state the fit starts from: trusted once known to be finite
            self.take_snapshot(trainer, pl_module, trusted=True)

    def stop(self, trainer: pl.Trainer) -> None:
        if self._loop_limits is not None:
            trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = self._loop_limits
            self._loop_limits = None
        self.store.reset()  # free the CPU copies
        self.buffers.clear()
        self._batches = []
        self._precision = None

    def fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last update is checked by no later step: check the weights themselves."""
        if self.g.check_params and trainer.global_step > 0:
            health = StepHealth(trainer.global_step, update_skipped=False)
            self._diagnose_state(trainer, pl_module, health)
            if health.weights_damaged:
                self.handle_fault(trainer, pl_module, health)

    # ------------------------------------------------------------------ per step
    def scaler(self, trainer: pl.Trainer) -> Any:
        # the fit's precision plugin, kept from the fit start (the property is three calls deep, read twice a step)
        plugin = self._precision if self._precision is not None else trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def batch_start(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._window_open:  # first micro-batch of an optimizer step: buffers as they were before it
            self._window_open = True
            self._batches = []
            self.buffers.save(pl_module)
        self._batches.append((batch, batch_idx))

    def loss(self, trainer: pl.Trainer, loss: torch.Tensor) -> None:
        value = loss.detach()
        if value.dtype is not torch.float32:
            value = value.float()
        scaler = self.scaler(trainer)
        if scaler is not None and isinstance(getattr(scaler, "_scale", None), torch.Tensor):
            value = value / scaler._scale.to(value.device)  # the loss arrives scaled by the GradScaler
        self._loss = value if self._loss is None else self._loss + value

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Judge the step before its update: one stack of scalars, one reduce (DDP), one host read."""
        step = trainer.global_step
        stats = grad_stats_for(trainer, pl_module, optimizer, step=step)
        self._record = step_record(trainer, step)
        verdict = self.judge.judge(step, [stats], self._loss, self.scaler(trainer))
        self._loss = None
        self._stepped = True
        loss_v = verdict.loss
        if loss_v is not None and (self._loss_max is None or not loss_v <= self._loss_max):
            self._loss_max = loss_v
        self._overflow = self._overflow or verdict.overflow
        self._lower = verdict.lower_lr or self._lower
        health = verdict.health
        if health is None:
            return
        if self._pending is None:
            self._pending = health
            self._pending_values = (loss_v, verdict.norm, stats)
        self._record.dropped = True
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"]:
                p.grad = None  # a real skip: optimizers leave params without a grad (and their state) alone

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._stepped:
            return  # a gradient-accumulation micro-batch: no optimizer step happened
        self._stepped, self._window_open = False, False
        step = trainer.global_step - 1
        if self.g.snapshot == "checkpoint":
            self.g.files.observe(trainer)
        pending, overflow, lower = self._pending, self._overflow, self._lower
        self._pending, self._overflow, self._lower = None, False, None
        record = self._record
        if record is not None and not record.dropped:
            self.judge.clip_flags = [getattr(c, "clipped", False) for c in record.clips.values()]
        if pending is not None:
            self._flagged += 1
            self.handle_fault(trainer, pl_module, pending)
        elif lower is not None:
            self.lower_lr(trainer, step, lower)
        else:
            self.healthy(trainer, pl_module, step, overflow)
        every: int = self.g.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 50
        if pending is None and log_due(trainer, every):
            self.write_scalars(trainer, step)
        self.show_counters(trainer, pl_module, step)
        self._batches = []

    def flush_interval(self) -> dict[str, Any]:
        out = {"flagged": self._flagged, "loss_max": self._loss_max}
        self._flagged, self._loss_max = 0, None
        return out

    # ------------------------------------------------------------------ outcomes
    def healthy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, overflow: bool) -> None:
        g = self.g
        g.policy.healthy()
        if overflow:
            g.amp_overflow_steps += 1
            g.reason = type(g.reason).AMP_OVERFLOW
            return  # the scaler skipped this update: it tests nothing, so it confirms no snapshot
        g.reason = type(g.reason).HEALTHY
        self.store.step_healthy()
        if g.snapshot == "memory" and g.action != "halt":
            self._since_snapshot += 1
            if self._since_snapshot >= g.snapshot_every_n_steps:
                self._since_snapshot = 0
                self.take_snapshot(trainer, pl_module)

    # ------------------------------------------------------------------ logging
    def write_scalars(self, trainer: pl.Trainer, step: int) -> None:
        """The guard's scalars now (at log steps, at every event, on exceptions and at fit end)."""
        g, interval = self.g, self.flush_interval()
        metrics: dict[str, float] = {
            tag("skipped_steps"): g.skipped_steps,
            tag("rollbacks"): g.rollbacks,
            tag("lr_scale"): g.lr_scale,
            tag("flagged_steps"): interval["flagged"],
        }
        if interval["loss_max"] is not None:
            metrics[tag("loss_max")] = interval["loss_max"]
        if self.scaler(trainer) is not None:
            metrics[tag("amp_overflow_steps")] = g.amp_overflow_steps
        log_scalars(trainer, metrics, step)

    def show_counters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Progress-bar counters, sent when they change."""
        if getattr(pl_module, "_current_fx_name", None) is None:
            return
        bar = self.g._bar
        bar.show_changed(trainer, pl_module, "nan_skips", float(self.g.skipped_steps), step)
        bar.show_changed(trainer, pl_module, "nan_rollbacks", float(self.g.rollbacks), step)

    def record_event(self, trainer: pl.Trainer, event: Any) -> None:
        """Keep ``event`` (a GuardEvent) and write it: a line above the progress bar/logging, TensorBoard text."""
        self.g.events.append(event.to_dict())
        line = event.line()
        announce(trainer, line, logger=_LOG)
        log_text(trainer, tag("nan_guard_events"), line, event.step)
        self.write_scalars(trainer, event.step)

    def warn(self, message: str, local: bool) -> None:
        if local:
            warnings.warn(message, UserWarning, stacklevel=3)
        else:
            rank_zero_warn(message)
