"""The guard engine: snapshot -> judge -> decide -> act -> record, written once for every adapter.

``NaNGuard`` (Lightning), ``GradGuard`` (plain loops) and ``FabricGradGuard`` each own one :class:`GuardEngine` and
translate their hooks into its calls; the engine reaches the loop only through a
:class:`~lightning_gradguard.core.engine.GuardHost` the adapter hands it at :meth:`GuardEngine.start`. Per step:

1. :meth:`~GuardEngine.open_window` before the first forward of an optimizer step (buffers as they were) and
   :meth:`~GuardEngine.add_batch` for each micro-batch (the Trainer; a plain loop has no batches to give);
2. :meth:`~GuardEngine.judge` before the update: one stack of scalars, one cross-rank reduce, one host read (the
   :class:`~lightning_gradguard.core.guard._step_judge.StepJudge`); a flagged step's gradients are then dropped by
   the adapter, so the update changes nothing;
3. :meth:`~GuardEngine.end_step` after it: the policy's decision for a flagged step (skip, roll back, halt), the
   stability controller's LR cut, or a healthy step (snapshots confirmed and taken).

The decisions themselves are the core objects': :class:`~lightning_gradguard.core.guard.GuardPolicy` (one owner of
the rollback budget), the step judge and its detectors, the snapshot store and its trust rule,
``core/recover/_rules.py`` for the LR arithmetic. Every event is a
:class:`~lightning_gradguard.core.guard.GuardEvent`, kept in :attr:`GuardEngine.events`, announced and written as
text and scalars through the host. The outcome of the last step is a
:class:`~lightning_gradguard.core.guard.GuardDecision`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from lightning_gradguard.core.engine._host import GuardHost
from lightning_gradguard.core.engine._options import GuardOptions
from lightning_gradguard.core.engine._quiet import AnnounceQuota
from lightning_gradguard.core.engine._scalars import tag
from lightning_gradguard.core.guard._policy import (
    GuardAction,
    GuardCause,
    GuardDecision,
    GuardEvent,
    GuardPolicy,
    StepHealth,
)
from lightning_gradguard.core.guard._skip_rate import SkipRate
from lightning_gradguard.core.guard._stability import StabilityFinding
from lightning_gradguard.core.guard._step_judge import StepJudge, StepRider, Verdict, any_rank, nan_as_inf
from lightning_gradguard.core.measure._grad_stats import GradStats
from lightning_gradguard.core.measure._numerics import eps_hazards
from lightning_gradguard.core.recover._bad_batches import BadBatch, BadBatchRecord, fingerprint, short_digest
from lightning_gradguard.core.recover._fault_trace import nonfinite_in
from lightning_gradguard.core.recover._lr_scaling import LRCeiling
from lightning_gradguard.core.recover._replica_shards import ReplicaSharding
from lightning_gradguard.core.recover._rerun import KINDS, Diagnosis, RerunResult, RngState, classify
from lightning_gradguard.core.recover._rules import (
    START_KEEP_WINDOWS,
    StartState,
    halt_reason,
    halt_report,
    recover_lr,
    roll_back,
    snapshot_failure_message,
    stability_cut,
    stability_target,
)
from lightning_gradguard.core.recover._rules import lower_lr as cut_lr
from lightning_gradguard.core.recover._snapshot import (
    BufferCopy,
    Snapshot,
    SnapshotStore,
    inf_by_design,
    memory_budget,
    nonfinite_entries,
    nonfinite_weights_and_buffers,
    state_nbytes,
    take_snapshot,
)
from lightning_gradguard.core.recover._untouched import nonfinite_attributes
from lightning_gradguard.errors import DivergenceError

_NONFINITE_CAUSES = {"nonfinite_loss", "nonfinite_grad", "nonfinite_params", "nonfinite_buffers", "other_rank"}
_NONFINITE = _NONFINITE_CAUSES - {"other_rank"}  # non-finite values on this rank
_DIVERGENCE_CAUSES = (GuardCause.LOSS_DIVERGENCE, GuardCause.GRAD_DIVERGENCE)
#: stability rules whose claim is "no better than the untrained model" (tested on the batch before a restart)
_UNTRAINED_RULES = ("worse_than_untrained", "killed_at_start", "never_learned")
_PIN_NOTE = "the clipping threshold is held at its warm-up cap (fallback_max_norm) from now on"
_TEXT_TAG = tag("nan_guard_events")
_OFF_ELSEWHERE = (
    "snapshot='auto': another rank's in-memory snapshots would exceed its snapshot budget; from here on rollbacks "
    "use this fit's checkpoint files on every rank"
)


class _Unbound(GuardHost):
    """The host of an engine outside a fit: nothing to protect yet."""

    def model(self) -> torch.nn.Module:
        raise RuntimeError("the guard engine has no host: call start(host) first")

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def schedulers(self) -> list[Any]:
        return []


class GuardEngine:
    """The per-fit state of one guard and the orchestration of every step (see the module docstring).

    Args:
        options: the checked options (:func:`~lightning_gradguard.core.engine.check_guard_options`).

    Attributes:
        skipped_steps, amp_overflow_steps: counters of dropped updates and GradScaler overflow steps.
        lr_scale: the cumulative LR factor of every rollback and cut so far.
        events: every event as a plain dict (``GuardEvent.to_dict``), oldest first.
        outcome: what the guard did at the last step.
        cause: the cause of the last flagged step.
        halt_error, report_path: the error and report file of a halt.
    """

    def __init__(self, options: GuardOptions) -> None:
        self.options = options
        self.policy = GuardPolicy(
            options.action,
            options.max_consecutive_skips,
            options.escalate_to,
            options.max_rollbacks,
            refill_steps=options.rollback_refill_steps,
        )
        self.judge_ = StepJudge(
            None,
            options.divergence,
            options.stability,
            options.spike_zscore,
            options.spike_window,
            options.amp_scale_floor,
            options.history_size,
        )
        self.judge_.amp_max_halvings = options.amp_max_halvings
        self.store = SnapshotStore(capacity=2, confirm_steps=options.snapshot_confirm_steps)
        self.start_state = StartState(START_KEEP_WINDOWS * self.judge_.controller.window)
        self.buffers = BufferCopy()
        self.host: GuardHost = _Unbound()
        self.skipped_steps = 0
        self.amp_overflow_steps = 0
        self.lr_scale = 1.0
        #: the LR held below the one a climbing loss showed too high, while the schedule would raise it
        self.lr_ceiling = LRCeiling()
        #: state-dict keys of buffers that held +-inf (no NaN) when the fit started: checked for NaN only
        self.inf_by_design: frozenset[str] = frozenset()
        self.clip_pinned = False  # a dead network's restart held the clippers at their warm-up caps (lower_lr)
        self.warnings = 0
        self.lr_recoveries = 0
        self._since_cut = 0  # healthy steps since the last LR cut or raise (the LR recovery's clock)
        self._recovery_steps = options.lr_recovery_steps  # grows after a raised LR needed cutting again
        self._raised = False  # the last LR change was a recovery (a cut now doubles the recovery period)
        self.events: list[dict[str, Any]] = []
        self.skip_rate = SkipRate()  # a run whose steps are mostly skipped is not training: said once per window
        self.quota = (
            AnnounceQuota()
        )  # which event lines reach the terminal (a skip or warning repeating for ever is thinned)
        self.outcome = GuardDecision.HEALTHY
        self.cause: GuardCause | None = None
        self.halt_error: DivergenceError | None = None
        self.report_path: str | None = None
        self.snapshot_ms: float | None = None  # how long the last in-memory snapshot took (None: none taken)
        self._memory_off = False  # snapshot="auto" found the in-memory snapshots above the budget (for this fit)
        #: every batch the guard skipped or blamed (not transient faults), skipped again when met again
        self.bad_batches = BadBatchRecord()
        self._known_bad: BadBatch | None = None  # this step's batch is on the record
        self._held_evidence: str | None = None  # a held loss level the batch test found the model's (the event says)
        self._data_here = False  # the rerun found this rank's own batch at fault (the record's evidence)
        self._resumed = False
        self._fits = 0  # fits started (start()): a later fit from step 0 without a restore is a new run
        #: optimizer settings the parameters' precision cannot compute with (found at start(); named in the events
        #: about non-finite values)
        self.numerics_note = ""
        self._reset_step()

    def _reset_step(self) -> None:
        self._window_open = False
        self._batches: list[tuple[Any, int]] = []
        # the last healthy step's micro-batches and random-number states: an ordinary batch to rerun the current state
        # on before a fault is blamed on the state (the rerun diagnosis); None until a healthy step with a rerun
        self._ordinary: tuple[list[tuple[Any, int]], list[RngState | None]] | None = None
        self._claim_note = ""  # how a stability finding that stands fared on the batches (for its event)
        self._died_target: Snapshot | None = None  # the kept state a died network goes back to (found by the test)
        self._stale_note = ""  # why no snapshot is left: they were of an older layout of the model (_drop_stale)
        self._sign = 1.0  # -1.0 while the judged optimizer maximises its loss (its objective is -loss)
        self._rngs: list[RngState | None] = []  # the random-number state before each micro-batch's forward
        self._window_rng: RngState | None = None  # ... before the step's first forward (loops without batches)
        self._pending: StepHealth | None = None
        self._pending_values: tuple[float | None, float | None, list[GradStats]] = (None, None, [])
        self._pending_stream = 0  # the loss stream of the flagged step
        self._lower: StabilityFinding | None = None
        self._lower_opt: Any = None  # the optimizer whose loss stream gave the finding
        self._lower_stream = 0  # ... and that stream's key
        self._fault_lrs: list[float | None] = []  # each optimizer's LR at the flagged step (the schedule's rise)
        self._overflow = False
        # the step after which the next multiple of snapshot_every_n_steps is due (None: from the next healthy step):
        # the schedule follows the step counter, so a resumed run takes the snapshots the uninterrupted one took
        self._snap_after: int | None = None
        self._opt_sig: tuple[Any, ...] | None = None  # the optimizers at the last healthy step (_optimizer_signature)
        self._flagged = 0
        self._loss_max: float | None = None
        self._loss_before: tuple[int, float] | None = None  # the finite peak of the steps before a non-finite loss

    # ------------------------------------------------------------------ counters
    @property
    def rollbacks(self) -> int:
        return self.policy.rollbacks

    @rollbacks.setter
    def rollbacks(self, value: int) -> None:
        self.policy.rollbacks = int(value)

    @property
    def consecutive_skips(self) -> int:
        return self.policy.consecutive_skips

    @property
    def halted(self) -> bool:
        return self.outcome is GuardDecision.HALTED

    def snapshot_bytes(self) -> int:
        """Host bytes held now by this rank's in-memory snapshots (the store's and the kept start state; a snapshot
        held by both counts once)."""
        held = {id(s): s for s in self.store.snapshots}
        start = self.start_state.snapshot
        if start is not None:
            held[id(start)] = start
        return sum(s.nbytes() for s in held.values())

    @property
    def snapshot_source(self) -> str:
        """Where a rollback's state comes from in this fit: ``"memory"`` or ``"checkpoint"`` (``snapshot="auto"``
        switches to checkpoint files once in-memory snapshots would exceed ``snapshot_budget_mb``)."""
        o = self.options.snapshot
        return "checkpoint" if o == "checkpoint" or (o == "auto" and self._memory_off) else "memory"

    @property
    def spike_score(self) -> float | None:
        """The first optimizer's spike score: the share of judged steps whose loss or gradient norm spiked (6
        standard deviations above the previous 128 values; None before any step was judged). Each optimizer's:
        :attr:`spike_scores`."""
        return self.judge_.streams[0].spikes.score

    @property
    def spike_scores(self) -> dict[int, float | None]:
        """The spike score of each loss stream (optimizer index -> score)."""
        return {idx: stream.spikes.score for idx, stream in sorted(self.judge_.streams.items())}

    @property
    def grad_history(self) -> deque[list[float]]:
        return self.judge_.grad_history

    @property
    def loss_history(self) -> deque[list[float]]:
        return self.judge_.loss_history

    # ------------------------------------------------------------------ a fit
    def configure(self, options: GuardOptions) -> None:
        """Take options changed since construction (the detectors' switches; the policy's limits)."""
        self.options = o = options
        judge = self.judge_
        judge.divergence, judge.stability, judge.amp_scale_floor = o.divergence, o.stability, o.amp_scale_floor
        judge.amp_max_halvings = o.amp_max_halvings
        policy = self.policy
        policy.action, policy.max_consecutive_skips = o.action, o.max_consecutive_skips
        policy.escalate_to, policy.max_rollbacks = o.escalate_to, o.max_rollbacks
        policy.refill_steps = o.rollback_refill_steps
        if self._recovery_steps is None or o.lr_recovery_steps is None:
            self._recovery_steps = o.lr_recovery_steps
        self.store.confirm_steps = o.snapshot_confirm_steps

    def start(self, host: GuardHost, step: int) -> None:
        """Begin protecting ``host``'s loop at ``step``: a fresh per-step state and a trusted snapshot of the starting
        state. The judge's previous row carries over only after :meth:`load_state_dict`.

        A fit that starts at step 0 without a restored state, after an earlier fit of this guard, is a new run (the
        same callbacks given to a new Trainer: pre-training, then fine-tuning on another task): nothing of the last
        run holds, neither its references (its best loss, its LRs: a new optimizer's LR read as "the LR grew") nor
        its budget, LR scale, snapshots or events. A fit that continues (a later step) or resumes keeps them."""
        if self._fits and step == 0 and not self._resumed:
            fits = self._fits
            GuardEngine.__init__(self, self.options)  # every attribute as a new guard has it
            self._fits = fits
        self._fits += 1
        self.host = host
        # buffers that hold infinities from the start (an additive attention mask) are the model's, not a fault
        self.inf_by_design = inf_by_design(host.model()) | inf_by_design(host.named_module())
        self._reset_step()
        self.store.reset()
        self.buffers.clear()
        self._opt_sig = None
        self.judge_.reduce = host.reducer()
        self._memory_off = False
        if not self._resumed:
            self.judge_.forget_last_step()
        self._resumed = False
        self._check_numerics()
        if self.options.action != "halt":
            self.take_snapshot(step, trusted=True)

    def _check_numerics(self) -> None:
        """Warn once per fit about optimizer settings that the parameters' dtype cannot compute with (Adam's eps in
        float16 weights: :func:`~lightning_gradguard.core.measure._numerics.eps_hazards`); the events about non-finite
        values name it."""
        hazards = eps_hazards(self.host.optimizers())
        self.numerics_note = "; ".join(h.describe() for h in hazards)
        if self.numerics_note:
            self.host.warn(f"{self.options.owner}: {self.numerics_note}", False)

    def stop(self) -> None:
        """End of the fit: free the snapshots and the batch references, drop the host."""
        self.store.reset()
        self.buffers.clear()
        self._batches = []
        self.host = _Unbound()

    # ------------------------------------------------------------------ per step
    def open_window(self, module: torch.nn.Module) -> None:
        """Before the first forward of an optimizer step: save the buffers that forward is about to change (and,
        for the rerun diagnosis, the random-number state it starts from); clamp the LR to its ceiling, if one is set
        (:meth:`judge` clamps again before the update, for an LR changed in between)."""
        if not self._window_open:
            self._window_open = True
            if self.lr_ceiling:  # the schedule may have stepped past the ceiling: clamp now, so that an LR logger
                self.lr_ceiling.apply(self.host.optimizers(), self.lr_scale)  # (LearningRateMonitor) sees the LR used
            self._batches = []
            self._rngs = []
            self._known_bad = None
            self.buffers.save(module)
            self._window_rng = RngState.capture() if self.options.rerun else None

    def add_batch(self, batch: Any, batch_idx: int) -> None:
        """A micro-batch of the open step (diagnosis of a flagged step; optional), called before its forward. A
        batch on the bad-batch record marks the step to be skipped (every rank agrees: one reduce, only at a
        recorded position)."""
        self._batches.append((batch, batch_idx))
        if self.options.rerun:
            self._rngs.append(RngState.capture())
        record = self.bad_batches
        if record.entries:
            host = self.host
            epoch = host.epoch()
            if epoch is not None and record.covers(epoch, batch_idx):  # positions: the same on every rank
                entry = record.match(epoch, batch_idx, lambda: fingerprint(batch), host.rank())
                (agreed,) = any_rank(host.reducer(), entry is not None, device=host.device())
                if agreed and self._known_bad is None:
                    self._known_bad = entry or BadBatch(-1, epoch, batch_idx, action="(on another rank)")

    def rider(self, loss: Any) -> StepRider | None:
        """This step's judge values (all but the norm) to carry in the collective of the step's sharded measurement,
        so that :meth:`judge` reduces nothing itself (``loss``: what :meth:`judge` will be given); None with one
        process. See :meth:`~lightning_gradguard.core.guard._step_judge.StepJudge.rider`."""
        return self.judge_.rider(loss, self.host.scaler())

    def judge(self, step: int, stats: list[GradStats], loss: Any, stream: int = 0, optimizer: Any = None) -> Verdict:
        """Judge the step before its update (one reduce, one host read; no reduce when the values travelled with the
        measurement: :meth:`rider`). The adapter drops the gradients of a
        step whose ``verdict.health`` is set; several calls in one step (one per optimizer) are merged. ``stream``:
        the loss stream (the optimizer's index when each optimizer has its own loss); ``optimizer``: whose LR the
        stability rules read (None: the host's first optimizer).

        An optimizer built with ``maximize=True`` ascends its loss: every rule then judges ``-loss``, the objective it
        minimises (a diverging objective that is maximised climbs towards -inf, which a rule for losses would read
        as an improvement); the reruns' losses are turned the same way."""
        if optimizer is None:
            opts = self.host.optimizers()
            optimizer = opts[0] if opts else None
        self._sign = -1.0 if maximizes(optimizer) else 1.0
        if self._sign < 0.0 and loss is not None:
            loss = -loss
        if self.lr_ceiling:  # before the update reads it: the schedule may have raised the LR past the ceiling
            self.lr_ceiling.apply(self.host.optimizers(), self.lr_scale)
        lr = lr_of(optimizer) if optimizer is not None and self.options.stability else None
        if self._known_bad is not None:  # a batch on the record: skip it again, unjudged (no detector learns it)
            live = [s for s in stats if s.grads]
            verdict = Verdict(StepHealth(step, known_bad_batch=True), False, None, None, math.nan, live)
        else:
            host = self.host
            # (a climb's claim can be tested on the batches: what _refute_restart needs, known before it runs)
            self.judge_.testable = self.judge_.test_held = (
                self.options.rerun and len(host.optimizers()) == 1 and not (self._many() and host.rerun_is_collective())
            )
            verdict = self.judge_.judge(step, stats, loss, host.scaler(), stream, lr)
            self._test_divergence_on_batch(verdict, stream)
            self._test_objective_changed(verdict, stream, optimizer)
            # the detector adopted far gradient norms as the run's new level (they held while the loss did not rise):
            # the adaptive clipper's statistics of the old level restart from them, as its warm-up would have
            self._rebase_clipping(optimizer, self.judge_.stream(stream).detector.new_grad_level)
        loss_v = verdict.loss
        if loss_v is not None and (self._loss_max is None or not loss_v <= self._loss_max):
            peak = self._loss_max
            if peak is not None and math.isfinite(peak) and not math.isfinite(loss_v) and step > 0:
                self._loss_before = (step - 1, peak)  # a blow-up before the NaN: written at its own interval's end
            self._loss_max = loss_v
        self._overflow = self._overflow or verdict.overflow
        if verdict.lower_lr is not None:
            self._lower, self._lower_opt, self._lower_stream = verdict.lower_lr, optimizer, stream
        if verdict.health is not None and self._pending is None:
            self._pending = verdict.health
            self._pending_stream = stream
            self._pending_values = (loss_v, verdict.norm, verdict.stats)
            self._fault_lrs = [lr_of(opt) for opt in self.host.optimizers()]  # the LRs the fault's step ran at
        return verdict

    def _test_divergence_on_batch(self, verdict: Verdict, stream: int) -> None:
        """Two loss divergences are tested on the batch itself before anything is done, by rerunning the step from the
        state a rollback would restore (the trusted snapshot):

        - one judged against a **thin reference** (the run's first steps, where the reference can be one batch: a
          first single sample that happens to be fitted makes every ordinary loss after it a "jump");
        - a **far level that holds** (:attr:`DivergenceDetector.held_verdict`): a new task's or new data's level
          (a curriculum step to a harder, larger task) holds steady, and so can a blown-up model's (a buggy optimizer
          state reset: losses 500-1800 where the untrained model's were 2.3 and the run's 0.04).

        When the current state's loss is no jump above that state's loss on the same batch, a rollback would restore
        a state no better on the evidence: the losses are the run's level, which becomes the reference, and the step
        is healthy. When it is a jump above it (a model blown up by its first updates, loss 11 -> 1e12; a model that
        blew up to a steady level), the model is at fault and the divergence is acted on. A held level that cannot
        be tested (several optimizers, no batch, no trusted snapshot, a failed rerun) becomes the reference, as it
        did before the test; a thin verdict is acted on. One optimizer only (a rerun gives the loss of every
        optimizer's objective together).

        With several ranks (DDP; not where a rerun is a collective) the verdict was judged on the ranks' largest
        loss: every rank reruns its own batch, and the largest current loss is compared with the largest loss of
        the restored state, one reduce (:meth:`_agree_reruns`); every rank takes the same branch."""
        health = verdict.health
        if health is None or not health.loss_divergence:
            return
        detector = self.judge_.stream(stream).detector
        held = detector.held_verdict
        if not (held or detector.thin_verdict):
            return
        if health.grad_divergence or health.cause is not GuardCause.LOSS_DIVERGENCE or verdict.loss is None:
            return  # anything else wrong with the step (non-finite values, a spike, the gradient norm) is acted on
        shared = self._rerun_from_trusted(verdict)
        if shared is None and not held:
            return  # an untested thin verdict is acted on
        if shared is not None and detector.beyond(shared[0], shared[1]):
            if held:
                snap = self.store.compute()
                self._held_evidence = (
                    f"the loss held a level far above the run's ({_g(detector.loss_reference)}: now {shared[0]:.4g}), "
                    f"and from the trusted state of step {snap.step if snap is not None else '?'} this batch gives "
                    f"{shared[1]:.4g}: the model blew up, not the data"
                )
            return
        detector.adopt_level()
        verdict.health = None

    def _rebase_clipping(self, optimizer: Any, level: list[float] | None) -> None:
        """Hand a gradient level the detector adopted to ``optimizer``'s adaptive clipper (its statistics restart)."""
        if not level or optimizer is None:
            return
        index = next((i for i, opt in enumerate(self.host.optimizers()) if opt is optimizer), None)
        if index is not None:
            self.host.rebase_clipping(index, level)

    def _test_objective_changed(self, verdict: Verdict, stream: int, optimizer: Any) -> None:
        """A divergence that the batch test above left standing (the loss or the gradient norm far beyond the run's
        level, climbing or erratic) is tested once more before it is acted on: the trusted snapshot's weights (with
        today's buffers) and the current model rerun the last ordinary batch, at this step. The run's reference was
        built by states like that one on batches like that one; if that state is now off it on such a batch (by the
        unsettled factors) and the current model is not clearly worse than it there (:meth:`DivergenceDetector.
        beyond_state`), the objective changed (a loss weight raised at once, a loss term switched on), not the model:
        a rollback would restore a state no better, and met the same jump again, three times, then a halt (a digits
        MLP whose loss weight went 1e-4 -> 1 at step 300, every seed). The far values become the run's level (the
        clipper's statistics restart from the norms), the step is taken, and a warning says so with the numbers.
        Otherwise the divergence stands (a blow-up leaves the trusted state at the run's level on an ordinary batch;
        one early in the run, whose trusted state is the untrained one, leaves the model clearly worse). One
        optimizer, an ordinary batch the rerun can take, a trusted snapshot; with several ranks the values are the
        ranks' largest (one reduce: every rank takes the same branch)."""
        health = verdict.health
        if health is None or not (health.loss_divergence or health.grad_divergence):
            return
        if health.cause not in _DIVERGENCE_CAUSES or health.other_rank or verdict.loss is None:
            return  # anything else wrong with the step (non-finite values, a spike) is acted on
        if not self.options.rerun:
            return
        self._drop_stale()
        snap = self._ordinary_ready()
        if snap is None or self._ordinary is None:
            return
        weights = self._with_todays_buffers(self._trusted_weights(snap))
        shared = self._reruns([(*self._ordinary, weights), (*self._ordinary, None)], health.step)
        detector = self.judge_.stream(stream).detector
        if shared is None:
            return
        t_loss, t_norm, c_loss, c_norm = shared
        # the reference is stale: the trusted state, on an ordinary batch, is far from the level such states built
        # (by the unsettled factors, far below a divergence's: the values the reference was learned from do not
        # come near them); and a rollback buys nothing: on that batch the model is not clearly worse than the
        # trusted state (by the same factors: a model blown up early, its trusted state the untrained one, is)
        if not detector.off_level(t_loss, t_norm) or detector.beyond_state(c_loss, c_norm, t_loss, t_norm):
            return
        ref_loss, ref_norm = detector.loss_reference, detector.grad_reference
        detector.adopt_level()
        self._rebase_clipping(optimizer, detector.adopt_grad_level())
        verdict.health = None
        self.warnings += 1
        reason = (
            f"the objective changed, not the model: the {'loss' if health.loss_divergence else 'gradient norm'} went "
            f"far beyond the run's level (loss {_g(ref_loss)}, norm {_g(ref_norm)}; now loss {verdict.loss:.4g}, norm "
            f"{verdict.norm:.4g}), and the trusted state of step {snap.step} gives loss {t_loss:.4g}, norm "
            f"{t_norm:.4g} on the last ordinary batch now: a rollback would restore a state as far (a loss weight "
            "raised, a loss term switched on). The far values are the run's new level: no action"
        )
        event = GuardEvent(health.step, "warn", GuardCause.INSTABILITY.value, self.lr_scale, reason=reason)
        event.loss, event.grad_norm, event.rule = verdict.loss, verdict.norm, "objective_changed"
        self.record_event(event)

    def _rerun_from_trusted(self, verdict: Verdict) -> list[float] | None:
        """This step's loss and the trusted snapshot's loss on the same batch (each the ranks' largest), or None where
        no rerun can run (options, several optimizers, no batch, no snapshot, a rerun that failed)."""
        host = self.host
        if not self.options.rerun or len(host.optimizers()) > 1 or (self._many() and host.rerun_is_collective()):
            return None
        if not self._batches and host.rerun_takes_items() and not self._many():
            return None  # (a plain loop's rerun is its recompute callable: it needs no batch)
        self._drop_stale()
        snap = self.store.compute()  # the same on every rank
        if snap is None or not self._agree_ready():
            return None
        step = verdict.health.step if verdict.health is not None else -1
        # the trusted weights with today's buffers: a curriculum stage or loss weight kept in a buffer is today's
        # objective, and the question is whether the earlier weights meet it as far (BatchNorm's running statistics
        # do not enter a training-mode forward); as the climb's test asks (_rerun_pair)
        weights = self._with_todays_buffers(self._trusted_weights(snap))
        trusted = host.rerun(self._batches, self._rngs or [self._window_rng], weights, step)
        level = self._sign * trusted.loss if trusted is not None and trusted.loss is not None else None
        ok = level is not None and math.isfinite(level)
        return self._agree_reruns([float(verdict.loss or 0.0), level if level is not None and ok else 0.0], ok)

    def _many(self) -> bool:
        """Several ranks judge this run together."""
        reducer = self.host.reducer()
        return reducer is not None and reducer.world_size > 1

    def _agree_ready(self) -> bool:
        """Whether every rank holds what a rerun needs (the step's batches, where the rerun takes them): one reduce
        with several ranks, so that all or none of them rerun."""
        host = self.host
        ready = bool(self._batches) or not host.rerun_takes_items()
        if not self._many():
            return ready
        (missing,) = any_rank(host.reducer(), not ready, device=host.device())
        return not missing

    def _agree_reruns(self, values: list[float], ok: bool) -> list[float] | None:
        """Each of ``values`` (losses measured by this rank's reruns) as its maximum over the ranks, the way the
        judge reduces the step's loss (one reduce; nothing with one process); None where some rank's reruns failed
        (``ok`` False there) or gave a non-finite value."""
        host = self.host
        reducer = host.reducer()
        if reducer is not None and reducer.world_size > 1:
            local = torch.tensor([*values, 0.0 if ok else 1.0], dtype=torch.float64, device=host.device())
            out = reducer(nan_as_inf(local)).tolist()
            values, ok = out[:-1], out[-1] == 0.0
        if not ok or not all(math.isfinite(v) for v in values):
            return None
        return [float(v) for v in values]

    def end_step(self, step: int, clip_flags: list[Any] | None = None) -> bool:
        """After the update (taken or dropped): carry out the decision for ``step``. ``clip_flags``: the clippers'
        flags of this step (the stability controller's input next step). Returns whether the step was flagged."""
        self._window_open = False
        pending, overflow, lower, lower_opt = self._pending, self._overflow, self._lower, self._lower_opt
        self._pending, self._overflow, self._lower, self._lower_opt = None, False, None, None
        if pending is None and clip_flags is not None:
            self.judge_.clip_flags = clip_flags
        if self.halted:
            return pending is not None
        if (
            lower is not None
            and lower.tested_only
            and (pending is not None or self.lr_scale <= self.options.min_lr_scale)
        ):
            self.judge_.stream(self._lower_stream).controller.withdraw(warned=False)  # (it cannot be tested: none)
            lower = None
        if pending is None and lower is not None and (not lower.act or self.lr_scale > self.options.min_lr_scale):
            self._drop_stale()
            self._claim_note = ""
            refuted = self._refute_restart(step, lower)
            if refuted is None and self._claim_note:  # tested on the batches, and it stands: the event says so
                lower = replace(lower, reason=f"{lower.reason}; {self._claim_note}")
            elif lower.tested_only:  # weaker evidence that did not stand on the batches (or was not tested): none
                self.judge_.stream(self._lower_stream).controller.withdraw(warned=False)
                lower, refuted = None, None
            elif refuted is None and lower.rule == DIED_RULE and lower.act:  # a rollback only on tested evidence
                self.judge_.stream(self._lower_stream).controller.withdraw()
                lower = replace(
                    lower, act=False, reason=f"{lower.reason}; could not be tested on the batches: warning only"
                )
            elif refuted is None and lower.act and lower.rule in _UNTRAINED_RULES and not self._untrained_kept(step):
                # "no better than untrained" then rests on the first losses alone (a batch or a few): with the
                # untrained state gone it cannot be tested on today's batches, and a restart is no longer possible
                self.judge_.stream(self._lower_stream).controller.withdraw()
                lower = replace(lower, act=False, reason=f"{lower.reason}; {self._untested_untrained()}: warning only")
            if refuted is not None and lower is not None:  # the finding's claim does not hold on the batch itself
                controller = self.judge_.stream(self._lower_stream).controller
                controller.correct_start(refuted[1])  # the untrained loss, measured on these batches too
                if lower.act:  # an action: a warning that says why not
                    controller.withdraw()
                    lower = replace(lower, act=False, reason=f"{lower.reason}; but {refuted[0]}: warning only")
                else:  # a warning whose claim is refuted says nothing true: none
                    lower = None
        if pending is not None:
            self._flagged += 1
            self.handle_fault(pending)
            if not self.halted:
                self._count_skip(step, self.outcome is GuardDecision.SKIPPED)
        elif lower is not None and lower.act and self.lr_scale > self.options.min_lr_scale:
            self.lower_lr(step, lower, lower_opt)
        else:
            if lower is not None:
                self.warn(step, lower)
            self.healthy(step + 1, overflow)
            calm = all(st.detector.calm for st in self.judge_.streams.values())
            if self.options.rerun and self._batches and calm:  # (not a far step still being counted: no ordinary one)
                self._ordinary = (self._batches, self._rngs or [self._window_rng])
        if pending is None:
            self._count_skip(step, False)
        self._batches = []
        return pending is not None

    def _count_skip(self, step: int, skipped: bool) -> None:
        """One step into the skip rate; a warning once a window's steps were mostly skipped (core/guard/_skip_rate)."""
        cause = self.cause.value if skipped and self.cause is not None else ""
        found = self.skip_rate.update(skipped, cause)
        if found is None:
            return
        self.warnings += 1
        reason = (
            f"{found}; a bad batch is rare, so a fault on most batches is the run's, whatever each rerun said "
            "(fp16 autocast without a GradScaler, a too-high LR, a damaged state): warning only"
        )
        event = GuardEvent(step, "warn", GuardCause.INSTABILITY.value, self.lr_scale, reason=reason)
        event.rule = "skip_rate"
        self.record_event(event)

    def _untrained_kept(self, step: int) -> bool:
        """Whether the untrained state (the run's start, or its last restart) is still kept at ``step``."""
        self.start_state.expire(step)
        return self.start_state.snapshot is not None

    def _untested_untrained(self) -> str:
        keep = self.start_state.keep_steps
        return (
            f"the untrained state is no longer kept (the guard keeps it {keep} steps after the start or a restart; "
            "a resumed run has none), so the claim could not be tested against it on the batches"
        )

    def _refute_restart(self, step: int, finding: StabilityFinding) -> tuple[str, list[float]] | None:
        """Test a stability finding's claim on the batches themselves before it acts or warns: rerun this step's
        batch (and the last ordinary batch's, when kept) from the current state and from the state the claim is
        about, the same items and random numbers. Returns the evidence that refutes the claim and the other state's
        loss on each batch; or None: the claim stands, or nothing could be rerun (no batch, no such state, a
        non-positive loss, a rerun that is a collective).

        - "No better than untrained" (``worse_than_untrained``, ``killed_at_start``, ``never_learned``; a restart or
          a warning): those rules read "the untrained loss" from the run's first loss, one batch. A small first batch
          that happened to be easy (batch size 4, loss 0.57 against a typical 8) made a model that learned look no
          better than untrained and restarted it. Refuted when the current model's loss is below ``start_margin`` x
          the untrained model's on the same batches ("worse than untrained"), below ``stuck_margin`` x it (the
          others).
        - "The loss climbed because the LR grew" (``loss_climbing``, ``loss_above_best``; acting findings only, one
          optimizer): a rollback to the state from before the climb helps only if that state does better on today's
          batches. When the data got harder (a stream whose label noise grows while the LR warms up: the loss climbs
          ~100x with the LR) the earlier state does no better. Refuted unless the earlier state's loss is below
          ``stuck_margin`` x the current one's on each of the batches (clearly better, as "it learned" means above,
          and on every batch: on a noisy stream one batch can favour either state by that much), and it buys back
          more than half of the climb (the current loss on the batches minus the best window's median): an earlier
          state that sits near today's level too says the batches got harder; going back to it would cost the
          steps since and leave the loss where it is (a scheduled-sampling run whose task hardened while its LR
          warmed up: the earlier state 18 % better on the batches, a sixth of the climb; the rollback cost 10 % of
          the final metric).

        With several ranks (DDP) the rules read the ranks' largest loss: every rank reruns its own batches and each
        loss is taken as its maximum over the ranks (:meth:`_agree_reruns`), so every rank reaches the same answer."""
        died = finding.rule == DIED_RULE
        climbing = finding.rule in CLIMBING_RULES or died
        if not self.options.rerun or not (finding.rule in _UNTRAINED_RULES or (climbing and finding.act)):
            return None
        host = self.host
        many = self._many()
        if not self._batches and host.rerun_takes_items() and not many:
            return None
        controller = self.judge_.controller
        if died:  # every kept trusted state, newest first: the first that does better is the one to go back to
            candidates = [x for x in reversed(self.store.snapshots) if self.store.is_good(x)]
        elif climbing:
            snap, _ = stability_target(self.start_state, self.store, finding.target, step, controller.window)
            candidates = [snap] if snap is not None else []
        else:
            snap = self.start_state.snapshot  # the same on every rank
            candidates = [snap] if snap is not None else []
        if climbing and len(host.optimizers()) > 1:
            return None  # a rerun gives every optimizer's objective together; the climb is one stream's
        if not candidates or (many and host.rerun_is_collective()) or not self._agree_ready():
            return None
        runs = [(self._batches, self._rngs or [self._window_rng])]
        ordinary = self._ordinary is not None and host.rerun_takes_items()
        if many:  # the same runs on every rank
            (lacking,) = any_rank(host.reducer(), not ordinary, device=host.device())
            ordinary = not lacking
        if ordinary and self._ordinary is not None:
            runs.append(self._ordinary)
        n = len(runs)
        where = "this step's batch" if n == 1 else "this step's and the last batch"
        self._died_target = None
        shared: list[float] | None = None
        for snap in candidates:
            shared = self._rerun_pair(runs, snap, step)
            if shared is None:
                return None
            now, then = sum(shared[0::2]), sum(shared[1::2])
            if not climbing:
                break
            pairs = list(zip(shared[0::2], shared[1::2]))
            if not all(a > 0.0 and b > 0.0 for a, b in pairs):
                return None  # (ratios of losses at or below 0 say nothing)
            # the model itself got worse (the earlier state clearly better on every batch), and by most of the climb:
            # a rollback must buy back more than half of what the climb lost on the same batches, else the batches
            # got harder and the earlier state would sit near today's level too
            best = finding.evidence.get("best", math.nan) if climbing and not died else math.nan
            explains = not math.isfinite(best) or (now - then) > 0.5 * (now - n * best)
            if all(b < controller.stuck_margin * a for a, b in pairs) and explains:
                self._claim_note = (
                    f"on {where} the state of step {snap.step} does better ({then / n:.4g}) than the model now "
                    f"({now / n:.4g})"
                )
                self._died_target = snap if died else None
                return None
        assert shared is not None
        now, then = sum(shared[0::2]), sum(shared[1::2])
        if died:
            steps = ", ".join(str(c.step) for c in candidates)
            return (
                f"on {where} no kept state does clearly better (steps {steps}; the oldest: {then / n:.4g}, the model "
                f"now: {now / n:.4g})"
            ), []
        if climbing:
            best = finding.evidence.get("best", math.nan)
            if all(b < controller.stuck_margin * a for a, b in zip(shared[0::2], shared[1::2])) and math.isfinite(best):
                return (
                    f"on {where} the state of step {candidates[0].step} does better ({then / n:.4g}) than the model "
                    f"now ({now / n:.4g}) but buys back less than half of the climb from the best window "
                    f"({_g(best)}): the batches got harder, a rollback would not help"
                ), []
            if then < now:  # better on average, not clearly on every batch: said as it is (not "no better")
                per = ", ".join(f"{b:.4g} vs {a:.4g}" for a, b in zip(shared[0::2], shared[1::2]))
                return (
                    f"on {where} the state of step {candidates[0].step} is not clearly better on every batch (below "
                    f"{controller.stuck_margin:g}x the model's loss now: {per}): on noisy batches either state can "
                    "win by that much, so this is no evidence that a rollback would help"
                ), []
            return (
                f"on {where} the state of step {candidates[0].step} does no better ({then / n:.4g}) than the model "
                f"now ({now / n:.4g}): the batches got harder, a rollback would not help"
            ), []
        # each rule's own claim: "worse than untrained" (above start_margin x it), or "not clearly better" (above
        # stuck_margin x it: killed at the start, never learned)
        worse = finding.rule == "worse_than_untrained"
        margin = controller.start_margin if worse else controller.stuck_margin
        if not (then > 0.0 and now < margin * then):
            if then > 0.0:
                self._claim_note = (
                    f"on {where} the model's loss ({now / n:.4g}) is not below {margin:g}x the untrained model's "
                    f"({then / n:.4g})"
                )
            return None
        text = f"on {where} the model's loss ({now / n:.4g}) is below {margin:g}x the untrained model's"
        return f"{text} ({then / n:.4g}): {'it is not worse' if worse else 'it learned'}", shared[1::2]

    def _rerun_pair(self, runs: list[Any], snap: Snapshot, step: int) -> list[float] | None:
        """Rerun each of ``runs`` (items and random numbers) from the current state and from ``snap``'s weights:
        the losses, now and then alternating, agreed over the ranks; None when a rerun gave no loss on some rank.

        The earlier weights run with today's buffers: the question is whether those weights do better on today's
        objective. A loss weight, label smoothing or curriculum stage kept in a buffer belongs to the objective (a
        state that scored itself under its own, older objective would always look better); BatchNorm's running
        statistics do not enter a training-mode forward."""
        host = self.host
        other = self._with_todays_buffers(snap.whole_model())
        measured: list[float] = []
        ok = True
        buffers = BufferCopy()  # the reruns move BatchNorm statistics: put back what the step left
        buffers.save(host.model())
        try:
            for items, rngs in runs:
                mine = host.rerun(items, rngs, None, step)
                then_run = host.rerun(items, rngs, other, step)
                pair = tuple(
                    self._sign * r.loss if r is not None and r.loss is not None else None for r in (mine, then_run)
                )
                ok = ok and None not in pair
                measured += [v if v is not None else 0.0 for v in pair]
        finally:
            buffers.restore()
        return self._agree_reruns(measured, ok)

    def log_due(self, step: int) -> bool:
        """Whether ``step`` is a logging step of a loop that counts its own steps (the Trainer has its own rule)."""
        every = self.options.log_every_n_steps or 50
        return step % every == 0

    def check_weights(self, step: int) -> None:
        """The last update is checked by no later step: check the weights themselves (at the end of training)."""
        if self.options.check_params and step > 0 and not self.halted:
            health = StepHealth(step, update_skipped=False)
            self._diagnose(health)
            if health.weights_damaged:
                self.handle_fault(health)

    # ------------------------------------------------------------------ outcomes
    def healthy(self, next_step: int, overflow: bool) -> None:
        """A healthy step: confirm the snapshots, take a new one every ``snapshot_every_n_steps`` (``next_step``: the
        step the state now belongs to)."""
        self.policy.healthy()
        if overflow:
            self.amp_overflow_steps += 1
            self.outcome = GuardDecision.AMP_OVERFLOW
            return  # the scaler skipped this update: it tests nothing, so it confirms no snapshot
        self.outcome = GuardDecision.HEALTHY
        self.store.step_healthy()
        o = self.options
        if (self.lr_scale < 1.0 or self.lr_ceiling) and self._recovery_steps is not None:
            self._since_cut += 1
            if self._since_cut >= self._recovery_steps:
                self._recover_lr(next_step - 1)
        if self.snapshot_source == "memory" and o.action != "halt":
            after = self._snap_after
            if after is None:
                after = self._snap_after = next_step - 1
            every = o.snapshot_every_n_steps
            sig = self._optimizer_signature()
            changed = self._opt_sig is not None and sig != self._opt_sig
            self._opt_sig = sig
            # a multiple of every crossed since the last snapshot, or the optimizers changed (a backbone unfrozen into
            # a new param group, an optimizer swapped in): the kept snapshots no longer load, so a new one is taken at
            # once rather than at the next multiple (a fault in between found none to roll back to and halted)
            if changed:  # the old snapshots first: kept as "the newest good one", they would evict the new ones
                self._drop_stale()
            if changed or next_step // every > after // every:
                self._snap_after = next_step
                self.take_snapshot(next_step)

    def take_snapshot(self, step: int, trusted: bool = False) -> None:
        """Copy the state (that of ``step``, before its update); keep it only if every rank copied it and it is
        finite (else the older ones stay)."""
        host = self.host
        snap, error, bad = None, None, []
        started = time.perf_counter()
        sharding = host.replica_sharding() if self.options.shard_snapshots else None
        over: str | None = None  # snapshot="auto" and over the budget: decided here, agreed in the reduce below
        try:
            over = self._over_budget(sharding)
            if over is None:
                snap = take_snapshot(
                    host.model(),
                    host.optimizers(),
                    host.schedulers(),
                    step=step,
                    extra=host.extra_state(),
                    meta={"lr_scale": self.lr_scale, "layout": self._layout()},
                    sharding=sharding,
                )
            if snap is not None and self.options.check_params:  # a split snapshot holds bytes: check the live state
                bad = nonfinite_entries(
                    snap.model if snap.sharded is None else host.model().state_dict(), self.inf_by_design
                )
        except Exception as err:  # e.g. host memory exhausted: must not end the run the guard keeps alive
            error = err
        failed, damaged, too_big = any_rank(
            host.reducer(), error is not None, bool(bad), over is not None, device=host.device()
        )
        if too_big:  # snapshot="auto" on some rank: no in-memory snapshots from here on, on every rank
            self._memory_off, snap = True, None
            host.warn(over or f"{self.options.owner}: {_OFF_ELSEWHERE}", over is not None)
        if failed:
            message = snapshot_failure_message(self.options.owner, step, error, self.store.compute())
            host.warn(message, error is not None)
        elif damaged:  # the last update made the weights non-finite before any loss or gradient could show it
            health = StepHealth(max(step - 1, 0), update_skipped=False)
            self._diagnose(health)
            health.nonfinite_params = health.nonfinite_params or not health.nonfinite_buffers
            self.handle_fault(health)
        elif snap is not None:
            self.snapshot_ms = (time.perf_counter() - started) * 1e3
            self.store.update(snap, trusted=trusted)
            if trusted:
                self.start_state.offer(snap)
        self.start_state.expire(step)

    def _optimizer_signature(self) -> tuple[Any, ...]:
        """Which optimizers and schedulers the loop has and how many parameters each group holds: a few integers,
        read at every healthy step (:meth:`_layout` is the full check, made when a snapshot is read back)."""
        host = self.host
        opts = tuple((id(o), type(o), tuple(len(g["params"]) for g in o.param_groups)) for o in host.optimizers())
        return opts + tuple((id(s), type(s)) for s in host.schedulers())

    def _layout(self) -> str:
        """A digest of the model's parameter and buffer names and shapes, of each optimizer's class and param groups
        and of the schedulers' classes: what a snapshot must match to be restored (no collective: names, shapes and
        class names only). The classes count: an SGD state does not load into the Adam that a two-phase recipe swaps
        in mid-fit (its restore failed on the missing ``step``), and a rebuilt optimizer that brings a scheduler the
        snapshot did not hold failed its restore ("snapshot holds 0 scheduler states, got 1")."""
        host = self.host
        model = host.model()
        tensors = [(k, tuple(v.shape)) for k, v in (*model.named_parameters(), *model.named_buffers())]
        groups = [(type(opt).__qualname__, [len(g["params"]) for g in opt.param_groups]) for opt in host.optimizers()]
        schedulers = [type(s).__qualname__ for s in host.schedulers()]
        return short_digest(repr((tensors, groups, schedulers)))

    def _drop_stale(self) -> None:
        """Before anything reads a snapshot back (a rollback, a restart, a rerun from a kept state): forget the
        snapshots taken before the model or its optimizers changed shape since (a pruning callback that re-registers
        weights, a backbone unfrozen into a new param group). Their state no longer loads; restoring it would crash
        the fit halfway through a restore. The next snapshot is taken with the new layout."""
        now = self._layout()
        stale = [x for x in self.store.snapshots if x.meta.get("layout", now) != now]
        for x in stale:
            self.store.snapshots.remove(x)
        start = self.start_state.snapshot
        if start is not None and start.meta.get("layout", now) != now:
            self.start_state.snapshot = None
        if stale or (start is not None and self.start_state.snapshot is None):
            self._stale_note = (
                "the kept snapshots predate a change of the model's parameters or param groups, or of the optimizers "
                "or schedulers"
            )

    def _over_budget(self, sharding: ReplicaSharding | None) -> str | None:
        """``snapshot="auto"``: why one more in-memory snapshot would not fit this rank's budget (None: it fits, or
        another mode). Counts the live tensors, copies nothing."""
        o, host = self.options, self.host
        if o.snapshot != "auto":
            return None
        need = state_nbytes(host.model(), host.optimizers())
        if sharding is not None and sharding.world > 1:
            need = -(-need // sharding.world)
        kept = self.store.capacity + 1  # the store's snapshots and the start state
        budget = (
            o.snapshot_budget_mb * 2**20 if o.snapshot_budget_mb is not None else memory_budget(host.local_processes())
        )
        if need * kept <= budget:
            return None
        mib = 2**20
        return (
            f"{o.owner}(snapshot='auto'): one in-memory snapshot of this state takes {need / mib:.1f} MiB on this "
            f"rank and up to {kept} are kept ({need * kept / mib:.1f} MiB), above the snapshot budget of "
            f"{budget / mib:.1f} MiB (snapshot_budget_mb; default: a quarter of this machine's memory per local "
            "process). From here on rollbacks use this fit's checkpoint files (a full-state ModelCheckpoint); "
            "without one a fault is skipped, or halts"
        )

    def handle_fault(self, health: StepHealth) -> None:
        """Diagnose a flagged step, ask the policy, and carry out its decision."""
        o, host = self.options, self.host
        self._drop_stale()
        loss, norm, stats = self._pending_values if health.update_skipped else (None, None, [])
        self._pending_values = (None, None, [])
        event = GuardEvent(health.step, "", "", self.lr_scale, loss=loss, grad_norm=norm)
        self._data_here = False
        if health.update_skipped:
            self.skipped_steps += 1
            nonfinite_cause = health.cause is not None and health.cause.value in _NONFINITE_CAUSES
            if self._batches:
                event.nonfinite_batch = health.nonfinite_batch = any(nonfinite_in(b) for b, _ in self._batches)
                if nonfinite_cause:
                    trace = host.replay(self._batches[-1], health.step)
                    if trace is not None:
                        event.first_nonfinite_module, event.producer = trace.first_nonfinite, trace.producer
            if o.rerun and health.nonfinite_somewhere:  # the same on every rank: they reduce together
                self._rerun_diagnosis(health, event, loss, norm)
            elif o.rerun and health.cause in (GuardCause.LOSS_DIVERGENCE, GuardCause.GRAD_DIVERGENCE):
                self._finite_diagnosis(health, event)
            self.buffers.restore()  # undo what the bad batch (and the replay, the reruns) did to BatchNorm statistics
            if health.nonfinite_grad:
                event.nonfinite_grads = [n for s in stats for n in s.nonfinite_names()][:20]
        if o.check_params and (health.update_skipped or health.weights_damaged):
            params, buffers = self._diagnose(health)
            event.nonfinite_params, event.nonfinite_buffers = params[:20], buffers[:20]
        if o.save_bad_batch and self._batches:
            event.bad_batch_path = host.save_batches(self._batches, health.step)
        if health.cause in _DIVERGENCE_CAUSES:
            health.lr_rose = self._lr_rose_since(self.store.compute())
        found: list[tuple[Snapshot | None, str, str]] = []

        def can_roll_back() -> bool:  # asked only when the policy would roll back (checkpoint files are read then)
            found.append(self._rollback_source())
            return found[-1][0] is not None

        decision = self.policy.decide(health, can_roll_back, why_not=lambda: found[-1][1] if found else "")
        source, _, note = found[-1] if found else (None, "", "")
        event.cause, event.reason = decision.cause.value if decision.cause else "", decision.reason
        held, self._held_evidence = self._held_evidence, None
        if held and decision.cause is GuardCause.LOSS_DIVERGENCE:
            event.reason = "; ".join(r for r in (event.reason, held) if r)
        known, self._known_bad = self._known_bad, None
        if decision.cause is GuardCause.KNOWN_BAD_BATCH and known is not None:
            first = f"first flagged at step {known.step}" if known.step >= 0 else "flagged on another rank"
            what = ", ".join(x for x in (known.cause.replace("_", " "), known.diagnosis) if x)
            event.reason += f" ({first}{': ' + what if what else ''})"
        elif health.update_skipped and self._batches:
            self._record_batches(health, decision)  # only batches found at fault (a rank's own): never a healthy one
        self.cause = decision.cause
        if decision.action is GuardAction.ROLLBACK and source is not None:
            # a divergence soon after the clipping statistics took over from the warm-up cap is theirs (they learned
            # the norms of an unsettled start, then let them through): keep the cap, not the LR cut
            pin = decision.cause in _DIVERGENCE_CAUSES and not self.clip_pinned and host.clipping_in_probation()
            # an optimizer whose eps the weights' dtype cannot divide by writes inf/NaN at any LR (the division
            # comes before the LR scales the update): a lower LR cannot help, so the state is restored at this LR
            numerics = bool(self.numerics_note) and decision.cause is not None and decision.cause.value in _NONFINITE
            scale_then = self.lr_scale
            self._restore(source, 0 if pin or numerics else decision.lr_power)
            if numerics and decision.lr_power:
                note = "; ".join(x for x in (note, "LR kept: a lower LR cannot undo a division by eps") if x)
            if decision.cause in _DIVERGENCE_CAUSES and self.lr_scale < scale_then:  # (the hold ends with the cut)
                note = "; ".join(x for x in (note, self._hold_restored_lr(scale_then)) if x)
            if pin and host.pin_clipping():
                self.clip_pinned = True
                # the policy's "the learning rate looks too high" is the usual reading of a divergence, not this one's
                event.reason = "; ".join(x for x in event.reason.split("; ") if x != "the learning rate looks too high")
                note = "; ".join(x for x in (note, _PIN_NOTE + " instead of an LR cut: the divergence came just "
                                             "after the clipping statistics took over from it") if x)  # fmt: skip
            event.snapshot_step, event.snapshot_path = source.step, source.meta.get("path")
            event.reason = "; ".join(r for r in (event.reason, note) if r)
        if self.numerics_note and (
            event.nonfinite_params or (decision.cause is not None and decision.cause.value in _NONFINITE_CAUSES)
        ):
            event.reason = "; ".join(r for r in (event.reason, f"possible cause: {self.numerics_note}") if r)
        if decision.action is GuardAction.HALT and decision.restore:
            self._restore_for_halt(event, found[-1] if found else self._rollback_source())
        event.lr_scale = self.lr_scale
        if decision.action is GuardAction.HALT:
            self.halt(event)
            return
        event.kind = decision.action.value
        self.outcome = GuardDecision.ROLLED_BACK if event.kind == "rollback" else GuardDecision.SKIPPED
        self.record_event(event)

    def _restore_for_halt(self, event: GuardEvent, found: tuple[Snapshot | None, str, str]) -> None:
        """Before a halt whose state is damaged (or that stands in for a refused rollback): put the model, optimizer
        and scheduler back in the last trusted snapshot, at the LR scale in force, so that what the user keeps (the
        module after ``DivergenceError``, a checkpoint saved after the halt) is the last good state, not the damage.
        The halt report and the event keep what was found in the damaged state."""
        source, _, note = found
        if source is None:
            return
        self._restore(source, 0)
        event.snapshot_step, event.snapshot_path = source.step, source.meta.get("path")
        kept = "halted in the last trusted state (model, optimizer and scheduler restored), not the damaged one"
        event.reason = "; ".join(r for r in (event.reason, note, kept) if r)

    def _rollback_source(self) -> tuple[Snapshot | None, str, str]:
        """The snapshot a rollback would restore, why there is none, and a note on a fallback."""
        tried: list[str] = []
        if self.snapshot_source == "checkpoint":
            snap, tried = self.host.checkpoint_snapshot(self._survived)
            if snap is not None:  # the newer checkpoints it passed over, and why, go into the event
                return snap, "", "passed over: " + "; ".join(tried) if tried else ""
        memory = self.store.compute()  # in checkpoint mode: the in-memory start state (auto: the last that fit)
        listing = "; ".join(tried) if tried else "none written yet"
        if self.snapshot_source == "memory":
            if memory is None and self._stale_note and self.store.snapshots:
                # the optimizers or the model changed and the older snapshots no longer load: the snapshot taken at
                # the change is the only state of this layout; not yet confirmed, it is still better than a halt
                # with the weights as the fault left them
                fresh = self.store.snapshots[-1]
                return (
                    fresh,
                    "",
                    (
                        f"the only snapshot since the change of the optimizers or the model (step {fresh.step}) is "
                        f"not yet confirmed by {self.options.snapshot_confirm_steps} healthy steps: used"
                    ),
                )
            return memory, "" if memory is not None else self._stale_note, ""
        if memory is not None:
            which = "start state" if memory.step == 0 or self.options.snapshot == "checkpoint" else "snapshot"
            note = f"no usable checkpoint file ({listing}): used the in-memory {which} of step {memory.step}"
            return memory, "", note
        return None, f"checkpoint files: {listing}", ""

    def _restore(self, snap: Snapshot, lr_power: int) -> None:
        host = self.host
        before = self.lr_scale
        extra, self.lr_scale = roll_back(
            snap, self.store, host.model(), host.optimizers(), host.schedulers(), self.lr_scale,
            self.options.lr_factor, lr_power, self.options.min_lr_scale,
        )  # fmt: skip
        if self.lr_scale < before:
            self._cut_made()
        host.load_extra_state(extra)
        self._after_state_change()

    def _lr_rose_since(self, snap: Snapshot | None) -> bool:
        """Whether some optimizer's LR at the flagged step is above its LR in ``snap`` (each the largest over its
        param groups, at the user's schedule: the LR scale in force divided out), or that is unknown (no snapshot,
        a split one, another number of optimizers, an LR that cannot be read without a device sync)."""
        if snap is None or snap.sharded is not None or len(snap.optimizers) != len(self._fault_lrs):
            return True
        scale_then = float(snap.meta.get("lr_scale", 1.0))
        if not (scale_then > 0.0 and self.lr_scale > 0.0):
            return True
        for state, now in zip(snap.optimizers, self._fault_lrs):
            then = lr_of(_Groups(state.get("param_groups", ())))
            if now is None or then is None:
                return True
            if now / self.lr_scale > then / scale_then * (1.0 + 1e-6):
                return True
        return False

    def _hold_restored_lr(self, scale_then: float) -> str:
        """After a divergence's rollback: where the schedule had raised an optimizer's LR between the restored state
        and the fault by the stability controller's ``lr_growth`` (2x) or more, the LR is what changed before the run
        diverged, and the schedule would raise it again on the same steps (a warm restart, an LR bug of a few steps):
        hold that optimizer at or below the restored state's LR (at the cut scale) until the LR recovers, as a climb
        that came with the LR's growth is held. Only after a rollback that cut the LR: the recoveries that undo the
        cut release the ceiling. Returns the note for the event ("" when nothing is held)."""
        growth = self.judge_.controller.lr_growth
        notes = []
        for index, (opt, then) in enumerate(zip(self.host.optimizers(), self._fault_lrs)):
            now = lr_of(opt)  # the restored state's LR, cut
            if then is None or now is None or not (now > 0 and scale_then > 0 and self.lr_scale > 0):
                continue
            then_unit, now_unit = then / scale_then, now / self.lr_scale  # at the user's schedule (scale 1)
            if then_unit >= growth * now_unit and self.lr_ceiling.hold(index, opt, now, self.lr_scale):
                notes.append(f"{then:.4g} at the fault, {now_unit:.4g} in the restored state")
        if not notes:
            return ""
        self.lr_ceiling.apply(self.host.optimizers(), self.lr_scale)
        return (
            "the schedule had raised the LR before the divergence (" + "; ".join(notes) + "): it is held at or below "
            "the restored state's (cut) LR while the schedule would raise it, until the LR recovers"
        )

    def _recover_lr(self, step: int) -> None:
        """Sustained healthy training since the last cut: undo one cut (never above the user's schedule); or, with
        no cut to undo, since the LR was held at the best window's (a rollback after a spike that had passed): lift
        the hold."""
        host = self.host
        before = self.lr_scale
        if before < 1.0:
            self.lr_scale = recover_lr(host.optimizers(), host.schedulers(), before, self.options.lr_factor)
        self._since_cut, self._raised = 0, True
        if self.lr_scale >= 1.0:  # back at the user's schedule: no ceiling either
            self.lr_ceiling.release()
        self.lr_recoveries += 1
        reason = (
            f"{self._recovery_steps} healthy steps since the last LR change: one cut undone (lr_scale was "
            f"{before:.4g}; the user's schedule is 1)"
            if before < 1.0
            else f"{self._recovery_steps} healthy steps since the LR was held at the best window's: the hold is "
            "lifted (the user's schedule again)"
        )
        self.record_event(GuardEvent(step, "raise_lr", "lr_recovered", self.lr_scale, reason=reason))

    def _cut_made(self) -> None:
        """An LR cut happened: restart the recovery clock; a cut after a recovery doubles the recovery period (the
        raised LR was too high after all)."""
        self._since_cut = 0
        if self._raised and self._recovery_steps is not None:
            self._recovery_steps *= 2
        self._raised = False

    def warn(self, step: int, finding: StabilityFinding) -> None:
        """Weaker evidence (or the LR at its floor): record and announce the finding, change nothing."""
        self.warnings += 1
        reason = finding.reason
        if finding.act:  # an acting finding that the floor stops
            reason += (
                f"; the LR is at its floor (lr_scale {self.lr_scale:.4g}, min_lr_scale={self.options.min_lr_scale:g}): "
                "not cut further"
            )
        if finding.rule in ("dead_network", DIED_RULE):
            cause = GuardCause.DEAD_NETWORK
        else:  # the LR is blamed only by a finding whose evidence points at it (an acting one, here held by the floor)
            cause = GuardCause.LR_TOO_HIGH if finding.act else GuardCause.INSTABILITY
        event = GuardEvent(step, "warn", cause.value, self.lr_scale, reason=reason)
        event.rule = finding.rule
        self.record_event(event)

    def lower_lr(self, step: int, finding: StabilityFinding, optimizer: Any = None) -> None:
        """The stability controller's cut (``core.recover._rules.stability_cut``: from the untrained state when the
        model is worse than it, from before the climb when the loss climbed, else in place). A climb that came with
        the LR's growth also holds ``optimizer`` (whose loss climbed) at the best window's LR from here on
        (:class:`~lightning_gradguard.core.recover._lr_scaling.LRCeiling`): the schedule that raised it would
        otherwise walk back past the cut within a few steps."""
        host, policy, o = self.host, self.policy, self.options
        dead = finding.rule == "dead_network"
        died = finding.rule == DIED_RULE
        target, self._died_target = self._died_target, None
        why_not = ""
        if (dead or died) and not policy.rollbacks_left:
            why_not = "no restart left (the rollback budget is spent)" if dead else "the rollback budget is spent"
        elif died and target is None:
            why_not = "no kept state was found to do better"
        if why_not:  # an LR cut in place cannot revive dead units: say so, change nothing
            self.warnings += 1
            event = GuardEvent(
                step, "warn", GuardCause.DEAD_NETWORK.value, self.lr_scale,
                reason=f"{finding.reason}; {why_not}: warning only",
            )  # fmt: skip
            event.rule = finding.rule
            self.record_event(event)
            return
        if died and target is not None:  # back to the state the batches preferred (LR cut only for a repeat)
            policy.spend_rollback()
            self._restore(target, finding.lr_power)
            self.outcome = GuardDecision.ROLLED_BACK
            event = GuardEvent(step, "rollback", GuardCause.DEAD_NETWORK.value, self.lr_scale, reason=finding.reason)
            event.rule = finding.rule
            event.snapshot_step = target.step
            self.record_event(event)
            return
        first_pin = dead and not self.clip_pinned  # a first death: the clip cap, not the LR, is the protection
        before = self.lr_scale
        snap, extra, self.lr_scale = stability_cut(
            self.start_state, self.store, replace(finding, lr_power=0) if first_pin else finding,
            policy.rollbacks_left, host.model(), host.optimizers(), host.schedulers(), self.lr_scale, o.lr_factor,
            step, self.judge_.controller.window, o.min_lr_scale,
        )  # fmt: skip
        if snap is not None:
            policy.spend_rollback()
        host.load_extra_state(extra)
        note = ""
        if dead:
            if host.pin_clipping():
                note = "; " + _PIN_NOTE
                if first_pin:
                    self.clip_pinned = True
                    note += (
                        ", instead of an LR cut: the clipping statistics had learned the norms of an exploding "
                        "start and released the cap"
                    )
            elif first_pin:  # no adaptive clipper to hold: the LR is the only protection left
                self.lr_scale = cut_lr(
                    host.optimizers(), host.schedulers(), self.lr_scale, o.lr_factor, finding.lr_power, o.min_lr_scale
                )
        if self.lr_scale < before:
            self._cut_made()
        self.outcome = GuardDecision.ROLLED_BACK if snap is not None else GuardDecision.LOWERED_LR
        self._after_state_change()
        if dead and snap is not None:  # a new run from the untrained state: nothing learned of the dead one holds
            self.judge_.restart_from_scratch()
        kind = "rollback" if snap is not None else "lower_lr"
        reason = finding.reason + note + self._hold_lr(finding, optimizer)
        cause = GuardCause.DEAD_NETWORK if dead or died else GuardCause.LR_TOO_HIGH
        event = GuardEvent(step, kind, cause.value, self.lr_scale, reason=reason)
        event.rule = finding.rule
        event.snapshot_step = snap.step if snap is not None else None
        self.record_event(event)

    def _hold_lr(self, finding: StabilityFinding, optimizer: Any) -> str:
        """After an acting climb corroborated by the LR's growth: the best window's LR becomes the ceiling of the
        optimizer whose loss climbed; returns the note for the event ("" when none is set)."""
        best = float(finding.evidence.get("best_lr", 0.0) or 0.0)
        if finding.rule not in CLIMBING_RULES or not best > 0:
            return ""
        opts = self.host.optimizers()
        raw = getattr(optimizer, "optimizer", optimizer)  # (a LightningOptimizer wraps the torch one)
        index = next((i for i, opt in enumerate(opts) if opt is raw or opt is optimizer), -1)
        if not 0 <= index < len(opts):
            return ""
        if not self.lr_ceiling.hold(index, opts[index], best, self.lr_scale):
            return ""
        self.lr_ceiling.apply(opts, self.lr_scale)
        if finding.lr_power == 0:  # no cut (a spike that passed): the restored schedule may replay it; held
            self._since_cut = 0  # (the hold is lifted after sustained healthy training, as a cut is undone)
        return (
            f"; the LR is held at or below {best:.4g} (the best window's) while the schedule would raise it, until "
            "the LR recovers"
        )

    def halt(self, event: GuardEvent) -> None:
        o, host = self.options, self.host
        self.outcome = GuardDecision.HALTED
        event.kind = "halt"
        event.reason = reason = halt_reason(event)
        out = host.report_dir()
        if out is not None:
            counters = {
                "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks,
                "amp_overflow_steps": self.amp_overflow_steps,
            }
            report = halt_report(
                event, host.optimizers(), self.lr_scale, counters, self.grad_history, self.loss_history,
                self.events, extra=host.report_extra(),
            )  # fmt: skip
            event.report_path = self.report_path = str(out / f"{o.report_name}.json")
            if host.is_global_zero():
                report.write(out, o.report_name)
        self.record_event(event)
        self.halt_error = DivergenceError(reason, step=event.step, report_path=event.report_path)
        host.stop_training()
        if o.raise_on_halt:
            raise self.halt_error

    def _after_state_change(self) -> None:
        self._snap_after = None
        self.judge_.after_state_change()
        self.host.state_changed()

    def _record_batches(self, health: StepHealth, decision: Any) -> None:
        """Put the flagged step's batches that were at fault on the bad-batch record (a rollback's with the
        ``bad_batch_window`` after them) and write the record to the run directory. A batch is at fault on the rank
        whose batch held NaN/inf or whose own rerun found *data*. With several ranks (called on every rank, as every
        decision): one reduce shares each faulty rank's fingerprint digest, so the record is the same everywhere and
        each rank skips its own bad batch, and every rank with it, when met again."""
        host = self.host
        epoch = host.epoch()
        if epoch is None:
            return
        here = bool(health.nonfinite_batch or self._data_here)
        reducer = host.reducer()
        many = reducer is not None and reducer.world_size > 1
        per_rank: list[dict[str, str] | None] = [None] * len(self._batches)
        if many:
            assert reducer is not None
            world, rank, k = reducer.world_size, host.rank(), len(self._batches)
            mine = torch.full((world * k,), -1.0, dtype=torch.float64)
            if here:
                for j, (batch, _) in enumerate(self._batches):
                    mine[rank * k + j] = float(int(short_digest(fingerprint(batch)), 16))
            shared = reducer(mine.to(host.device())).tolist()
            if max(shared) < 0:
                return  # no rank's batch was at fault (e.g. a state or transient fault)
            per_rank = [
                {str(r): f"{int(shared[r * k + j]):012x}" for r in range(world) if shared[r * k + j] >= 0}
                for j in range(k)
            ]
        elif not here:
            return
        window = self.options.bad_batch_window if decision.action is GuardAction.ROLLBACK else 0
        for (batch, batch_idx), ranks in zip(self._batches, per_rank):
            self.bad_batches.add(
                BadBatch(
                    health.step,
                    epoch,
                    batch_idx,
                    "" if ranks is not None else fingerprint(batch),
                    decision.cause.value if decision.cause else "",
                    health.diagnosis or "",
                    decision.action.value,
                    window,
                    ranks=ranks,
                )
            )
        out = host.report_dir()
        if out is not None and host.is_global_zero():
            try:
                self.bad_batches.write(out)
            except OSError as err:  # a full disk must not end the run the guard keeps alive
                host.warn(f"{self.options.owner}: could not write the bad-batch record to {out}: {err}", True)

    def _rerun_diagnosis(self, health: StepHealth, event: GuardEvent, loss: float | None, norm: float | None) -> None:
        """Recompute the flagged step (same state, batch and random numbers; then from the trusted snapshot) and
        classify it (``core/recover/_rerun.py``); every rank agrees on the most serious diagnosis (one reduce). A
        rank whose own loss and gradients were finite reruns nothing and has no say. Where the rerun is a collective
        (:meth:`GuardHost.rerun_is_collective`: sharded parameters), every rank takes every branch together instead
        (:meth:`_rerun_together`)."""
        host = self.host
        reducer = host.reducer()
        many = reducer is not None and reducer.world_size > 1
        self._data_here = False
        if many and host.rerun_is_collective():
            found = self._rerun_together(health, loss, norm)
            code = KINDS.index(found.kind) + 1 if found is not None else 0  # the same on every rank already
        else:
            found = None
            snap = self.store.compute()  # the same on every rank: a snapshot is kept only where every rank took it
            weights = self._trusted_weights(snap) if many and snap is not None else None  # every rank, together
            if health.nonfinite_loss or health.nonfinite_grad:
                weights_bad = bool(nonfinite_weights_and_buffers(host.named_module(), self.inf_by_design)[0])
                same = trusted = None
                if not health.nonfinite_batch and not weights_bad:
                    rngs = self._rngs or [self._window_rng]
                    same = host.rerun(self._batches, rngs, None, health.step)
                    if same is not None and not same.finite and snap is not None:
                        if weights is None:  # one process: only when needed
                            weights = self._trusted_weights(snap)
                        trusted = host.rerun(self._batches, rngs, weights, health.step)
                ordinary = None
                control: list[str] = []
                if trusted is not None and trusted.finite and self._ordinary is not None and host.rerun_takes_items():
                    # it fails only from the current state: does the current state fail on an ordinary batch too
                    # (the last healthy step's), or only on this one?
                    ordinary = host.rerun(*self._ordinary, None, health.step)
                if trusted is not None and not trusted.finite:
                    # it fails from the trusted state too: the batch, unless the module carries non-finite values
                    # where no snapshot looks (a plain tensor attribute: a recurrent hidden state kept across steps)
                    control = nonfinite_attributes(host.model())
                fault = RerunResult(loss, norm)
                trusted_step = snap.step if snap is not None else None
                found = classify(
                    fault, bool(health.nonfinite_batch), weights_bad, same, trusted, trusted_step, ordinary=ordinary,
                    unheld=control,
                )  # fmt: skip
                self._data_here = found is not None and found.kind == "data"  # this rank's own batch failed
            code = KINDS.index(found.kind) + 1 if found is not None else 0
            if many and reducer is not None:
                agreed = reducer(torch.tensor([float(code)], dtype=torch.float64, device=host.device()))
                code = int(agreed.tolist()[0])
        if not code:
            return
        health.diagnosis = event.diagnosis = KINDS[code - 1]
        if found is not None and found.kind == event.diagnosis:
            event.diagnosis_evidence = found.evidence
        else:
            event.diagnosis_evidence = "found on another rank"

    def _ordinary_ready(self) -> Snapshot | None:
        """The trusted snapshot, where a rerun of it and of the last ordinary batch can run on every rank: one
        optimizer, batches the rerun can take, not a collective rerun, a snapshot, and the step's batches and an
        ordinary batch on every rank (agreed by reduces, so every rank takes the same branch); else None."""
        host = self.host
        if len(host.optimizers()) > 1 or not host.rerun_takes_items():
            return None
        if self._many() and host.rerun_is_collective():
            return None
        snap = self.store.compute()  # the same on every rank
        if snap is None or not self._agree_ready():
            return None
        missing = self._ordinary is None
        if self._many():
            (missing,) = any_rank(host.reducer(), missing, device=host.device())
        return None if missing else snap

    def _reruns(self, runs: list[tuple[Any, Any, Any]], step: int) -> list[float] | None:
        """Rerun each of ``runs`` (items, random numbers, weights: None for the current ones) at ``step``: its loss
        (turned as the judge turns it) and gradient norm, in order, each the ranks' largest; None where a rerun gave
        no loss on some rank. BatchNorm statistics moved by the reruns are put back."""
        host = self.host
        results = []
        buffers = BufferCopy()
        buffers.save(host.model())
        try:
            for items, rngs, weights in runs:
                results.append(host.rerun(items, rngs, weights, step))
        finally:
            buffers.restore()
        ok = all(r is not None and r.loss is not None for r in results)
        values: list[float] = []
        for r in results:
            values += [self._sign * float(r.loss or 0.0), float(r.grad_norm or 0.0)] if ok and r else [0.0, 0.0]
        return self._agree_reruns(values, ok)

    def _with_todays_buffers(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        """``weights`` (a snapshot's model state) with the model's buffers as they are now: earlier weights rerun on
        today's objective (a loss weight, label smoothing or curriculum stage kept in a buffer belongs to it;
        BatchNorm's running statistics do not enter a training-mode forward)."""
        out = dict(weights)
        for name, buf in self.host.model().named_buffers():
            if name in out:
                out[name] = buf.detach().clone()
        return out

    def _finite_diagnosis(self, health: StepHealth, event: GuardEvent) -> None:
        """A finite divergence (the loss or the gradient norm far beyond the run's level for several steps) is read
        as a model blown up by its LR, and rolled back. It can be the data instead: a stretch of corrupt batches
        (inputs scaled x1e4, finite) that the model cannot take while it is sound. Tell the two apart as the rerun
        diagnosis does for non-finite steps: rerun this step's batch from the trusted snapshot, and the current state
        on the last ordinary batch. If the batch makes the trusted model jump too (beyond the detector's own
        thresholds) while the current model is within them on the ordinary batch, the batch is at fault: diagnosis
        ``data``, skipped with the LR kept (the policy), and the next such batch is judged again. Otherwise nothing is
        said and the divergence is handled as before. One optimizer, batches the rerun can take; with several ranks
        every rank reruns its own and the values are the ranks' largest (:meth:`_agree_reruns`)."""
        snap = self._ordinary_ready()
        if snap is None or self._ordinary is None:
            return
        detector = self.judge_.stream(self._pending_stream).detector
        rngs = self._rngs or [self._window_rng]
        runs = [(self._batches, rngs, self._trusted_weights(snap)), (*self._ordinary, None)]
        shared = self._reruns(runs, health.step)
        if shared is None:
            return
        t_loss, t_norm, o_loss, o_norm = shared
        batch_bad = detector.beyond_level(t_loss, t_norm)
        if not batch_bad or detector.beyond_level(o_loss, o_norm):
            return  # the trusted model takes this batch, or the current one fails an ordinary batch too: the state
        health.diagnosis = event.diagnosis = "data"
        event.diagnosis_evidence = (
            f"from the trusted state of step {snap.step} this batch gives loss {t_loss:.4g}, grad norm {t_norm:.4g} "
            f"(the run's level: loss {_g(detector.loss_reference)}, norm {_g(detector.grad_reference)}), and the "
            f"model now gives loss {o_loss:.4g} on the last ordinary batch: the model is sound, the batch is not"
        )

    def _rerun_together(self, health: StepHealth, loss: float | None, norm: float | None) -> Diagnosis | None:
        """The rerun diagnosis where a rerun is a collective: every rank takes the same branches. One reduce agrees
        on whether the batch, the weights or the loss were non-finite anywhere; then every rank reruns from the same
        state and one reduce agrees on its finiteness (non-finite on any rank: not finite), and, where it
        reproduced, the same from the trusted snapshot. The diagnosis is then the same on every rank."""
        host = self.host
        reducer, device = host.reducer(), host.device()
        batch_here = bool(health.nonfinite_batch)
        weights_here = bool(nonfinite_weights_and_buffers(host.named_module(), self.inf_by_design)[0])
        batch_bad, weights_bad, loss_bad = any_rank(
            reducer, batch_here, weights_here, bool(health.nonfinite_loss), device=device
        )

        def agreed(result: RerunResult | None) -> RerunResult | None:  # one reduce; None on any rank: None on all
            failed, bad = any_rank(reducer, result is None, result is not None and not result.finite, device=device)
            if failed or result is None:
                return None
            result.others_finite = not bad or not result.finite
            return result

        same = trusted = snap = None
        if not batch_bad and not weights_bad:
            rngs = self._rngs or [self._window_rng]
            same = agreed(host.rerun(self._batches, rngs, None, health.step))
            if same is not None and not same.finite:
                snap = self.store.compute()  # the same on every rank
                if snap is not None:
                    weights = self._trusted_weights(snap)
                    trusted = agreed(host.rerun(self._batches, rngs, weights, health.step))
        trusted_step = snap.step if snap is not None else None
        fault = RerunResult(loss, norm)
        found = classify(fault, batch_bad, weights_bad, same, trusted, trusted_step, loss_nonfinite=loss_bad)
        # data: the batch fails from the trusted state; on this rank's batch only where its own rerun failed there
        self._data_here = found is not None and found.kind == "data" and trusted is not None and not trusted.finite_here
        if found is not None and (batch_bad and not batch_here or not batch_bad and weights_bad and not weights_here):
            found.evidence += " (on another rank)"
        return found

    def _trusted_weights(self, snap: Snapshot) -> dict[str, Any]:
        """The model state of the trusted snapshot ``snap`` for a rerun from it. With several ranks, every rank calls
        this together: a snapshot that each rank holds only a part of (DDP, ``shard_snapshots``) is gathered here (a
        collective that moves the model's part only)."""
        return snap.whole_model()

    def _diagnose(self, health: StepHealth) -> tuple[list[str], list[str]]:
        """Names of this rank's non-finite weights and buffers; the health flags OR-ed over the ranks."""
        host = self.host
        names = nonfinite_weights_and_buffers(host.named_module(), self.inf_by_design)
        health.nonfinite_params, health.nonfinite_buffers = any_rank(
            host.reducer(), bool(names[0]), bool(names[1]), device=host.device()
        )
        return names

    def _survived(self, ckpt_step: int) -> bool:
        current = self._current_step
        faults = [int(e["step"]) for e in self.events if int(e["step"]) >= ckpt_step]
        first_bad = min(faults) if faults else current
        return ckpt_step + self.options.snapshot_confirm_steps <= min(first_bad, current)

    @property
    def _current_step(self) -> int:
        history = self.judge_.grad_history
        return int(history[-1][0]) if history else 0

    # ------------------------------------------------------------------ output
    def record_event(self, event: GuardEvent) -> None:
        """Keep ``event`` and write it: announced, as text and with the guard's scalars, at the event's step."""
        self.events.append(event.to_dict())
        line = event.line(self.options.owner)
        host = self.host
        shown = self.quota.line(event.step, event.kind, event.cause, line, rule=event.rule)
        if shown is not None:
            host.announce(shown)
        host.emit_text(_TEXT_TAG, line, event.step)
        self.write_scalars(event.step)
        self._picture(event.step, event.kind)

    def scalars(self) -> dict[str, float]:
        """The guard's scalars now, ending the interval (flagged steps and the largest loss since the last call)."""
        values: dict[str, float] = {
            tag("skipped_steps"): float(self.skipped_steps),
            tag("rollbacks"): float(self.rollbacks),
            tag("warnings"): float(self.warnings),
            tag("lr_scale"): self.lr_scale,
            tag("flagged_steps"): float(self._flagged),
        }
        if self._loss_max is not None:
            values[tag("loss_max")] = self._loss_max
        for idx, stream in self.judge_.streams.items():  # each optimizer's loss stream: its own health number
            score = stream.spikes.score
            if score is not None:
                values[tag("spike_score", idx)] = score
        if self.snapshot_ms is not None:  # what the in-memory snapshots cost this rank (issue 28)
            values[tag("snapshot_mb")] = self.snapshot_bytes() / 2**20
            values[tag("snapshot_ms")] = self.snapshot_ms
        if self.host.scaler() is not None:
            values[tag("amp_overflow_steps")] = float(self.amp_overflow_steps)
        self._flagged, self._loss_max = 0, None
        return values

    def write_scalars(self, step: int) -> None:
        """Write :meth:`scalars` through the host at ``step``; a finite loss peak of the steps before a non-finite loss
        goes first, at the step before it (else the NaN, the interval's value, would hide the blow-up before it)."""
        before, self._loss_before = self._loss_before, None
        if before is not None and before[0] < step:
            self.host.emit_scalars({tag("loss_max"): before[1]}, before[0])
        self.host.emit_scalars(self.scalars(), step)

    def finish(self, step: int, reason: str = "end") -> None:
        """The end of the fit, or an exception (after the adapter wrote its last scalars; ``step``: the step count,
        one past the last step trained): the last value of every scalar that ends before the last step trained, and
        the overview figure, at ``step``; and a line counting the skips the terminal was not shown one by one."""
        self._picture(step, reason, before=step - 1)
        closing = self.quota.closing_line(self.options.owner)
        if closing is not None:
            self.host.announce(closing)

    def _picture(self, step: int, reason: str, before: int | None = None) -> None:
        """Everything at ``step``: the last value of every scalar last written before ``before`` (None: ``step``;
        the LR and the step's norm as they are now), then the overview figure (both only on events, a halt and the
        end: never on a healthy step)."""
        host = self.host
        fresh: dict[str, float] = {}
        optimizers = host.optimizers()
        for idx, opt in enumerate(optimizers):
            groups = getattr(opt, "param_groups", None)
            lr = groups[0].get("lr") if groups else None
            if isinstance(lr, torch.Tensor) and lr.is_cpu:
                lr = lr.item()
            if isinstance(lr, (int, float)):
                fresh[tag("lr", idx)] = float(lr)
        history = self.judge_.grad_history
        if history and int(history[-1][0]) == step and len(optimizers) <= 1:  # the step's judged norm
            fresh[tag("grad_norm")] = float(history[-1][1])
        host.repeat_scalars(step, fresh, before)
        host.emit_overview(step, reason, self.events, self.judge_.loss_history)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "amp_overflow_steps": self.amp_overflow_steps,
            "lr_scale": self.lr_scale,
            "warnings": self.warnings,
            "lr_recovery": [self.lr_recoveries, self._since_cut, self._recovery_steps, self._raised],
            "lr_ceiling": self.lr_ceiling.state_dict(),
            "clip_pinned": self.clip_pinned,
            "events": [dict(e) for e in self.events],
            "reason": self.outcome.value,
            "policy": self.policy.state_dict(),
            **self.judge_.state_dict(),
            "snapshots": self.store.state_dict()["snapshots"],
            "bad_batches": self.bad_batches.state_dict(),
            "announced": self.quota.state_dict(),
            "skip_rate": self.skip_rate.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters, events, policy and detector state (the scaled LR itself comes back with the optimizer and
        scheduler states the loop restores). The judge's last row carries into the next step."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.amp_overflow_steps = int(state.get("amp_overflow_steps", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.warnings = int(state.get("warnings", 0))
        rec = list(state.get("lr_recovery") or [0, 0, self.options.lr_recovery_steps, False])
        self.lr_recoveries, self._since_cut = int(rec[0]), int(rec[1])
        self._recovery_steps = None if rec[2] is None else int(rec[2])
        self._raised = bool(rec[3])
        self.lr_ceiling.load_state_dict(state.get("lr_ceiling"))
        self.clip_pinned = bool(state.get("clip_pinned", False))
        self.events = [dict(e) for e in state.get("events", [])]
        self.policy.load_state_dict(state.get("policy") or state)
        values = {d.value for d in GuardDecision}
        reason = state.get("reason")
        self.outcome = GuardDecision(reason if reason in values else "healthy")
        self.judge_.load_state_dict(state)
        self.bad_batches.load_state_dict(state.get("bad_batches") or {})
        self.quota.load_state_dict(state.get("announced"))
        self.skip_rate.load_state_dict(state.get("skip_rate"))
        self._resumed = True


#: the stability rules whose action (a climb while the LR grew) also sets an LR ceiling
CLIMBING_RULES = ("loss_climbing", "loss_above_best")
#: a network that died after learning: tested on the batches as a climb is, and acts only when that test ran
DIED_RULE = "dead_after_learning"


def _g(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.4g}"


def maximizes(optimizer: Any) -> bool:
    """Whether ``optimizer`` (torch's, or a wrapper of one) ascends its loss: ``maximize=True`` in a param group."""
    raw = getattr(optimizer, "optimizer", optimizer)  # (a LightningOptimizer wraps the torch one)
    return any(bool(group.get("maximize", False)) for group in getattr(raw, "param_groups", ()))


@dataclass
class _Groups:
    """Param groups read from a saved optimizer state, for :func:`lr_of`."""

    param_groups: Any


def lr_of(optimizer: Any) -> float | None:
    """The largest LR of ``optimizer``'s param groups as a host float (None where reading it would synchronise a
    device, or where there is none)."""
    best: float | None = None
    for group in getattr(optimizer, "param_groups", ()):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            if not lr.is_cpu:
                return None
            lr = lr.item()
        if isinstance(lr, (int, float)) and (best is None or lr > best):
            best = float(lr)
    return best


class EngineField:
    """An adapter attribute that reads and writes the engine's value of the same name (``options=True``: the
    engine's :class:`~lightning_gradguard.core.engine.GuardOptions`; ``source``: the engine's name for it, when it
    differs), so adapters keep their public attributes
    without a second copy of the state. The adapter keeps its engine in ``self.engine``."""

    def __init__(self, source: str = "", options: bool = False) -> None:
        self.options = options
        self.name = source

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def _target(self, obj: Any) -> Any:
        engine = obj.__dict__["engine"]
        return engine.options if self.options else engine

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(self._target(obj), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(self._target(obj), self.name, value)
