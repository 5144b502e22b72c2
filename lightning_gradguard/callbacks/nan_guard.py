"""NaNGuard: on NaN/inf or a diverging run, skip the step, roll back with a lower LR, or halt with a diagnosis."""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_gradguard.callbacks import _checkpoint_snapshots as ckpts
from lightning_gradguard.callbacks._log_writer import ProgressBarValues
from lightning_gradguard.callbacks._step_context import (
    grad_stats_for,
    log_due,
    ride_with_measurement,
    step_record,
)
from lightning_gradguard.callbacks._strategy_support import check_supported_strategy
from lightning_gradguard.callbacks._trainer_host import TrainerHost
from lightning_gradguard.core.engine import EngineField, GuardEngine, check_guard_options
from lightning_gradguard.core.engine._options import OPTION_NAMES
from lightning_gradguard.core.guard import GuardCause, GuardDecision
from lightning_gradguard.core.recover._lr_scaling import is_known_scheduler
from lightning_gradguard.core.recover._lr_watch import LrWatch, keep_cut
from lightning_gradguard.core.recover._snapshot import check_snapshot_covers

__all__ = ["GuardCause", "GuardDecision", "NaNGuard"]

_OWNER = "NaNGuard"
# the progress bar's counters: (event kind, name in the bar); warnings and LR raises are event lines only
_BAR_COUNTERS = (("skip", "skips"), ("rollback", "rollbacks"), ("lower_lr", "lr_cuts"), ("halt", "halts"))


#: why anomaly detection and the guard exclude each other
_ANOMALY = (
    "NaNGuard cannot act with anomaly detection on (Trainer(detect_anomaly=True) or "
    "torch.autograd.set_detect_anomaly): torch raises at the first NaN in backward, before the guard sees "
    "the step. Remove one of the two."
)


