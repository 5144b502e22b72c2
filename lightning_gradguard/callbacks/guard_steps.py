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

from lightning_gradguard.callbacks.guard_recovery import GuardRecovery
from lightning_gradguard.callbacks.step_context import grad_stats_for, log_due, step_record
from lightning_gradguard.core.divergence import DivergenceDetector
from lightning_gradguard.core.guard_policy import StepHealth
from lightning_gradguard.core.host_read import read_scalars
from lightning_gradguard.core.loss_spike import LossSpikeDetector
from lightning_gradguard.core.snapshot import BufferCopy, SnapshotStore
from lightning_gradguard.core.stability import StabilityController

if TYPE_CHECKING:
    from lightning_gradguard.callbacks.nan_guard import NaNGuard

__all__ = ["GuardSteps"]


class GuardSteps(GuardRecovery):
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
        else:  # float64: a finite norm beyond float32's range must not read as inf
            mine = glob_v = [float(v) for v in read_scalars(parts, dev, dtype=torch.float64)]
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
