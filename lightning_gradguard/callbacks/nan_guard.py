"""NaNGuard: on a non-finite loss, gradient or parameter, skip the step, roll back with a lower LR, or halt."""

from __future__ import annotations

import logging
import math
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.amp import GradScaler

from lightning_gradguard.callbacks.log_writer import ProgressBarValues, log_scalars, log_text, tag
from lightning_gradguard.callbacks.step_context import context_for, grad_stats_for, unwrap_optimizer
from lightning_gradguard.callbacks.strategy_support import check_supported_strategy
from lightning_gradguard.core.arg_checks import check_choice, check_int, is_number
from lightning_gradguard.core.divergence_report import DivergenceReport
from lightning_gradguard.core.grad_stats import norms_of
from lightning_gradguard.core.host_read import read_scalars
from lightning_gradguard.core.loss_spike import LossSpikeDetector
from lightning_gradguard.core.lr_scaling import is_known_scheduler, scale_lr
from lightning_gradguard.core.snapshot import Snapshot, SnapshotStore, restore_snapshot, take_snapshot
from lightning_gradguard.errors import DivergenceError

__all__ = ["GuardCause", "GuardDecision", "NaNGuard"]

log = logging.getLogger(__name__)

_ACTIONS = ("rollback", "skip", "halt")
_ESCALATIONS = ("rollback", "halt")
_SNAPSHOTS = ("memory", "checkpoint")

# bits of the per-step health code computed on the device and read with one host transfer
_LOSS, _GRAD, _SPIKE, _SCALE = 1, 2, 4, 8


class GuardDecision(Enum):
    """What the guard did at the last optimizer step (``NaNGuard.reason``)."""

    HEALTHY = "healthy"
    AMP_OVERFLOW = "amp_overflow"  # the GradScaler skipped an overflow step; not a divergence
    SKIPPED = "skipped"
    ROLLED_BACK = "rolled_back"
    HALTED = "halted"


class GuardCause(Enum):
    """What triggered an event."""

    NONFINITE_LOSS = "nonfinite_loss"
    NONFINITE_GRAD = "nonfinite_grad"
    NONFINITE_PARAMS = "nonfinite_params"
    LOSS_SPIKE = "loss_spike"
    AMP_SCALE_COLLAPSE = "amp_scale_collapse"
    OTHER_RANK = "other_rank"  # another DDP rank flagged the step; this rank saw nothing wrong


def _check_number(name: str, value: Any, rng: str) -> None:
    if not is_number(value):
        raise TypeError(f"{name} must be a number {rng}, got {type(value).__name__} ({value!r})")


