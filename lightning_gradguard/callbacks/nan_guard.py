"""NaNGuard: on NaN/inf or a diverging run, skip the step, roll back with a lower LR, or halt with a diagnosis."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradguard.callbacks import checkpoint_snapshots as ckpts
from lightning_gradguard.callbacks.guard_steps import GuardSteps
from lightning_gradguard.callbacks.log_writer import ProgressBarValues
from lightning_gradguard.callbacks.strategy_support import check_supported_strategy
from lightning_gradguard.core._arg_checks import check_bool, check_choice, check_int, check_number
from lightning_gradguard.core.guard._policy import POLICIES, GuardCause, GuardDecision, GuardPolicy
from lightning_gradguard.core.recover._lr_scaling import is_known_scheduler
from lightning_gradguard.errors import DivergenceError

__all__ = ["GuardCause", "GuardDecision", "NaNGuard"]

log = logging.getLogger(__name__)
_OWNER = "NaNGuard"


class NaNGuard(Callback):
    r"""Keep a run alive and useful through NaN/inf and finite divergence.

    **Detection**, read with one host transfer and reduced across ranks once per optimizer step: a non-finite loss
    or gradient (the shared pre-clip gradient statistics), finite divergence (the loss or gradient norm leaving its
    healthy range by orders of magnitude, ``divergence=True``), an optional loss z-score spike, an AMP loss scale
    below ``amp_scale_floor``. Non-finite *weights* show in the next step's loss and gradients; they are named on
    the fault path, checked before every snapshot is trusted, and at the end of the fit (no per-step pass over the
    weights). **Stability** (``stability=True``, ``core/guard/_stability``): a model worse than untrained (or killed at
    the start) restarts from the untrained state with a lower LR; a climbing loss, a rising gradient norm or
    sustained clipping without progress lower the LR; each with an event saying why.

    **Actions** (``action``): ``"auto"`` skips a fault traced to the batch (bad inputs, or healthy steps before it;
    buffers restored, LR kept) and rolls back with an LR cut for faults after an unsettled stretch, damaged
    weights/buffers and divergence; ``"skip"``, ``"rollback"`` and
    ``"halt"`` do just that (skip escalates on damage or after ``max_consecutive_skips``). A skipped step has every
    gradient set to None before the update and the model's buffers restored, so weights, buffers and optimizer state
    stay bit-identical. A rollback restores model, optimizers, schedulers and AMP scaler from the newest trusted
    snapshot and multiplies the LR by ``lr_factor`` everywhere a scheduler keeps it. After ``max_rollbacks`` the
    guard halts: report files (JSON, text) and :class:`~lightning_gradguard.DivergenceError`.

    ==============================  ===========================================================================
    ``gradguard/skipped_steps``     steps whose update the guard dropped
    ``gradguard/rollbacks``         rollbacks so far
    ``gradguard/lr_scale``          cumulative LR factor (rollbacks and stability cuts)
    ``gradguard/flagged_steps``     flagged steps since the last write
    ``gradguard/loss_max``          largest loss since the last write
    ``gradguard/amp_overflow_steps`` GradScaler overflow steps (only with a GradScaler)
    ``gradguard/nan_guard_events``  TensorBoard text, one line per event
    ==============================  ===========================================================================

    Args:
        action: ``"auto"``, ``"rollback"``, ``"skip"`` or ``"halt"``.
        lr_factor: LR multiplier per rollback or stability cut, in (0, 1].
        max_consecutive_skips: ``skip``: flagged steps in a row before escalating (>= 0).
        escalate_to: ``"rollback"`` or ``"halt"``.
        snapshot: ``"memory"`` (CPU copies) or ``"checkpoint"`` (this fit's ModelCheckpoint files).
        snapshot_every_n_steps: healthy steps between memory snapshots (>= 1).
        snapshot_confirm_steps: healthy steps a snapshot must survive before it is trusted (>= 0).
        max_rollbacks: rollbacks allowed before halting (>= 0).
        check_params: check the weights before trusting a snapshot, on faults and at fit end.
        divergence: treat finite divergence of the loss or gradient norm as a fault.
        stability: lower the LR (or restart from the untrained state) when it looks too high.
        spike_zscore, spike_window: optional loss z-score test (None: off).
        amp_scale_floor: a GradScaler loss scale below this is a divergence (> 0).
        raise_on_halt, save_bad_batch, report_dir, history_size: halting and the report.
        log_every_n_steps: scalar logging interval (default: the Trainer's).

    Raises:
        TypeError, ValueError: a bad argument (at construction); at ``setup``, ``snapshot="checkpoint"`` without a
            full-state ModelCheckpoint, or a second NaNGuard.

    Example:
        >>> guard = NaNGuard(action="auto", lr_factor=0.5, max_rollbacks=3)
        >>> guard.reason
        <GuardDecision.HEALTHY: 'healthy'>
    """

    # set through check_bool in __init__ (one loop over the flags)
    check_params: bool
    divergence: bool
    stability: bool
    raise_on_halt: bool
    save_bad_batch: bool

    def __init__(
        self,
        action: str = "auto",
        lr_factor: float = 0.5,
        max_consecutive_skips: int = 3,
        escalate_to: str = "rollback",
        snapshot: str = "memory",
        snapshot_every_n_steps: int = 50,
        snapshot_confirm_steps: int = 10,
        max_rollbacks: int = 3,
        check_params: bool = True,
        divergence: bool = True,
        stability: bool = True,
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
        self.action = check_choice("action", action, POLICIES, owner=_OWNER)
        self.escalate_to = check_choice("escalate_to", escalate_to, ("rollback", "halt"), owner=_OWNER)
        self.snapshot = check_choice("snapshot", snapshot, ("memory", "checkpoint"), owner=_OWNER)
        lr_checked = check_number("lr_factor", lr_factor, low=0.0, high=1.0, low_open=True, owner=_OWNER)
        self.lr_factor = cast(float, lr_checked)
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, 0, owner=_OWNER)
        self.snapshot_every_n_steps = check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1, owner=_OWNER)
        self.snapshot_confirm_steps = check_int("snapshot_confirm_steps", snapshot_confirm_steps, 0, owner=_OWNER)
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, 0, owner=_OWNER)
        self.spike_window = check_int("spike_window", spike_window, 2, high=10**6, owner=_OWNER)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, True, owner=_OWNER)
        self.history_size = check_int("history_size", history_size, 1, high=10**6, owner=_OWNER)
        finite_pos: dict[str, Any] = {"low": 0.0, "low_open": True, "high_open": True, "owner": _OWNER}
        self.spike_zscore = check_number(
            "spike_zscore", spike_zscore, allow_none=True, describe="a finite number > 0", **finite_pos
        )
        self.amp_scale_floor = cast(
            float, check_number("amp_scale_floor", amp_scale_floor, describe="a finite number > 0", **finite_pos)
        )
        for name in ("check_params", "divergence", "stability", "raise_on_halt", "save_bad_batch"):
            setattr(self, name, check_bool(name, locals()[name], owner=_OWNER))
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise TypeError(f"{_OWNER}: report_dir must be a path or None, got {type(report_dir).__name__}")
        self.report_dir = None if report_dir is None else str(report_dir)

        self.policy = GuardPolicy(action, max_consecutive_skips, escalate_to, max_rollbacks)
        self.skipped_steps = 0
        self.amp_overflow_steps = 0
        self.lr_scale = 1.0
        self.events: list[dict[str, Any]] = []
        self.reason = GuardDecision.HEALTHY
        self.cause: GuardCause | None = None
        self.halt_error: DivergenceError | None = None
        self.report_path: str | None = None
        self.files = ckpts.CheckpointSnapshots()
        self.steps = GuardSteps(self)
        self._bar = ProgressBarValues()
        self._out_dir: Path | None = None

    # ------------------------------------------------------------------ counters kept by the policy
    @property
    def rollbacks(self) -> int:
        return self.policy.rollbacks

    @rollbacks.setter
    def rollbacks(self, value: int) -> None:
        self.policy.rollbacks = int(value)

    @property
    def consecutive_skips(self) -> int:
        return self.policy.consecutive_skips

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # distinct per configuration only so that two guards in one Trainer reach our own refusal in setup; the
        # state itself is found by class on resume (on_load_checkpoint), so changed arguments keep it
        args = (self.action, self.snapshot)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != args:  # Lightning reads state_key on every hook: build it once
            cached = self._state_key_cache = (args, self._generate_state_key(action=args[0], snapshot=args[1]))
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.files.run_id,
            "skipped_steps": self.skipped_steps,
            "amp_overflow_steps": self.amp_overflow_steps,
            "lr_scale": self.lr_scale,
            "events": [dict(e) for e in self.events],
            "reason": self.reason.value,
            "policy": self.policy.state_dict(),
            **self.steps.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Counters, events and detector state; the scaled LR itself comes back with the optimizer/scheduler
        state that Lightning restores from the same checkpoint (checked against ``lr_scale`` in on_train_start)."""
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.amp_overflow_steps = int(state_dict.get("amp_overflow_steps", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.events = [dict(e) for e in state_dict.get("events", [])]
        self.policy.load_state_dict(state_dict.get("policy", state_dict))
        values = {d.value for d in GuardDecision}
        self.reason = GuardDecision(
            state_dict.get("reason", "healthy") if state_dict.get("reason") in values else "healthy"
        )
        self.steps.load_state_dict(state_dict)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("callbacks", {})
        if self.state_key not in saved:  # saved by a guard with other arguments: its state still applies
            state = ckpts.guard_state_in(checkpoint)
            if state:
                self.load_state_dict(state)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported_strategy(trainer, _OWNER)
        guards = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, NaNGuard)]
        if len(guards) > 1:
            raise ValueError(
                f"Found {len(guards)} NaNGuard callbacks; use one: each would act on the same fault (two rollbacks, "
                "two LR cuts) and their snapshots would disagree."
            )
        if self.snapshot == "checkpoint":
            ckpts.check_checkpointing(trainer, self.snapshot_confirm_steps)
        self.files.start(trainer)
        # trainer.log_dir is a collective under DDP: resolve it here, where every rank runs.
        self._out_dir = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.is_anomaly_enabled():  # Trainer(detect_anomaly=True) turns it on just around the fit loop
            raise ValueError(
                "NaNGuard cannot act with anomaly detection on (Trainer(detect_anomaly=True) or "
                "torch.autograd.set_detect_anomaly): torch raises at the first NaN in backward, before the guard sees "
                "the step. Remove one of the two."
            )
        for cfg in trainer.lr_scheduler_configs:
            if not is_known_scheduler(cfg.scheduler):
                rank_zero_warn(
                    f"NaNGuard: {type(cfg.scheduler).__name__} is not a torch.optim.lr_scheduler class; an LR cut "
                    "scales its base_lrs/_last_lr and the optimizer's LR, but constants it keeps under other names "
                    "are left alone and may undo the cut."
                )
        self._bar.reset()
        self.steps.start(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.steps.stop(trainer)

    # ------------------------------------------------------------------ hooks: all per-step work is in GuardSteps
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self.steps.batch_start(pl_module, batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.steps.loss(trainer, loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.steps.check(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps.batch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps.fit_end(trainer, pl_module)
        self.steps.write_scalars(trainer, trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.steps.write_scalars(trainer, trainer.global_step)
