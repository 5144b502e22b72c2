"""NaNGuard's per-step work: gather one step's health (one host read, one cross-rank reduce), carry out the policy.

The decisions themselves live in ``core/``: :class:`~lightning_gradguard.core.guard_policy.GuardPolicy` (what to do),
:class:`~lightning_gradguard.core.divergence.DivergenceDetector` (finite divergence),
:class:`~lightning_gradguard.core.stability.StabilityController` (LR too high), the snapshot store and sources. This
module turns Lightning hooks into their inputs and applies their answers to the Trainer's objects.

Healthy-step cost: the shared gradient statistics, then one stack of a few scalars (gradient norm, loss, flags, the
clipper's previous decision), all-reduced once under DDP (max: every rank then judges the same numbers and the
detectors stay in lockstep) and read to the host once. Nothing reads the weights on a healthy step: non-finite
weights turn the next loss and gradients non-finite, and the weights are checked on every fault, before each
snapshot is trusted and at the end of the fit.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_gradguard.callbacks.step_context import context_for, grad_stats_for, log_due, step_record
from lightning_gradguard.core.divergence import DivergenceDetector
from lightning_gradguard.core.divergence_report import DivergenceReport
from lightning_gradguard.core.fault_trace import first_nonfinite_module, nonfinite_in
from lightning_gradguard.core.guard_policy import GuardAction, GuardEvent, StepHealth
from lightning_gradguard.core.loss_spike import LossSpikeDetector
from lightning_gradguard.core.lr_scaling import scale_lr
from lightning_gradguard.core.snapshot import (
    BufferCopy,
    SnapshotStore,
    nonfinite_entries,
    restore_snapshot,
    take_snapshot,
)
from lightning_gradguard.core.stability import StabilityController
from lightning_gradguard.errors import DivergenceError

if TYPE_CHECKING:
    from lightning_gradguard.callbacks.nan_guard import NaNGuard

__all__ = ["GuardSteps"]

_NONFINITE_CAUSES = {"nonfinite_loss", "nonfinite_grad", "nonfinite_params", "nonfinite_buffers", "other_rank"}


class GuardSteps:
    """The per-step state of one NaNGuard (reset at each fit start) and what it does with it."""

    def __init__(self, guard: NaNGuard) -> None:
        self.g = guard
        self.detector = DivergenceDetector()
        self.controller = StabilityController()
        self.spike = LossSpikeDetector(guard.spike_zscore, guard.spike_window) if guard.spike_zscore else None
        self.store = SnapshotStore(capacity=2, confirm_steps=guard.snapshot_confirm_steps)
        self.buffers = BufferCopy()
        self.grad_history: deque[list[float]] = deque(maxlen=guard.history_size)
        self.loss_history: deque[list[float]] = deque(maxlen=guard.history_size)
        self._loop_limits: tuple[Any, Any] | None = None
        self._clip_flags: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._batches: list[tuple[Any, int]] = []
        self._window_open = False
        self._loss: torch.Tensor | None = None
        self._pending: StepHealth | None = None
        self._lower: str | None = None
        self._stepped = False
        self._overflow = False
        self._record: Any = None
        self._last: tuple[float, float] | None = None
        self._since_snapshot = 0
        self._flagged = 0
        self._loss_max: float | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "divergence": self.detector.state_dict(),
            "stability": self.controller.state_dict(),
            "spike": self.spike.state_dict() if self.spike is not None else None,
            "grad_history": [list(r) for r in self.grad_history],
            "loss_history": [list(r) for r in self.loss_history],
            "snapshots": self.store.state_dict()["snapshots"],
            "pending_row": list(self._last) if self._last is not None else None,
            "clip_flags": [bool(c) for c in self._clip_flags],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("divergence") or {})
        self.controller.load_state_dict(state.get("stability") or {})
        if self.spike is not None and state.get("spike"):
            self.spike.load_state_dict(state["spike"])
        self.grad_history.clear()
        self.grad_history.extend(list(r) for r in state.get("grad_history", []))
        self.loss_history.clear()
        self.loss_history.extend(list(r) for r in state.get("loss_history", []))
        row = state.get("pending_row")
        self._resumed = (None if row is None else (float(row[0]), float(row[1])), list(state.get("clip_flags", [])))

    # ------------------------------------------------------------------ fit start / end
    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self.store.reset()
        self.buffers.clear()
        self._last, self._clip_flags = getattr(self, "_resumed", (None, []))
        self._resumed = (None, [])
        if self.g.action != "halt":  # the state the fit starts from: trusted once known to be finite
            self.take_snapshot(trainer, pl_module, trusted=True)

    def stop(self, trainer: pl.Trainer) -> None:
        if self._loop_limits is not None:
            trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = self._loop_limits
            self._loop_limits = None
        self.store.reset()  # free the CPU copies
        self.buffers.clear()
        self._batches = []

    def fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last update is checked by no later step: check the weights themselves."""
        if self.g.check_params and trainer.global_step > 0:
            health = StepHealth(trainer.global_step, update_skipped=False)
            self._diagnose_state(trainer, pl_module, health)
            if health.weights_damaged:
                self.handle_fault(trainer, pl_module, health)

    # ------------------------------------------------------------------ per step
    def scaler(self, trainer: pl.Trainer) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def batch_start(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._window_open:  # first micro-batch of an optimizer step: buffers as they were before it
            self._window_open = True
            self._batches = []
            self.buffers.save(pl_module)
        self._batches.append((batch, batch_idx))

    def loss(self, trainer: pl.Trainer, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        scaler = self.scaler(trainer)
        if scaler is not None and isinstance(getattr(scaler, "_scale", None), torch.Tensor):
            value = value / scaler._scale.to(value.device)  # the loss arrives scaled by the GradScaler
        self._loss = value if self._loss is None else self._loss + value

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Judge the step before its update: one stack of scalars, one reduce (DDP), one host read."""
        step = trainer.global_step
        stats = grad_stats_for(trainer, pl_module, optimizer)
        dev = stats.device
        self._record = step_record(trainer)
        has_loss = self._loss is not None
        loss = self._loss.to(dev).reshape(()) if self._loss is not None else torch.zeros((), device=dev)
        self._loss = None
        scaler = self.scaler(trainer)
        scale_bad = torch.zeros((), device=dev)
        if scaler is not None and isinstance(getattr(scaler, "_scale", None), torch.Tensor):
            scale_bad = scaler._scale.to(dev).reshape(()) < self.g.amp_scale_floor
        spike = self.spike.update(loss) if (self.spike is not None and has_loss) else torch.zeros((), device=dev)
        clipped = [torch.as_tensor(c, device=dev).reshape(()) for c in self._clip_flags]
        norm_t = getattr(stats, "total_norm64", stats.total_norm)  # float64: finite iff every element is
        parts = [norm_t.reshape(()), loss, ~torch.isfinite(loss), scale_bad, spike, *clipped]
        if trainer.world_size > 1:  # max over ranks (NaN made +inf first: collectives may drop NaN)
            local = torch.stack([p.to(torch.float64) for p in parts])
            glob = trainer.strategy.reduce(torch.nan_to_num(local.clone(), nan=math.inf), reduce_op="max")
            values = torch.cat([local, glob]).tolist()
            mine, glob_v = values[: len(parts)], values[len(parts) :]
        elif dev.type == "cpu":
            mine = glob_v = [float(p.item()) for p in parts]  # nothing to synchronise on the CPU
        else:
            mine = glob_v = torch.stack([p.to(torch.float64) for p in parts]).tolist()
        self._stepped, self._clip_flags = True, []
        norm, loss_v = mine[0], mine[1] if has_loss else math.nan
        self.grad_history.append([step, norm])
        if has_loss:
            self.loss_history.append([step, loss_v])
            if self._loss_max is None or not loss_v <= self._loss_max:
                self._loss_max = loss_v
        health = StepHealth(
            step,
            nonfinite_loss=has_loss and bool(mine[2]),
            nonfinite_grad=not math.isfinite(norm),
            scale_collapse=bool(mine[3]),
            loss_spike=bool(mine[4]),
        )
        global_grad_bad = not math.isfinite(glob_v[0])
        overflow = scaler is not None and global_grad_bad and not (bool(glob_v[2]) or bool(glob_v[3]))
        if overflow:
            self._overflow, health.nonfinite_grad = True, False  # the GradScaler's business
        elif self.g.divergence and has_loss:  # judged on the values every rank shares: detectors in lockstep
            health.loss_divergence, health.grad_divergence = self.detector.update(glob_v[1], glob_v[0])
        if health.cause is None and (global_grad_bad and not overflow or any(bool(v) for v in glob_v[2:5])):
            health.other_rank = True
        healthy = health.cause is None and not overflow
        if self.g.stability and healthy and self._last is not None:
            self._lower = self.controller.update(*self._last, clipped=any(bool(v) for v in glob_v[5:])) or self._lower
        self._last = (glob_v[1], glob_v[0]) if healthy and has_loss else None
        if health.cause is None:
            return
        if self._pending is None:
            self._pending = health
            self._pending_values = (loss_v if has_loss else None, norm, stats)
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
            self._clip_flags = [getattr(c, "clipped", False) for c in record.clips.values()]
        if pending is not None:
            self._flagged += 1
            self.handle_fault(trainer, pl_module, pending)
        elif lower is not None:
            self.lower_lr(trainer, step, lower)
        else:
            self.healthy(trainer, pl_module, step, overflow)
        if pending is None and log_due(trainer, self.g.log_every_n_steps or trainer.log_every_n_steps):
            self.g.write_scalars(trainer, step)
        self.g.show_counters(trainer, pl_module, step)
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
        failed, damaged = _any_rank(trainer, error is not None, bool(bad))
        step = trainer.global_step
        if failed:
            good = self.store.compute()
            keep = f"the snapshot of step {good.step}" if good is not None else "no snapshot (a fault now halts)"
            where = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
            self.g.warn(
                f"NaNGuard could not take a snapshot at step {step} ({where}); rollbacks use {keep}", error is not None
            )
        elif damaged:  # the last update made the weights non-finite before any loss or gradient could show it
            health = StepHealth(max(step - 1, 0), update_skipped=False)
            self._diagnose_state(trainer, pl_module, health)
            health.nonfinite_params = health.nonfinite_params or not health.nonfinite_buffers
            self.handle_fault(trainer, pl_module, health)
        else:
            self.store.update(snap, trusted=trusted)

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
        event.cause, event.reason = decision.cause.value, decision.reason
        g.cause = decision.cause
        if decision.action is GuardAction.ROLLBACK:
            restored = self.rollback(trainer, pl_module)
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
        g.record_event(trainer, event)

    def _diagnose_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, health: StepHealth
    ) -> tuple[list[str], list[str]]:
        """Names of non-finite weights and buffers here; the health flags OR-ed over the ranks."""
        bad = nonfinite_entries(pl_module.state_dict())
        params = {n for n, _ in pl_module.named_parameters()}
        names = [n for n in bad if n in params], [n for n in bad if n not in params]
        health.nonfinite_params, health.nonfinite_buffers = _any_rank(trainer, bool(names[0]), bool(names[1]))
        return names

    def rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, str | None] | str:
        """Restore the newest trusted snapshot and cut the LR; returns (step, file) or why it could not."""
        snap, tried = None, []
        if self.g.snapshot == "checkpoint":
            snap, tried = self.g.files.best(trainer, self._survived)
        listing = "; ".join(tried) if tried else "none written yet"
        if snap is None and self.g.snapshot == "checkpoint":
            self._fallback_note = f"no usable checkpoint file ({listing}): used the in-memory start state"
        snap = snap or self.store.compute()  # no usable file yet: the in-memory start state
        if snap is None:
            return f"no trusted snapshot to roll back to (checkpoint files: {listing})"
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        extra = restore_snapshot(snap, pl_module, trainer.optimizers, schedulers)
        if "precision" in extra:
            trainer.precision_plugin.load_state_dict(extra["precision"])
        self.store.discard_after(snap)
        snap_scale = float(snap.meta.get("lr_scale", 1.0))
        factor = min(self.g.lr_scale * self.g.lr_factor / snap_scale, 1.0)  # never raises the LR
        scale_lr(trainer.optimizers, schedulers, factor)
        self.g.lr_scale = snap_scale * factor
        self._after_state_change(trainer)
        return snap.step, snap.meta.get("path")

    def lower_lr(self, trainer: pl.Trainer, step: int, reason: str) -> None:
        g = self.g
        scale_lr(trainer.optimizers, [cfg.scheduler for cfg in trainer.lr_scheduler_configs], g.lr_factor)
        g.lr_scale *= g.lr_factor
        g.reason = type(g.reason).LOWERED_LR
        self._after_state_change(trainer)
        g.record_event(trainer, GuardEvent(step, "lower_lr", "lr_too_high", g.lr_scale, reason=reason))

    def _after_state_change(self, trainer: pl.Trainer) -> None:
        self._since_snapshot = 0
        self._last = None
        self.detector.restart_runs()
        self.controller.reset()
        context_for(trainer).cache.invalidate()  # cached statistics describe the discarded state

    def _survived(self, ckpt_step: int) -> bool:
        faults = [int(e["step"]) for e in self.g.events if int(e["step"]) >= ckpt_step]
        first_bad = min(faults) if faults else self._current_step
        return ckpt_step + self.g.snapshot_confirm_steps <= min(first_bad, self._current_step)

    @property
    def _current_step(self) -> int:
        return int(self.grad_history[-1][0]) if self.grad_history else 0

    def halt(self, trainer: pl.Trainer, event: GuardEvent) -> None:
        g = self.g
        g.reason = type(g.reason).HALTED
        reason = f"{event.cause.replace('_', ' ')}; {event.reason}"
        event.reason = reason
        report = DivergenceReport(
            step=event.step,
            reason=reason,
            cause=event.cause,
            nonfinite_loss=event.cause == "nonfinite_loss",
            nonfinite_grads=event.nonfinite_grads,
            nonfinite_params=event.nonfinite_params,
            lr=[[float(grp["lr"]) for grp in opt.param_groups] for opt in trainer.optimizers],
            lr_scale=g.lr_scale,
            counters={
                "skipped_steps": g.skipped_steps,
                "rollbacks": g.rollbacks,
                "amp_overflow_steps": g.amp_overflow_steps,
            },
            grad_norm_history=[list(r) for r in self.grad_history],
            loss_history=[list(r) for r in self.loss_history],
            events=[*g.events, event.to_dict()],
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
        g.record_event(trainer, event)
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


def _any_rank(trainer: pl.Trainer, *flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (one reduce; free on a single device)."""
    if trainer.world_size <= 1:
        return tuple(flags)
    t = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
    return tuple(bool(v > 0) for v in trainer.strategy.reduce(t, reduce_op="max").tolist())


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