class NaNGuard(Callback):
    r"""Keep a run alive through NaN/inf: skip the bad step, roll back to the last good state with a lower LR, or halt.

    **Detection** at every optimizer step: a non-finite training loss (seen in ``on_before_backward``), a non-finite
    gradient norm (from the shared once-per-step gradient statistics, before any clipping), optionally a loss spike
    (one-sided z-score over the last ``spike_window`` losses), and non-finite parameters after the update (one
    multi-tensor norm over the parameters, ``check_params``). The flags are read with one host transfer per step
    (on the CPU, where reading is free, each is read directly); under DDP they are reduced across ranks (any rank
    flags -> every rank acts).

    **Actions.** A flagged step is always skipped first: every gradient of the optimizer is set to ``None`` before
    the update (zeroing would still move Adam's moments), so parameters and optimizer state stay bit-identical. Then,
    in ``on_train_batch_end`` (after Lightning has stepped the LR scheduler):

    - ``"skip"``: nothing more; the LR schedule keeps following ``global_step`` (as with a GradScaler overflow). More
      than ``max_consecutive_skips`` flagged steps in a row, or non-finite parameters (which no skip can undo),
      escalate to ``escalate_to``.
    - ``"rollback"``: model, optimizers, LR schedulers and the AMP scaler go back to the last good snapshot, and the
      LR is multiplied by ``lr_factor`` in the optimizer *and* in every scheduler constant (``base_lrs``,
      ``initial_lr``, OneCycle bounds, ``eta_min``, plateau ``min_lrs``, ...), so every later LR is ``lr_factor``
      times what the schedule would have produced: the cut survives the scheduler and is not compounded. The
      batches between the snapshot and the fault are not replayed. After ``max_rollbacks`` rollbacks the next fault
      halts.
    - ``"halt"``: stop at once (even below ``min_steps``/``min_epochs``), write a report (JSON and text) and raise
      :class:`~lightning_gradguard.DivergenceError` out of ``trainer.fit`` unless ``raise_on_halt=False``.

    The Trainer's step counter never goes backwards: ``global_step`` and ``max_steps`` count attempted steps, and
    TensorBoard curves stay monotonic.

    **Snapshots.** ``snapshot="memory"``: CPU copies of model, optimizer, scheduler and scaler state, taken after
    every ``snapshot_every_n_steps`` healthy steps (and when training starts); a snapshot is only used once it has
    survived ``snapshot_confirm_steps`` healthy steps; the last two are kept (plus the newest good one). Memory cost:
    about 2 x (model + optimizer state) on the CPU. ``snapshot="checkpoint"``: the newest readable file of the
    Trainer's ``ModelCheckpoint`` callbacks that survived ``snapshot_confirm_steps`` healthy steps, loaded through
    the strategy's checkpoint API; an unreadable or truncated file falls back to an older one.

    **AMP.** With a GradScaler (``16-mixed``), non-finite gradients with a finite loss are an overflow step that the
    scaler already skips: counted as ``amp_overflow_steps``, not a divergence. Only a loss scale falling below
    ``amp_scale_floor`` (or a non-finite loss) is.

    Logged metrics and TensorBoard tags:

    ==============================  ===============================================================================
    ``gradguard/skipped_steps``     steps whose update the guard dropped (all events, including escalated ones)
    ``gradguard/rollbacks``         rollbacks done so far
    ``gradguard/lr_scale``          cumulative LR factor applied by rollbacks (1.0 = untouched)
    ``gradguard/amp_overflow_steps`` overflow steps skipped by the GradScaler (only with a GradScaler)
    ``gradguard/nan_guard_events``  TensorBoard text: one line per event (skip, rollback, halt)
    ==============================  ===============================================================================

    Scalars are written every ``log_every_n_steps`` steps and at every event, at ``global_step`` of the step; the
    progress bar shows ``nan_skips`` and ``nan_rollbacks`` (sent when they change). Each event is also one
    ``logging`` WARNING line (logger ``lightning_gradguard.callbacks.nan_guard``) and a plain dict in :attr:`events`.

    Args:
        action: ``"rollback"``, ``"skip"`` or ``"halt"``.
        lr_factor: LR multiplier applied at each rollback, in (0, 1].
        max_consecutive_skips: with ``action="skip"``, flagged steps allowed in a row before escalating (>= 0).
        escalate_to: ``"rollback"`` or ``"halt"``, what skip escalates to.
        snapshot: ``"memory"`` or ``"checkpoint"``.
        snapshot_every_n_steps: healthy steps between in-memory snapshots (>= 1).
        snapshot_confirm_steps: healthy steps a snapshot must survive before it is trusted (>= 0; default 10).
        max_rollbacks: rollbacks allowed before the guard halts (>= 0).
        check_params: check the parameters for NaN/inf after every update (one multi-tensor norm).
        spike_zscore: z-score above which a loss counts as a spike; ``None`` (default) disables spike detection.
        spike_window: how many recent losses the spike statistics cover (>= 2).
        amp_scale_floor: a GradScaler loss scale below this is a divergence (> 0).
        raise_on_halt: raise :class:`~lightning_gradguard.DivergenceError` out of ``fit`` when halting.
        save_bad_batch: ``torch.save`` the batch(es) of every flagged step into ``report_dir`` (one file per rank).
        report_dir: where reports and bad batches go; default: the Trainer's ``log_dir`` (the logger's directory),
            else ``default_root_dir``.
        log_every_n_steps: scalar logging interval; default: the Trainer's ``log_every_n_steps``.
        history_size: how many recent gradient norms and losses the report shows (>= 1).

    Raises:
        ValueError: for an argument outside its allowed values (in ``__init__``), or, in ``setup``, for
            ``snapshot="checkpoint"`` without a ``ModelCheckpoint`` saving full checkpoints, or a second NaNGuard in
            the same Trainer; when training starts, with anomaly detection on (``Trainer(detect_anomaly=True)``).
        RuntimeError: in ``setup``, for a sharded strategy (FSDP, DeepSpeed).

    Example:
        >>> guard = NaNGuard(action="rollback", lr_factor=0.5, max_rollbacks=3)
        >>> guard.reason
        <GuardDecision.HEALTHY: 'healthy'>
    """

    def __init__(
        self,
        action: str = "rollback",
        lr_factor: float = 0.5,
        max_consecutive_skips: int = 3,
        escalate_to: str = "rollback",
        snapshot: str = "memory",
        snapshot_every_n_steps: int = 50,
        snapshot_confirm_steps: int = 10,
        max_rollbacks: int = 3,
        check_params: bool = True,
        spike_zscore: float | None = None,
        spike_window: int = 100,
        amp_scale_floor: float = 1.0,
        raise_on_halt: bool = True,
        save_bad_batch: bool = False,
        report_dir: str | os.PathLike | None = None,
        log_every_n_steps: int | None = None,
        history_size: int = 50,
    ) -> None:
        super().__init__()
        check_choice("action", action, _ACTIONS)
        check_choice("escalate_to", escalate_to, _ESCALATIONS)
        check_choice("snapshot", snapshot, _SNAPSHOTS)
        _check_number("lr_factor", lr_factor, "in (0, 1]")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be a number in (0, 1], got {lr_factor!r}")
        check_int("max_consecutive_skips", max_consecutive_skips, 0)
        check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1)
        check_int("snapshot_confirm_steps", snapshot_confirm_steps, 0)
        check_int("max_rollbacks", max_rollbacks, 0)
        check_int("spike_window", spike_window, 2)
        check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        check_int("history_size", history_size, 1)
        if spike_zscore is not None:
            _check_number("spike_zscore", spike_zscore, "> 0 (finite) or None")
            if not 0 < spike_zscore < math.inf:
                raise ValueError(f"spike_zscore must be a finite number > 0 or None, got {spike_zscore!r}")
        _check_number("amp_scale_floor", amp_scale_floor, "> 0 (finite)")
        if not 0 < amp_scale_floor < math.inf:  # an infinite floor would call every AMP step a collapse
            raise ValueError(f"amp_scale_floor must be a finite number > 0, got {amp_scale_floor!r}")
        for name, flag in (("check_params", check_params), ("raise_on_halt", raise_on_halt)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if not isinstance(save_bad_batch, bool):
            raise TypeError(f"save_bad_batch must be a bool, got {type(save_bad_batch).__name__}")
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise TypeError(f"report_dir must be a path or None, got {type(report_dir).__name__}")

        self.action = action
        self.lr_factor = float(lr_factor)
        self.max_consecutive_skips = max_consecutive_skips
        self.escalate_to = escalate_to
        self.snapshot = snapshot
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_confirm_steps = snapshot_confirm_steps
        self.max_rollbacks = max_rollbacks
        self.check_params = check_params
        self.spike_zscore = None if spike_zscore is None else float(spike_zscore)
        self.spike_window = spike_window
        self.amp_scale_floor = float(amp_scale_floor)
        self.raise_on_halt = raise_on_halt
        self.save_bad_batch = save_bad_batch
        self.report_dir = None if report_dir is None else str(report_dir)
        self.log_every_n_steps = log_every_n_steps
        self.history_size = history_size

        # public, checkpointed
        self.skipped_steps = 0
        self.rollbacks = 0
        self.consecutive_skips = 0
        self.amp_overflow_steps = 0
        self.lr_scale = 1.0
        self.events: list[dict[str, Any]] = []
        self.reason = GuardDecision.HEALTHY
        self.cause: GuardCause | None = None
        self.halt_error: DivergenceError | None = None
        self.report_path: str | None = None

        self._store = SnapshotStore(capacity=2, confirm_steps=snapshot_confirm_steps)
        self._bar = ProgressBarValues()
        self._spike = LossSpikeDetector(self.spike_zscore, spike_window) if self.spike_zscore is not None else None
        self._grad_history: list[list[float]] = []
        self._loss_history: list[list[float]] = []
        self._since_snapshot = 0
        self._out_dir: Path | None = None
        self._loop_limits: tuple[Any, Any] | None = None
        self._reset_step()

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action, snapshot=self.snapshot)

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "consecutive_skips": self.consecutive_skips,
            "amp_overflow_steps": self.amp_overflow_steps,
            "lr_scale": self.lr_scale,
            "events": [dict(e) for e in self.events],
            "reason": self.reason.value,
            "snapshots": self._store.state_dict(),
            "grad_history": [list(r) for r in self._grad_history],
            "loss_history": [list(r) for r in self._loss_history],
            "spike": self._spike.state_dict() if self._spike is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore counters and the LR scale. The scaled LR itself lives in the optimizer and scheduler state that
        Lightning restores from the same checkpoint, so it is not applied again."""
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.amp_overflow_steps = int(state_dict.get("amp_overflow_steps", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.events = [dict(e) for e in state_dict.get("events", [])]
        try:
            self.reason = GuardDecision(state_dict.get("reason", GuardDecision.HEALTHY.value))
        except ValueError:
            self.reason = GuardDecision.HEALTHY
        self._grad_history = [list(r) for r in state_dict.get("grad_history", [])][-self.history_size :]
        self._loss_history = [list(r) for r in state_dict.get("loss_history", [])][-self.history_size :]
        if self._spike is not None and state_dict.get("spike"):
            self._spike.load_state_dict(state_dict["spike"])

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported_strategy(trainer, "NaNGuard")
        guards = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, NaNGuard)]
        if len(guards) > 1:
            raise ValueError(
                f"Found {len(guards)} NaNGuard callbacks; use one: each would act on the same fault (two rollbacks, "
                "two LR cuts) and their snapshots would disagree."
            )
        if self.snapshot == "checkpoint":
            ckpts = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
            if not ckpts:
                raise ValueError(
                    "NaNGuard(snapshot='checkpoint') rolls back to the newest ModelCheckpoint file, but the Trainer "
                    "has no ModelCheckpoint callback; add one (e.g. ModelCheckpoint(every_n_train_steps=100, "
                    "save_top_k=1)) or use snapshot='memory'"
                )
            if all(cb.save_weights_only for cb in ckpts):
                raise ValueError(
                    "NaNGuard(snapshot='checkpoint') needs full checkpoints (optimizer and scheduler state), but every "
                    "ModelCheckpoint has save_weights_only=True"
                )
        # trainer.log_dir is a collective under DDP: resolve it here, where every rank runs.
        base = self.report_dir or trainer.log_dir or trainer.default_root_dir
        self._out_dir = Path(base)
        self._reset_step()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.is_anomaly_enabled():  # Trainer(detect_anomaly=True) turns it on just around the fit loop
            raise ValueError(
                "NaNGuard cannot act with anomaly detection on (Trainer(detect_anomaly=True) or "
                "torch.autograd.set_detect_anomaly): torch raises at the first NaN in backward, before the guard sees "
                "the step. Remove one of the two."
            )
        # Optimizer and scheduler state (a resumed run's scaled LR included) are restored just before this hook.
        for cfg in trainer.lr_scheduler_configs:
            if not is_known_scheduler(cfg.scheduler):
                rank_zero_warn(
                    f"NaNGuard: {type(cfg.scheduler).__name__} is not a torch.optim.lr_scheduler class; a rollback "
                    "scales its base_lrs/_last_lr and the optimizer's LR, but constants it keeps under other names "
                    "are left alone and may undo the LR cut."
                )
        self._store.reset()
        self._since_snapshot = 0
        self._bar.reset()
        if self.snapshot == "memory" and self.action != "halt":
            snap = self._try_snapshot(trainer, pl_module)
            if snap is not None:
                self._store.update(snap, trusted=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._loop_limits is not None:
            trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = self._loop_limits
            self._loop_limits = None
        self._store.reset()  # free the CPU copies
        self._batches.clear()

    # ------------------------------------------------------------------ per step
    def _reset_step(self) -> None:
        self._loss_bad: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._batches: list[Any] = []
        self._stepped = False
        self._step = 0
        self._pending: dict[str, Any] | None = None
        self._overflow = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self.save_bad_batch:
            self._batches.append(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        scaler = _grad_scaler(trainer)
        if scaler is not None and isinstance(getattr(scaler, "_scale", None), torch.Tensor):
            value = value / scaler._scale.to(value.device)  # type: ignore[union-attr]  # the loss arrives scaled by the GradScaler
        bad = ~torch.isfinite(value)
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        stats = grad_stats_for(trainer, pl_module, optimizer)
        device = stats.device
        loss = self._loss_sum.to(device) if self._loss_sum is not None else torch.tensor(math.nan, device=device)
        # what decides the step, read to the host together (the one transfer of the step)
        probes: dict[int, torch.Tensor] = {_GRAD: stats.all_finite}
        if self._loss_bad is not None:
            probes[_LOSS] = self._loss_bad
        if self._spike is not None and self._loss_sum is not None:
            probes[_SPIKE] = self._spike.update(loss)
        scaler = _grad_scaler(trainer)
        if scaler is not None and isinstance(getattr(scaler, "_scale", None), torch.Tensor):
            scale: torch.Tensor = scaler._scale  # type: ignore[assignment]
            probes[_SCALE] = scale < self.amp_scale_floor
        grad_norm, loss_value, *found = read_scalars([stats.total_norm, loss, *probes.values()], device)
        flags = 0
        for flag, value in zip(probes, found):
            if (flag == _GRAD) != bool(value):  # all_finite is the healthy answer, the others flag a fault
                flags |= flag
        self._loss_bad, self._loss_sum = None, None
        self._record(self._grad_history, step, grad_norm)
        if not math.isnan(loss_value) or flags & _LOSS:
            self._record(self._loss_history, step, loss_value)

        overflow = scaler is not None and bool(flags & _GRAD) and not flags & (_LOSS | _SPIKE | _SCALE)
        local_bad = bool(flags & (_LOSS | _SPIKE | _SCALE)) or (bool(flags & _GRAD) and scaler is None)
        bad = bool(trainer.strategy.reduce_boolean_decision(local_bad, all=False))
        self._stepped = True
        self._step = step
        self._overflow = self._overflow or overflow
        if not bad:
            return
        raw = unwrap_optimizer(optimizer)
        if self._pending is None:
            self._pending = {
                "cause": _cause_of(flags, local_bad),
                "nonfinite_loss": bool(flags & _LOSS),
                "nonfinite_grads": stats.nonfinite_names() if flags & _GRAD else [],
                "loss": loss_value,
                "grad_norm": grad_norm,
                "skipped": True,
            }
        for group in raw.param_groups:
            for p in group["params"]:
                p.grad = None  # a real skip: optimizers leave params without a grad (and their state) alone

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:
            return  # a gradient-accumulation micro-batch: no optimizer step happened
        step, pending, overflow, batches = self._step, self._pending, self._overflow, self._batches
        self._stepped, self._pending, self._overflow, self._batches = False, None, False, []
        if pending is None and self.check_params:
            bad_params = self._nonfinite_params(pl_module, names=False)
            if bool(trainer.strategy.reduce_boolean_decision(bool(bad_params), all=False)):
                pending = {
                    "cause": GuardCause.NONFINITE_PARAMS if bad_params else GuardCause.OTHER_RANK,
                    "nonfinite_loss": False,
                    "nonfinite_grads": [],
                    "skipped": False,
                }
        if pending is None:
            self._healthy_step(trainer, pl_module, step, overflow)
        else:
            self._handle_event(trainer, pl_module, step, pending, batches)
        self._log(trainer, pl_module, step, force=pending is not None)

    # ------------------------------------------------------------------ decisions
    def _healthy_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, overflow: bool) -> None:
        self.consecutive_skips = 0
        if overflow:
            self.amp_overflow_steps += 1
            self.reason = GuardDecision.AMP_OVERFLOW
            return  # the scaler skipped this update: it tests nothing, so it confirms no snapshot
        self.reason = GuardDecision.HEALTHY
        self._store.step_healthy()
        if self.snapshot == "memory" and self.action != "halt":
            self._since_snapshot += 1
            if self._since_snapshot >= self.snapshot_every_n_steps:
                self._since_snapshot = 0
                snap = self._try_snapshot(trainer, pl_module)
                if snap is not None:
                    self._store.update(snap)

    def _handle_event(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, info: dict[str, Any], batches: list[Any]
    ) -> None:
        cause: GuardCause = info["cause"]
        self.cause = cause
        if cause is GuardCause.NONFINITE_PARAMS:
            info["nonfinite_params"] = self._nonfinite_params(pl_module, names=True)
        if info["skipped"]:
            self.skipped_steps += 1  # the update was dropped in on_before_optimizer_step
        if self.save_bad_batch:
            info["bad_batch_path"] = self._save_batches(trainer, step, batches)

        action = self.action
        why = ""
        if action == "skip":
            self.consecutive_skips += 1
            if not info["skipped"] or cause is GuardCause.AMP_SCALE_COLLAPSE:
                action, why = self.escalate_to, f"{cause.value} cannot be undone by skipping"
            elif self.consecutive_skips > self.max_consecutive_skips:
                action = self.escalate_to
                why = (
                    f"{self.consecutive_skips} flagged steps in a row "
                    f"(max_consecutive_skips={self.max_consecutive_skips})"
                )
        if action == "skip":
            self.reason = GuardDecision.SKIPPED
            self._event(trainer, step, "skip", info)
            return
        if action == "rollback":
            if self.rollbacks >= self.max_rollbacks:
                action, why = "halt", f"fault after {self.rollbacks} rollbacks (max_rollbacks={self.max_rollbacks})"
            else:
                failure = self._rollback(trainer, pl_module, info)
                if failure is None:
                    self.rollbacks += 1
                    self.consecutive_skips = 0
                    self.reason = GuardDecision.ROLLED_BACK
                    self._event(trainer, step, "rollback", info)
                    return
                action, why = "halt", failure
        self._halt(trainer, pl_module, step, info, why or f"action='{self.action}'")

    def _rollback(self, trainer: pl.Trainer, pl_module: pl.LightningModule, info: dict[str, Any]) -> str | None:
        """Restore the last good state and cut the LR; returns None on success, else why it could not."""
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        if self.snapshot == "memory":
            snap = self._store.compute()
            if snap is None:
                return "no good snapshot to roll back to"
            extra = restore_snapshot(snap, pl_module, trainer.optimizers, schedulers)
            if "precision" in extra:
                trainer.precision_plugin.load_state_dict(extra["precision"])
            self._store.discard_after(snap)
            snap_scale = float(snap.meta.get("lr_scale", 1.0))
            info["snapshot_step"] = snap.step
        else:
            loaded = self._load_checkpoint_snapshot(trainer, info)
            if isinstance(loaded, str):
                return loaded
            snap_scale = loaded
        new_scale = self.lr_scale * self.lr_factor
        scale_lr(trainer.optimizers, schedulers, new_scale / snap_scale)
        self.lr_scale = new_scale
        self._since_snapshot = 0
        context_for(trainer).cache.invalidate()  # cached statistics describe the discarded state
        return None

    def _load_checkpoint_snapshot(self, trainer: pl.Trainer, info: dict[str, Any]) -> float | str:
        """Load the newest usable ModelCheckpoint file; returns the LR scale it was saved with, or why none works."""
        tried: list[str] = []
        for path in _checkpoint_files(trainer):
            try:
                ckpt = _read_checkpoint(trainer, path)
                ckpt_step = int(ckpt["global_step"])
                if not self._survived(ckpt_step):
                    tried.append(f"{path}: step {ckpt_step} not yet confirmed by {self.snapshot_confirm_steps} steps")
                    continue
                if not _finite_state(ckpt["state_dict"]):
                    tried.append(f"{path}: holds non-finite weights")
                    continue
                trainer.strategy.load_model_state_dict(ckpt)
                trainer.strategy.load_optimizer_state_dict(ckpt)
                for cfg, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
                    cfg.scheduler.load_state_dict(state)
                key = type(trainer.precision_plugin).__qualname__
                if key in ckpt:
                    trainer.precision_plugin.load_state_dict(ckpt[key])
            except Exception as err:  # unreadable, truncated or mismatched file: try an older one
                tried.append(f"{path}: {type(err).__name__}: {err}")
                continue
            info["snapshot_step"] = ckpt_step
            info["snapshot_path"] = str(path)
            saved = ckpt.get("callbacks", {}).get(self.state_key, {})
            return float(saved.get("lr_scale", 1.0))
        listing = "; ".join(tried) if tried else "no checkpoint file has been written yet"
        return f"no usable ModelCheckpoint file to roll back to ({listing})"

    def _survived(self, ckpt_step: int) -> bool:
        """Did the state saved after ``ckpt_step`` steps survive ``snapshot_confirm_steps`` healthy steps?"""
        first_bad = self._step  # the step being handled
        for event in self.events:
            if event["step"] >= ckpt_step:
                first_bad = min(first_bad, event["step"])
                break
        return ckpt_step + self.snapshot_confirm_steps <= first_bad

    def _halt(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, info: dict[str, Any], why: str
    ) -> None:
        cause: GuardCause = info["cause"]
        reason = f"{cause.value.replace('_', ' ')}; {why}"
        self.reason = GuardDecision.HALTED
        info["reason"] = reason
        event = self._event(trainer, step, "halt", info)
        report = DivergenceReport(
            step=step,
            reason=reason,
            cause=cause.value,
            nonfinite_loss=bool(info.get("nonfinite_loss")),
            nonfinite_grads=list(info.get("nonfinite_grads", [])),
            nonfinite_params=list(info.get("nonfinite_params", [])),
            lr=[[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers],
            lr_scale=self.lr_scale,
            counters=self._counters(),
            grad_norm_history=[list(r) for r in self._grad_history],
            loss_history=[list(r) for r in self._loss_history],
            events=[dict(e) for e in self.events],
            extra={
                "epoch": trainer.current_epoch,
                "precision": str(trainer.precision),
                "world_size": trainer.world_size,
                "snapshots": self._store.state_dict()["snapshots"],
            },
        )
        path = None
        if self._out_dir is not None:
            path = str(self._out_dir / "nan_guard_report.json")
            if trainer.is_global_zero:
                report.write(self._out_dir, "nan_guard_report")
        self.report_path = path
        event["report_path"] = path
        self.halt_error = DivergenceError(reason, step=step, report_path=path)
        # should_stop alone waits for min_steps/min_epochs: lift both for the rest of this fit (restored at teardown)
        trainer.should_stop = True
        if self._loop_limits is None:
            self._loop_limits = (trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps)
        trainer.fit_loop.min_epochs = 0
        trainer.fit_loop.epoch_loop.min_steps = None
        if self.raise_on_halt:
            raise self.halt_error

    # ------------------------------------------------------------------ helpers
    def _try_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Snapshot | None:
        """A new snapshot, or None when taking it failed on any rank (the store then keeps its older ones).

        A failed copy (e.g. out of host memory) must not end a run the guard is there to keep alive. Under DDP the
        ranks keep or drop the new snapshot together, so that a later rollback restores the same step everywhere.
        """
        snap, error = None, None
        try:
            snap = self._take_snapshot(trainer, pl_module)
        except Exception as err:
            error = err
        if bool(trainer.strategy.reduce_boolean_decision(error is None, all=True)):
            return snap
        good = self._store.compute()
        keep = f"the snapshot of step {good.step}" if good is not None else "no snapshot (a fault now halts)"
        where = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
        message = f"NaNGuard could not take a snapshot at step {trainer.global_step} ({where}); rollbacks use {keep}"
        if error is not None:
            warnings.warn(message, UserWarning, stacklevel=2)
        else:
            rank_zero_warn(message)
        return None

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        extra = {}
        precision_state = trainer.precision_plugin.state_dict()
        if precision_state:
            extra["precision"] = precision_state
        return take_snapshot(
            pl_module,
            trainer.optimizers,
            [cfg.scheduler for cfg in trainer.lr_scheduler_configs],
            step=trainer.global_step,
            extra=extra,
            meta={"lr_scale": self.lr_scale},
        )

    def _nonfinite_params(self, pl_module: pl.LightningModule, names: bool) -> Any:
        params = list(pl_module.parameters())
        if not params:
            return [] if names else False
        with torch.no_grad():
            norms = norms_of(params, 2.0)
            if not names:
                return not bool(torch.isfinite(norms).all())
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        labels = [n for n, _ in pl_module.named_parameters()]
        return [labels[i] for i in bad]

    def _record(self, history: list[list[float]], step: int, value: float) -> None:
        history.append([step, value])
        if len(history) > self.history_size:
            del history[0]

    def _counters(self) -> dict[str, int]:
        return {
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "consecutive_skips": self.consecutive_skips,
            "amp_overflow_steps": self.amp_overflow_steps,
        }

    def _event(self, trainer: pl.Trainer, step: int, kind: str, info: dict[str, Any]) -> dict[str, Any]:
        cause: GuardCause = info["cause"]
        event: dict[str, Any] = {"step": step, "kind": kind, "cause": cause.value, "lr_scale": self.lr_scale}
        for key in ("loss", "grad_norm", "snapshot_step", "snapshot_path", "bad_batch_path", "reason"):
            if info.get(key) is not None:
                event[key] = info[key]
        for key in ("nonfinite_grads", "nonfinite_params"):
            if info.get(key):
                event[key] = list(info[key][:20])
        self.events.append(event)
        line = _event_line(event)
        if trainer.is_global_zero:
            log.warning(line)
        log_text(trainer, tag("nan_guard_events"), line, step)
        return event

    def _save_batches(self, trainer: pl.Trainer, step: int, batches: list[Any]) -> str | None:
        if self._out_dir is None:
            return None
        self._out_dir.mkdir(parents=True, exist_ok=True)
        path = self._out_dir / f"nan_guard_bad_batch_step{step}_rank{trainer.global_rank}.pt"
        payload = {
            "step": step,
            "epoch": trainer.current_epoch,
            "rank": trainer.global_rank,
            "batches": [move_data_to_device(b, "cpu") for b in batches],
        }
        torch.save(payload, path)
        return str(path)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, force: bool) -> None:
        every = self.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50)), 1)
        if force or step % every == 0:
            metrics = {
                tag("skipped_steps"): self.skipped_steps,
                tag("rollbacks"): self.rollbacks,
                tag("lr_scale"): self.lr_scale,
            }
            if _grad_scaler(trainer) is not None:
                metrics[tag("amp_overflow_steps")] = self.amp_overflow_steps
            log_scalars(trainer, metrics, step)
        # sent when they change, not every step (Lightning keeps the last value shown)
        self._bar.show_changed(trainer, pl_module, "nan_skips", float(self.skipped_steps), step)
        self._bar.show_changed(trainer, pl_module, "nan_rollbacks", float(self.rollbacks), step)


def _grad_scaler(trainer: pl.Trainer) -> GradScaler | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _cause_of(flags: int, local_bad: bool) -> GuardCause:
    if not local_bad:
        return GuardCause.OTHER_RANK
    if flags & _LOSS:
        return GuardCause.NONFINITE_LOSS
    if flags & _SCALE:
        return GuardCause.AMP_SCALE_COLLAPSE
    if flags & _GRAD:
        return GuardCause.NONFINITE_GRAD
    return GuardCause.LOSS_SPIKE


def _event_line(event: dict[str, Any]) -> str:
    parts = [f"NaNGuard {event['kind']} at step {event['step']}: {event['cause'].replace('_', ' ')}"]
    if "snapshot_step" in event:
        parts.append(f"restored state of step {event['snapshot_step']}")
    parts.append(f"lr_scale={event['lr_scale']:.6g}")
    if event.get("nonfinite_grads"):
        parts.append("first non-finite grads: " + ", ".join(event["nonfinite_grads"][:3]))
    if event.get("nonfinite_params"):
        parts.append("non-finite params: " + ", ".join(event["nonfinite_params"][:3]))
    if event.get("reason"):
        parts.append(str(event["reason"]))
    if event.get("report_path"):
        parts.append(f"report: {event['report_path']}")
    return "; ".join(parts)


def _checkpoint_files(trainer: pl.Trainer) -> list[Path]:
    """Files written by the Trainer's ModelCheckpoint callbacks, newest first."""
    seen: dict[str, Path] = {}
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        candidates = [cb.last_model_path, cb.best_model_path, *cb.best_k_models.keys()]
        if cb.dirpath and os.path.isdir(cb.dirpath):
            candidates += [str(p) for p in Path(cb.dirpath).glob(f"*{cb.FILE_EXTENSION}")]
        for c in candidates:
            if c and os.path.isfile(c):
                seen.setdefault(os.path.realpath(c), Path(c))
    return sorted(seen.values(), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _read_checkpoint(trainer: pl.Trainer, path: Path) -> dict[str, Any]:
    try:
        return trainer.strategy.load_checkpoint(path)
    except Exception as err:
        if "weights_only" not in str(err).lower() and "Unpickl" not in type(err).__name__:
            raise
        # a file this run wrote, holding non-tensor callback state: trusted, so allow full unpickling
        return trainer.strategy.load_checkpoint(path, weights_only=False)


def _finite_state(state: dict[str, Any]) -> bool:
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return not tensors or bool(torch.isfinite(norms_of(tensors, 2.0)).all())