def _clip_nothing_without_gradients(trainer: pl.Trainer) -> Callable[[], None] | None:
    """Make ``Trainer(gradient_clip_val=...)`` clip nothing on a step the guard dropped; returns the undo (None
    when the Trainer does not clip).

    The guard drops a step's update by setting every gradient of its optimizer to None in
    ``on_before_optimizer_step``, and Lightning clips after that hook. Norm clipping of no gradient is a no-op, but
    ``torch.nn.utils.clip_grad_value_`` raises on an empty list of gradients (``gradient_clip_algorithm="value"``
    ended the fit at the first skipped step). The precision plugin's ``clip_gradients`` is wrapped, on this
    Trainer's plugin only and for the fit, to return when none of the optimizer's parameters has a gradient."""
    if not getattr(trainer, "gradient_clip_val", None):
        return None
    plugin = getattr(trainer, "precision_plugin", None)
    clip = getattr(plugin, "clip_gradients", None)
    if plugin is None or clip is None or "clip_gradients" in vars(plugin):
        return None

    @functools.wraps(clip)
    def clip_gradients(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        groups = getattr(optimizer, "param_groups", None)
        if groups is not None and all(p.grad is None for g in groups for p in g["params"]):
            return None
        return clip(optimizer, *args, **kwargs)

    plugin.clip_gradients = clip_gradients

    def undo() -> None:
        if vars(plugin).get("clip_gradients") is clip_gradients:
            del plugin.clip_gradients

    return undo


class NaNGuard(Callback):
    r"""Keep a run alive and useful through NaN/inf and finite divergence.

    **Detection**, read with one host transfer and reduced across ranks once per optimizer step: a non-finite loss
    or gradient (the shared pre-clip gradient statistics), finite divergence (the loss or gradient norm leaving its
    healthy range by orders of magnitude, ``divergence=True``), an optional loss z-score spike, an AMP loss scale
    below ``amp_scale_floor``. Non-finite *weights* show in the next step's loss and gradients; they are named on
    the fault path, checked before every snapshot is trusted, and at the end of the fit (no per-step pass over the
    weights). **Stability** (``stability=True``, ``core/guard/_stability``): a model blown up in its first updates
    and left worse than untrained (or killed at the start) restarts from the untrained state with a lower LR; a loss
    that climbs while the LR grew is cut from before the climb. Weaker evidence (a climb at a constant LR, a rising
    norm, sustained clipping, a dead network) only warns (``kind="warn"``); each event says why, with the numbers.

    **Actions** (``action``): ``"auto"`` skips a fault traced to the batch (bad inputs, or healthy steps before it;
    buffers restored, LR kept) and rolls back for faults after an unsettled stretch, damaged weights/buffers and
    divergence (with an LR cut, except for an isolated state fault after healthy steps); ``"skip"``, ``"rollback"`` and
    ``"halt"`` do just that (skip escalates on damage or after ``max_consecutive_skips``). A skipped step has every
    gradient set to None before the update and the model's buffers restored, so weights, buffers and optimizer state
    stay bit-identical. A rollback restores model, optimizers, schedulers and AMP scaler from the newest trusted
    snapshot and multiplies the LR by ``lr_factor`` everywhere a scheduler keeps it. After ``max_rollbacks`` the
    guard halts: report files (JSON, text) and :class:`~lightning_gradguard.DivergenceError`.

    | Key | What it holds |
    |---|---|
    | ``gradguard/skipped_steps`` | updates the guard dropped: its skips, and the faulty step of each rollback or halt |
    | ``gradguard/rollbacks`` | rollbacks in the budget now (refilled after sustained healthy steps) |
    | ``gradguard/warnings`` | warnings so far (weaker evidence: recorded, nothing changed) |
    | ``gradguard/lr_scale`` | cumulative LR factor (rollbacks and stability cuts) |
    | ``gradguard/flagged_steps`` | flagged steps since the last write |
    | ``gradguard/loss_max`` | largest loss since the last write |
    | ``gradguard/amp_overflow_steps`` | GradScaler overflow steps (only with a GradScaler) |
    | ``gradguard/nan_guard_events`` | TensorBoard text, one line per event |
    | ``gradguard/overview`` | TensorBoard image (Images tab): norm vs threshold, loss, LR, clipped share, events |

    At every event, at a halt, on an exception and at the end of the fit, every gradguard scalar (those of the
    monitor and the clipper too) is written again at that step with its last value, the LR and the step's norm as
    they are then, so no chart ends before the run did; and the overview figure
    (:mod:`lightning_gradguard.overview`) is drawn: one picture that TensorBoard's smoothing cannot flatten.

    The progress bar (when the Trainer has one) counts the guard's actions by kind: ``skips``, ``rollbacks``,
    ``lr_cuts`` and ``halts``, each from its first event on. Every event counts once, under its own kind: a rollback
    is not also a skip.

    Args:
        action: ``"auto"``, ``"rollback"``, ``"skip"`` or ``"halt"``.
        lr_factor: LR multiplier per rollback or stability cut, in (0, 1].
        max_consecutive_skips: ``skip``: flagged steps in a row before escalating (>= 0).
        escalate_to: ``"rollback"`` or ``"halt"``.
        snapshot: where a rollback's state comes from: ``"memory"`` (host copies taken every
            ``snapshot_every_n_steps``; under DDP split over the ranks, see ``shard_snapshots``), ``"checkpoint"``
            (this fit's ModelCheckpoint files, or distributed checkpoint directories under ModelParallelStrategy),
            or ``"auto"`` (the default): memory while the snapshots this rank keeps (up to three) fit in
            ``snapshot_budget_mb``, this fit's checkpoints once they would not (decided before each copy, the same
            on every rank, said in a warning with the sizes).
        snapshot_every_n_steps: healthy steps between memory snapshots (>= 1).
        snapshot_confirm_steps: healthy steps a snapshot must survive before it is trusted (>= 0).
        max_rollbacks: rollbacks allowed before halting (>= 0).
        check_params: check the weights before trusting a snapshot, on faults and at fit end.
        divergence: treat finite divergence of the loss or gradient norm as a fault.
        stability: lower the LR (or restart from the untrained state) when it looks too high.
        spike_zscore, spike_window: optional loss z-score test (None: off).
        amp_scale_floor: a GradScaler loss scale below this is a collapse (> 0; default 2**-24, the smallest fp16
            subnormal: below it every scaled gradient underflows; a scale below 1 is healthy for a sum-reduced loss).
        amp_max_halvings: GradScaler overflow steps in a row (each halves the scale and skips the update) that make
            a collapse too (the OPT-175B logbook's scale "grinding to a halt"): rolled back with an LR cut, the event
            saying the loss scale collapsed. Default 24: a scale that fell 2**24-fold without one update going
            through (a healthy run's first calibration takes a handful); None: only ``amp_scale_floor``.
        raise_on_halt, save_bad_batch, report_dir, history_size: halting and the report.
        log_every_n_steps: scalar logging interval (default: the Trainer's).
        min_lr_scale: the LR floor, as a fraction of the user's schedule: no cut goes below it; at the floor a
            stability finding only warns (in (0, 1]).
        lr_recovery_steps: healthy steps after which one LR cut is undone (the LR climbs back toward the user's
            schedule; the period doubles each time a raised LR needs cutting again; None: never).
        rollback_refill_steps: healthy steps in a row that give one rollback back to the ``max_rollbacks`` budget
            (None: the budget counts over the whole run). The default, 100, is the window within which a second
            fault counts as a repeat: a rollback followed by that many healthy steps was an isolated one.
        rerun: on a non-finite step, recompute it (the same batch and random numbers, through ``training_step``
            under the precision plugin's autocast) from the same state and, if the fault reproduces, from the newest
            trusted snapshot, and say what it was: *transient* (it did not reproduce: skipped, LR kept), *data* (the
            batch held NaN/inf, or fails from the trusted state too: skipped, LR kept), *state* (it fails only from
            the current state: rolled back) or *reproducible* (no trusted snapshot to tell). The diagnosis and the
            numbers compared are in the event. It costs nothing on healthy steps (the random-number state is kept
            per step, a few kilobytes) and one to two extra forward/backward passes on a fault. Runs under automatic
            and manual optimization (optimizer steps, ``zero_grad`` and scheduler steps do nothing during a rerun),
            DDP and FSDP2 (there every rank reruns together, forward only: a fault seen only in the gradients gets
            no diagnosis); not with cross-process SyncBatchNorm (there the other diagnoses stand).
        bad_batch_window: every batch found at fault (it held NaN/inf, or the rerun diagnosis says *data*; never
            the batch of a transient or state fault) goes on the bad-batch record (:attr:`bad_batches`; JSON lines
            in the log directory, ``gradguard_bad_batches.jsonl``; kept in checkpoints) and is skipped when met
            again (after a resume, or in a later epoch of a loader that does not shuffle: the same batch index and
            the same contents). A rollback also skips the ``bad_batch_window`` batches that follow the fault in its
            epoch (PaLM's recipe; 0, the default: none).
        shard_snapshots: under DDP (every rank holds the same replica), each rank keeps only its 1/world part of
            each in-memory snapshot and a rollback gathers the whole state back (one broadcast per rank, only then);
            False: a whole copy on every rank. No effect on one process or under FSDP2 (already sharded).
        snapshot_budget_mb: host memory this rank's in-memory snapshots may take under ``snapshot="auto"`` (None:
            a quarter of the machine's physical memory divided by the training processes on it).

    All the per-step work is the guard engine's (:class:`~lightning_gradguard.core.engine.GuardEngine`, shared with
    ``GradGuard`` and ``FabricGradGuard``); this callback turns Trainer hooks into its calls.

    Raises:
        TypeError, ValueError: a bad argument (at construction); at ``setup``, ``snapshot="checkpoint"`` without a
            full-state ModelCheckpoint, or a second NaNGuard.

    Example:
        >>> guard = NaNGuard(action="auto", lr_factor=0.5, max_rollbacks=3)
        >>> guard.reason
        <GuardDecision.HEALTHY: 'healthy'>
    """

    # the checked options (core/engine/_options.py) and the engine's counters, read and written where they live
    action = EngineField(options=True)
    lr_factor = EngineField(options=True)
    max_consecutive_skips = EngineField(options=True)
    escalate_to = EngineField(options=True)
    snapshot = EngineField(options=True)
    snapshot_every_n_steps = EngineField(options=True)
    snapshot_confirm_steps = EngineField(options=True)
    max_rollbacks = EngineField(options=True)
    check_params = EngineField(options=True)
    divergence = EngineField(options=True)
    stability = EngineField(options=True)
    spike_zscore = EngineField(options=True)
    spike_window = EngineField(options=True)
    amp_scale_floor = EngineField(options=True)
    amp_max_halvings = EngineField(options=True)
    raise_on_halt = EngineField(options=True)
    save_bad_batch = EngineField(options=True)
    report_dir = EngineField(options=True)
    log_every_n_steps = EngineField(options=True)
    history_size = EngineField(options=True)
    min_lr_scale = EngineField(options=True)
    lr_recovery_steps = EngineField(options=True)
    rollback_refill_steps = EngineField(options=True)
    rerun = EngineField(options=True)
    bad_batch_window = EngineField(options=True)
    shard_snapshots = EngineField(options=True)
    snapshot_budget_mb = EngineField(options=True)
    snapshot_source = EngineField()
    warnings = EngineField()
    policy = EngineField()
    skipped_steps = EngineField()
    amp_overflow_steps = EngineField()
    lr_scale = EngineField()
    events = EngineField()
    reason = EngineField("outcome")
    cause = EngineField()
    spike_score = EngineField()
    spike_scores = EngineField()
    bad_batches = EngineField()
    halt_error = EngineField()
    report_path = EngineField()
    rollbacks = EngineField()
    consecutive_skips = EngineField()

    def __init__(
        self,
        action: str = "auto",
        lr_factor: float = 0.5,
        max_consecutive_skips: int = 3,
        escalate_to: str = "rollback",
        snapshot: str = "auto",
        snapshot_every_n_steps: int = 50,
        snapshot_confirm_steps: int = 10,
        max_rollbacks: int = 3,
        check_params: bool = True,
        divergence: bool = True,
        stability: bool = True,
        spike_zscore: float | None = None,
        spike_window: int = 100,
        amp_scale_floor: float = 2.0**-24,
        amp_max_halvings: int | None = 24,
        raise_on_halt: bool = True,
        save_bad_batch: bool = False,
        report_dir: str | os.PathLike | None = None,
        log_every_n_steps: int | None = None,
        history_size: int = 50,
        min_lr_scale: float = 1e-3,
        lr_recovery_steps: int | None = 1000,
        rollback_refill_steps: int | None = 100,
        rerun: bool = True,
        bad_batch_window: int = 0,
        shard_snapshots: bool = True,
        snapshot_budget_mb: float | None = None,
    ) -> None:
        super().__init__()
        args = locals()
        options = check_guard_options(_OWNER, "nan_guard_report", **{k: args[k] for k in OPTION_NAMES})
        self.engine = GuardEngine(options)
        self.files = ckpts.CheckpointSnapshots()
        self._host: TrainerHost | None = None
        self._unwrap_clip: Callable[[], None] | None = None  # undoes the wrap of Lightning's clipping (fit only)
        self._bar = ProgressBarValues()
        self._bar_events = 0
        self._out_dir: Path | None = None
        self._loss: torch.Tensor | None = None
        self._stepped = False
        self._judged: tuple[int, Any] = (-1, None)  # the step and optimizer judged last (closure re-evaluations)
        self._record: Any = None
        self._lr_watch: LrWatch | None = None  # the LRs as the guard left them, while a cut is in force
        self._lr_told = False

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # distinct per configuration only so that two guards in one Trainer reach our own refusal in setup; the
        # state itself is found by class on resume (on_load_checkpoint), so changed arguments keep it
        options = self.__dict__["engine"].options  # the fields themselves: Lightning reads this on every hook
        args = (options.action, options.snapshot)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != args:  # Lightning reads state_key on every hook: build it once
            cached = self._state_key_cache = (args, self._generate_state_key(action=args[0], snapshot=args[1]))
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.files.run_id, **self.engine.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Counters, events and detector state; the scaled LR itself comes back with the optimizer/scheduler
        state that Lightning restores from the same checkpoint (checked against ``lr_scale`` in on_train_start)."""
        self.engine.load_state_dict(state_dict)

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
        if getattr(trainer, "_detect_anomaly", False):  # refused before any work (on_train_start checks again)
            raise ValueError(_ANOMALY)
        if self.snapshot == "checkpoint":
            ckpts.check_checkpointing(trainer, self.snapshot_confirm_steps)
        self.files.start(trainer)
        # trainer.log_dir is a collective under DDP: resolve it here, where every rank runs.
        self._out_dir = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.is_anomaly_enabled():  # Trainer(detect_anomaly=True) turns it on just around the fit loop
            raise ValueError(_ANOMALY)
        check_snapshot_covers(pl_module, trainer.optimizers, _OWNER)
        for cfg in trainer.lr_scheduler_configs:
            if not is_known_scheduler(cfg.scheduler):
                rank_zero_warn(
                    f"NaNGuard: {type(cfg.scheduler).__name__} is not a torch.optim.lr_scheduler class; an LR cut "
                    "scales its base_lrs/_last_lr and the optimizer's LR, but constants it keeps under other names "
                    "are left alone and may undo the cut."
                )
        self._bar.reset()
        self._bar_events = 0  # events counted into the progress bar (Lightning cleared the bar's values)
        self._loss, self._stepped, self._record = None, False, None
        self._lr_watch, self._lr_told = None, False
        self._host = TrainerHost(trainer, pl_module, self.files, self._out_dir)
        self.engine.configure(self.engine.options)
        self.engine.start(self._host, trainer.global_step)
        self.files.inf_by_design = self.engine.inf_by_design
        if trainer.world_size > 1:  # sharded: the judge's values travel with the measurement (one collective)
            ride_with_measurement(trainer, self._rider)
        self._unwrap_clip = _clip_nothing_without_gradients(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._host is not None:
            self._host.restore_limits()
            self._host = None
            ride_with_measurement(trainer, None)
        unwrap, self._unwrap_clip = self._unwrap_clip, None
        if unwrap is not None:
            unwrap()
        self.engine.stop()

    def _rider(self, optimizer: Any, norm_type: float, step: int) -> Any:
        """The values the judge will reduce at this step, for the measurement it will read (the L2 one)."""
        if norm_type != 2.0 or self._host is None:
            return None
        return self.engine.rider(self._loss)

    # ------------------------------------------------------------------ per step: the engine's calls
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        engine = self.engine
        first = not engine._window_open
        engine.open_window(pl_module)  # first micro-batch of an optimizer step: buffers as they were
        if first and engine.lr_scale != 1.0:
            # the LRs as the step starts (the schedulers stepped, the engine's ceiling clamped): what training_step
            # writes into them from here is found and re-cut (_keep_lr_cut)
            self._lr_watch = LrWatch(list(trainer.optimizers), [c.scheduler for c in trainer.lr_scheduler_configs])
        engine.add_batch(batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach()
        if value.dtype is not torch.float32:
            value = value.float()
        scaler = self._host.scaler() if self._host is not None else None
        if scaler is not None and isinstance(getattr(scaler, "_scale", None), torch.Tensor):
            value = value / scaler._scale.to(value.device)  # the loss arrives scaled by the GradScaler
        self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Judge the step before its update: one stack of scalars, one reduce (DDP; under FSDP2 the values travelled
        with the measurement's collective), one host read.

        An optimizer that evaluates its closure several times in one step (``LBFGS``: its iterations and line search
        call ``training_step`` and ``backward`` again at trial points, and Lightning runs this hook after each) is
        judged on the first evaluation only: the loss and gradient at the step's own weights. The trial points'
        losses (a line search probes 1e4 where the step ends at 0.03) are the optimizer's business, not steps."""
        step = trainer.global_step
        if self._stepped and step == self._judged[0] and optimizer is self._judged[1]:
            self._loss = None  # a further closure evaluation of the step already judged
            return
        self._judged = (step, optimizer)
        if self.engine.lr_scale != 1.0 and self._lr_watch is not None:
            self._keep_lr_cut(trainer)
        stats = grad_stats_for(trainer, pl_module, optimizer, step=step)
        self._record = step_record(trainer, step)
        optimizers = trainer.optimizers
        stream = 0
        if len(optimizers) > 1:  # each optimizer's loss is its own stream (a GAN's G and D, a late second objective)
            raw = getattr(optimizer, "optimizer", optimizer)
            stream = next((i for i, o in enumerate(optimizers) if o is raw or o is optimizer), 0)
        verdict = self.engine.judge(step, [stats], self._loss, stream, optimizer)
        self._loss, self._stepped = None, True
        if verdict.health is None:
            return
        self._record.dropped = True
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"]:
                p.grad = None  # a real skip: optimizers leave params without a grad (and their state) alone

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:
            return  # a gradient-accumulation micro-batch: no optimizer step happened
        self._stepped = False
        step = trainer.global_step - 1
        engine = self.engine  # its fields read directly (the EngineField attributes are for users)
        options = engine.options
        if engine.snapshot_source == "checkpoint":  # auto: once its snapshots outgrew the memory budget
            self.files.observe(trainer)
        record = self._record
        flags = None
        if record is not None and not record.dropped:
            flags = [getattr(c, "clipped", False) for c in record.clips.values()]
        flagged = engine.end_step(step, flags)
        every: int = options.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 50
        if not flagged and log_due(trainer, every):
            engine.write_scalars(step)
        if len(engine.events) != self._bar_events and getattr(pl_module, "_current_fx_name", None) is not None:
            self._show_counters(trainer, pl_module, engine.events, step)

    def _keep_lr_cut(self, trainer: pl.Trainer) -> None:
        """While an LR cut is in force: a ``training_step`` that wrote a param group's LR by hand (a schedule of its
        own, nanoGPT-style) replaced the cut value; the cut is put on top of the value written, as the plain loop's
        ``GradGuard`` does (``lr_overwrite="reapply"``). LRs a registered scheduler set already carry the cut."""
        watch = self._lr_watch
        written = keep_cut(watch, list(trainer.optimizers), self.engine.lr_scale) if watch is not None else []
        if written and not self._lr_told:
            self._lr_told = True
            first = written[0]
            rank_zero_info(
                f"NaNGuard: the learning rate was set by hand (optimizer {first.optimizer}, param group "
                f"{first.group}: {first.left:.6g} -> {first.now:.6g}) while the LR cut is in force: "
                f"lr_scale={self.engine.lr_scale:.6g} re-applied to the written value (said once)"
            )

    def _show_counters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, events: list, step: int) -> None:
        """The guard's actions in the progress bar: one counter per kind of event (``skips``, ``rollbacks``,
        ``lr_cuts``, ``halts``), each from its first event on; every event counts once, under its own kind (a
        rollback is not also a skip, although it drops the faulty step's update too)."""
        self._bar_events = len(events)
        counts = Counter(e.get("kind") for e in events)
        for kind, name in _BAR_COUNTERS:
            if counts[kind]:
                self._bar.show_changed(trainer, pl_module, name, float(counts[kind]), step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last interval's scalars, every scalar's last value and the overview figure at the last step (the
        other gradguard callbacks, listed before the guard, have flushed theirs by now)."""
        engine = self.engine
        engine.check_weights(trainer.global_step)  # the last update is checked by no later step
        engine.write_scalars(trainer.global_step)
        if self._host is not None:
            engine.finish(trainer.global_step, "halt" if engine.halted else "end")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """As at the end of the fit: the picture reaches the step where the run stopped (a halt, or any error)."""
        if self._host is not None:
            engine = self.engine
            engine.write_scalars(trainer.global_step)
            engine.finish(trainer.global_step, "halt" if engine.halted else type(exception).__name__)
