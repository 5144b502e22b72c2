"""The guard's decision: given what one optimizer step looked like, skip it, roll back, halt, or go on.

Everything here is plain data in, plain data out. :class:`StepHealth` says what was wrong with a step (the
callback fills it from one host read and one cross-rank reduce); :meth:`GuardPolicy.decide` returns a
:class:`Decision` (action, cause, readable reason) and keeps the little state the policy needs between steps
(consecutive skips, rollbacks done, the step of the last fault); :class:`GuardEvent` is the record of what was done,
kept by the callback and written to logs, TensorBoard and the halt report.

The four policies (``action=``):

- ``"auto"`` (the default): a fault that can be traced to the batch is skipped, with the model's buffers restored
  and no LR cut. Traced to the batch means: the weights are finite and either the input batch held NaN/inf (bad data
  never costs progress or LR, however often it comes, and never makes a later fault a repeat) or the loss and
  gradient norm were in their healthy range in the steps before the fault (:attr:`StepHealth.unsettled` is False).
  Everything else rolls back and lowers the LR: a fault repeating within ``repeat_window`` steps after an unsettled
  stretch, more than ``max_consecutive_skips`` faults in a row (no healthy step between them), non-finite weights or
  buffers, finite divergence (the loss or gradient norm leaving its healthy range), a collapsing AMP loss scale.
  After ``max_rollbacks`` rollbacks, halt. A divergence that repeats soon after a divergence rollback cuts harder:
  the exponent of the LR factor doubles each time (``lr_factor``, then ``lr_factor**2``, ``lr_factor**4``), a
  geometric search for a stable LR. Faults of the data and transient faults (a rerun did not reproduce them) never
  make a later state fault a repeat.
- ``"skip"``: skip; non-finite weights or buffers (which no skip can undo), divergence, or more than
  ``max_consecutive_skips`` flagged steps in a row escalate at once to ``escalate_to``.
- ``"rollback"``: roll back (halt after ``max_rollbacks``).
- ``"halt"``: halt.

A rollback that has nothing to roll back to becomes a skip when the weights are finite (a skip with restored
buffers undoes the step exactly), and a halt otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

POLICIES = ("auto", "rollback", "skip", "halt")


#: why a fault that fails every batch from the trusted state too halts at once
_UNRESTORABLE_REASON = (
    "no rollback can repair it: the module carries NaN in plain tensor attributes that no snapshot holds (see the "
    "diagnosis); register such state as a buffer so that a rollback restores it"
)


class GuardCause(Enum):
    """What made the guard act (``GuardEvent.cause``)."""

    NONFINITE_LOSS = "nonfinite_loss"
    NONFINITE_GRAD = "nonfinite_grad"
    NONFINITE_PARAMS = "nonfinite_params"
    NONFINITE_BUFFERS = "nonfinite_buffers"
    LOSS_SPIKE = "loss_spike"
    LOSS_DIVERGENCE = "loss_divergence"
    GRAD_DIVERGENCE = "grad_divergence"
    AMP_SCALE_COLLAPSE = "amp_scale_collapse"
    LR_TOO_HIGH = "lr_too_high"  # the stability controller's cause: no fault yet, but the LR looks too high
    INSTABILITY = "instability"  # a warning: a climbing loss, rising norm, ... with nothing that blames the LR
    DEAD_NETWORK = "dead_network"  # a warning: flat loss, collapsed gradients (the units died)
    OTHER_RANK = "other_rank"  # another DDP rank flagged the step; this rank saw nothing wrong
    KNOWN_BAD_BATCH = "known_bad_batch"  # a batch on the bad-batch record, met again (after a resume or rollback)


class GuardDecision(Enum):
    """What the guard did at the last optimizer step (``NaNGuard.reason``, ``GradGuard.reason``)."""

    HEALTHY = "healthy"
    AMP_OVERFLOW = "amp_overflow"  # the GradScaler skipped an overflow step; not a divergence
    SKIPPED = "skipped"
    ROLLED_BACK = "rolled_back"
    LOWERED_LR = "lowered_lr"
    HALTED = "halted"


class GuardAction(Enum):
    """What the guard does about a step."""

    NONE = "none"
    SKIP = "skip"
    ROLLBACK = "rollback"
    LOWER_LR = "lower_lr"  # the stability controller: cut the LR, keep the state
    HALT = "halt"


# causes whose damage is already in the weights or the trajectory: no skip can undo them
_STATE_DAMAGE = {
    GuardCause.NONFINITE_PARAMS,
    GuardCause.NONFINITE_BUFFERS,
    GuardCause.LOSS_DIVERGENCE,
    GuardCause.GRAD_DIVERGENCE,
    GuardCause.AMP_SCALE_COLLAPSE,
}
_DIVERGENCE = {GuardCause.LOSS_DIVERGENCE, GuardCause.GRAD_DIVERGENCE}
# the reason given for a cause in _STATE_DAMAGE (the event states the cause itself, and its kind says what was done)
_DAMAGE_REASON = "it cannot be undone by skipping"
_COLLAPSE_REASON = "the loss scale collapsed (the GradScaler kept halving it, no update got through): " + _DAMAGE_REASON


@dataclass
class StepHealth:
    """What was wrong with one optimizer step (all False: a healthy step).

    Attributes:
        step: the Trainer's ``global_step`` of the step.
        nonfinite_loss: the training loss was NaN/inf.
        nonfinite_grad: some gradient element was NaN/inf.
        nonfinite_params: the weights are non-finite (found on the fault path or before trusting a snapshot).
        nonfinite_buffers: a floating buffer (e.g. BatchNorm running statistics) is non-finite.
        nonfinite_batch: the input batch held NaN/inf (diagnosis only: it makes a fault traceable to the batch).
        loss_spike: the opt-in loss z-score test fired.
        loss_divergence: the loss left its healthy range (see ``core/guard/_divergence.py``).
        grad_divergence: the gradient norm left its healthy range.
        scale_collapse: the AMP loss scale fell below its floor.
        other_rank: another rank flagged the step (under DDP; this rank saw nothing).
        unsettled: the loss or gradient norm was far above its healthy range in the steps just before this one
            (``DivergenceDetector.unsettled``): a fault then belongs to the trajectory, not to the batch. For a
            divergence: before its far values began, or the run (or its restart after a rollback) is younger than
            the detector's ``recent`` steps (``DivergenceDetector.unsettled_before``).
        lr_rose: the LR the step ran at is above the trusted snapshot's (at the user's schedule), or that is
            unknown: a divergence may then be the LR's. Set by the guard engine for divergences.
        update_skipped: the step's update was dropped before it happened (False when the fault is found after it).
        diagnosis: what a rerun of the step found (``core/recover/_rerun.py``): ``"transient"`` (it did not
            reproduce), ``"data"`` (the batch fails from a trusted state too), ``"state"`` (it fails only from the
            current state), ``"reproducible"`` (undecided), ``"unrestorable"`` (the batch fails from the trusted
            state too while the module carries NaN in plain tensor attributes no snapshot holds; the ``auto``
            policy halts), or None (no rerun).
        nonfinite_somewhere: some rank's loss or gradients were non-finite at this step (the same on every rank:
            the ranks rerun, or not, together).
        known_bad_batch: the step's batch is on the bad-batch record (``core/recover/_bad_batches.py``): skipped.
    """

    step: int
    nonfinite_loss: bool = False
    nonfinite_grad: bool = False
    nonfinite_params: bool = False
    nonfinite_buffers: bool = False
    nonfinite_batch: bool = False
    loss_spike: bool = False
    loss_divergence: bool = False
    grad_divergence: bool = False
    scale_collapse: bool = False
    other_rank: bool = False
    unsettled: bool = False
    lr_rose: bool = True
    update_skipped: bool = True
    diagnosis: str | None = None
    nonfinite_somewhere: bool = False
    known_bad_batch: bool = False

    @property
    def cause(self) -> GuardCause | None:
        """The most telling cause (weights before gradients before loss), or None for a healthy step."""
        for flag, cause in (
            (self.nonfinite_params, GuardCause.NONFINITE_PARAMS),
            (self.nonfinite_buffers, GuardCause.NONFINITE_BUFFERS),
            (self.nonfinite_loss, GuardCause.NONFINITE_LOSS),
            (self.scale_collapse, GuardCause.AMP_SCALE_COLLAPSE),
            (self.nonfinite_grad, GuardCause.NONFINITE_GRAD),
            (self.loss_divergence, GuardCause.LOSS_DIVERGENCE),
            (self.grad_divergence, GuardCause.GRAD_DIVERGENCE),
            (self.loss_spike, GuardCause.LOSS_SPIKE),
            (self.other_rank, GuardCause.OTHER_RANK),
            (self.known_bad_batch, GuardCause.KNOWN_BAD_BATCH),
        ):
            if flag:
                return cause
        return None

    @property
    def weights_damaged(self) -> bool:
        return self.nonfinite_params or self.nonfinite_buffers

    @property
    def state_fault(self) -> bool:
        """The state is at fault: non-finite weights or buffers, or a rerun that fails only from the current state."""
        return self.weights_damaged or self.diagnosis == "state"


@dataclass
class Decision:
    """The policy's answer for one step."""

    action: GuardAction
    cause: GuardCause | None = None
    reason: str = ""
    lr_power: int = 1  # a rollback multiplies the LR by lr_factor ** lr_power
    # a halt whose state is not worth keeping (the damage is in the weights or the trajectory, or the halt stands in
    # for a rollback the budget refused): the caller restores the last trusted snapshot before it halts
    restore: bool = False


@dataclass
class GuardEvent:
    """One thing the guard did, as kept in ``NaNGuard.events`` (through :meth:`to_dict`) and in reports.

    Attributes:
        step: the Trainer's ``global_step`` of the step.
        kind: ``"skip"``, ``"rollback"``, ``"lower_lr"``, ``"halt"`` or ``"warn"`` (weaker evidence: recorded and
            announced, nothing changed).
        cause: a :class:`GuardCause` value.
        lr_scale: the cumulative LR factor after the event.
        reason: why this action (plain words; beside the cause, so it does not name the cause again, except a halt's,
            which is also the :class:`~lightning_gradguard.DivergenceError` message).
        loss, grad_norm: the step's loss and pre-clip gradient norm when known.
        snapshot_step, snapshot_path: what a rollback restored.
        nonfinite_batch: whether the input batch held NaN/inf (None: not checked).
        first_nonfinite_module: the first module whose output went non-finite when the batch was replayed.
        producer: the module that produced the first NaN (or unabsorbed inf) from finite inputs when the batch was
            replayed (``core/recover/_fault_trace.py``); the modules after it only passed it on.
        diagnosis, diagnosis_evidence: what a rerun of the step found (``transient``, ``data``, ``state``,
            ``reproducible``) and the numbers it compared, in words.
        nonfinite_grads, nonfinite_params, nonfinite_buffers: names, first ones first (at most 20).
        bad_batch_path, report_path: files written for this event.
        rule: for a stability finding (cause ``lr_too_high``, ``instability`` or ``dead_network``), the stability rule
            that fired (``StabilityFinding.rule``, e.g. ``"loss_climbing"``).
    """

    step: int
    kind: str
    cause: str
    lr_scale: float
    reason: str = ""
    loss: float | None = None
    grad_norm: float | None = None
    snapshot_step: int | None = None
    snapshot_path: str | None = None
    nonfinite_batch: bool | None = None
    first_nonfinite_module: str | None = None
    producer: str | None = None
    diagnosis: str | None = None
    diagnosis_evidence: str | None = None
    nonfinite_grads: list[str] = field(default_factory=list)
    nonfinite_params: list[str] = field(default_factory=list)
    nonfinite_buffers: list[str] = field(default_factory=list)
    bad_batch_path: str | None = None
    report_path: str | None = None
    rule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data without the empty fields (what ``NaNGuard.events`` holds and checkpoints store)."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != [] and v != ""}

    def line(self, owner: str = "NaNGuard") -> str:
        """One readable line: who, what, when, why, what was restored and what was found, each said once (no Python
        reprs).

        The cause comes first, then the reason without what repeats the cause or the kind (a halt's reason begins
        with the cause, a stability finding's with "learning rate looks too high", a warning's ends with "warning
        only"), then the restored snapshot, the LR scale and the diagnosis.

        Example:
            >>> event = GuardEvent(7, "halt", "nonfinite_loss", 0.5, reason="nonfinite loss; action='halt'")
            >>> event.line()
            "NaNGuard halt at step 7: nonfinite loss; action='halt'; lr_scale=0.5"
        """
        cause = self.cause.replace("_", " ")
        names = {
            "nonfinite_params": self.nonfinite_params,
            "nonfinite_buffers": self.nonfinite_buffers,
            "nonfinite_grad": self.nonfinite_grads,
        }.get(self.cause)
        if cause and names:  # the cause with its names, instead of the cause and then the names again
            cause += " in " + ", ".join(names[:3])
        parts = [f"{owner} {self.kind} at step {self.step}" + (f": {cause}" if cause else "")]
        reason = _unrepeated(self.reason, self.cause, self.kind)
        if reason:
            parts.append(reason)
        if self.snapshot_step is not None:
            parts.append(f"restored the state of step {self.snapshot_step}")
        parts.append(f"lr_scale={self.lr_scale:.6g}")
        if self.nonfinite_batch is not None:
            parts.append("the input batch held NaN/inf" if self.nonfinite_batch else "the input batch was finite")
        if self.producer:
            parts.append(f"produced by {self.producer}")
        elif self.first_nonfinite_module:
            parts.append(f"first non-finite output: {self.first_nonfinite_module}")
        if self.diagnosis:
            evidence = f" ({self.diagnosis_evidence})" if self.diagnosis_evidence else ""
            parts.append(f"rerun diagnosis: {self.diagnosis}{evidence}")
        for named_cause, label, listed in (
            ("nonfinite_params", "non-finite weights", self.nonfinite_params),
            ("nonfinite_buffers", "non-finite buffers", self.nonfinite_buffers),
            ("nonfinite_grad", "first non-finite gradients", self.nonfinite_grads),
        ):
            if listed and self.cause != named_cause:  # names not already given with the cause
                parts.append(f"{label}: " + ", ".join(listed[:3]))
        if self.report_path:
            parts.append(f"report: {self.report_path}")
        return "; ".join(parts)


# openings of a reason that say the cause again in other words (the event line shows the cause already)
_RESTATED = {
    "lr_too_high": ("learning rate looks too high", "the learning rate looks too high"),
    "dead_network": ("the network looks dead",),
    "instability": ("the run looks unstable",),
}
# a warning's reason says "warning only" where the kind already says "warn"
_WARNING_ONLY = re.compile(r" \(warning only\)|[:;] warning only")


def _unrepeated(reason: str, cause: str, kind: str) -> str:
    """``reason`` without an opening that restates ``cause`` (a halt's reason is "<cause>; <why>") and, for a
    warning, without "warning only".

    Example:
        >>> _unrepeated("nonfinite loss; action='halt'", "nonfinite_loss", "halt")
        "action='halt'"
        >>> _unrepeated("learning rate looks too high: the loss climbed (warning only)", "lr_too_high", "warn")
        'the loss climbed'
    """
    for lead in (cause.replace("_", " "), *_RESTATED.get(cause, ())):
        if not lead:
            continue
        if reason == lead:
            reason = ""
        elif reason.startswith((lead + "; ", lead + ": ")):
            reason = reason[len(lead) + 2 :]
    if kind == "warn":
        reason = _WARNING_ONLY.sub("", reason)
    return reason


class GuardPolicy:
    """Chooses the action for a flagged step (see the module docstring for the four policies).

    Args:
        action: ``"auto"``, ``"rollback"``, ``"skip"`` or ``"halt"``.
        max_consecutive_skips: ``skip`` and ``auto``: flagged steps in a row allowed before escalating (``auto``
            rolls back; faults whose input batch held NaN/inf are always skipped).
        escalate_to: ``skip``: ``"rollback"`` or ``"halt"``.
        max_rollbacks: rollbacks allowed; the next fault that needs one halts.
        repeat_window: ``auto``: a fault within this many steps of the previous one counts as repeated.
        refill_steps: healthy steps in a row that give one rollback back to the budget (None: never).

    Example:
        >>> policy = GuardPolicy("auto")
        >>> policy.decide(StepHealth(step=5, nonfinite_loss=True), can_roll_back=True).action
        <GuardAction.SKIP: 'skip'>
        >>> policy.decide(StepHealth(step=9, nonfinite_loss=True), can_roll_back=True).action  # healthy steps between
        <GuardAction.SKIP: 'skip'>
        >>> policy.decide(StepHealth(step=12, nonfinite_loss=True, unsettled=True), can_roll_back=True).action
        <GuardAction.ROLLBACK: 'rollback'>
    """

    def __init__(
        self,
        action: str = "auto",
        max_consecutive_skips: int = 3,
        escalate_to: str = "rollback",
        max_rollbacks: int = 3,
        repeat_window: int = 100,
        refill_steps: int | None = None,
    ) -> None:
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.escalate_to = escalate_to
        self.max_rollbacks = max_rollbacks
        self.repeat_window = repeat_window
        self.refill_steps = refill_steps
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.refunded = 0
        self.healthy_run = 0
        self.last_fault_step: int | None = None
        #: the step of the last fault that was not the data's and not transient (what makes a state fault a repeat)
        self.last_trajectory_fault: int | None = None
        self.divergence_streak = 0

    def healthy(self) -> None:
        """Count a healthy step (ends a run of skips). Every ``refill_steps`` healthy steps in a row give one
        rollback back to the budget: a week-long run may meet several unrelated faults, far apart."""
        self.consecutive_skips = 0
        self.healthy_run += 1
        refill = self.refill_steps
        if refill is not None and self.healthy_run >= refill:
            self.healthy_run = 0
            if self.rollbacks > 0:
                self.rollbacks -= 1
                self.refunded += 1

    def decide(
        self,
        health: StepHealth,
        can_roll_back: bool | Callable[[], bool],
        why_not: str | Callable[[], str] = "",
    ) -> Decision:
        """The action for a flagged step, and update the policy's counters as if it was carried out (the caller
        carries out a rollback only when ``can_roll_back`` said one is possible, so the budget is spent here once).

        Args:
            health: what was wrong.
            can_roll_back: whether a trusted, finite snapshot exists; a callable is asked only when the policy would
                roll back (finding the snapshot may read checkpoint files).
            why_not: what the reason adds when no rollback is possible (e.g. which checkpoint files were passed
                over); a callable is asked only then.
        """
        cause = health.cause
        if cause is None:
            self.healthy()
            return Decision(GuardAction.NONE)
        if cause is GuardCause.KNOWN_BAD_BATCH:  # the record's decision, taken before: no fault of this run's now
            return Decision(GuardAction.SKIP, cause, "on the bad-batch record: skipped again, LR kept", 0)
        repeated = self.last_fault_step is not None and health.step - self.last_fault_step <= self.repeat_window
        # a fault of the data (the input batch held NaN/inf, or a rerun found the batch failing from a trusted state
        # too) or a transient one (a rerun of the step did not reproduce it) says nothing about the trajectory: it
        # does not make a later *state* fault a repeat (a weight corrupted in place is restored at the schedule's
        # LR), nor end the stretch of healthy steps that refills the rollback budget (a corrupt record every 40
        # steps would otherwise turn every unrelated state fault into a "repeat" that cuts the LR, and never let the
        # budget refill). It still counts for the skip and divergence decisions: a divergence among corrupt batches
        # (one the data diagnosis missed) comes out of no calm stretch.
        trajectory_repeat = (
            self.last_trajectory_fault is not None and health.step - self.last_trajectory_fault <= self.repeat_window
        )
        self.last_fault_step = health.step
        if not (health.nonfinite_batch or health.diagnosis in ("data", "transient")):
            self.last_trajectory_fault = health.step
            self.healthy_run = 0
        damaged = cause in _STATE_DAMAGE or health.state_fault
        action, why = self._choose(cause, damaged, repeated, health)
        restore = damaged
        if action is GuardAction.ROLLBACK:
            restore = True
            if self.rollbacks >= self.max_rollbacks:
                action, why = (
                    GuardAction.HALT,
                    f"fault after {self.rollbacks} rollback{'s' if self.rollbacks != 1 else ''} "
                    f"(max_rollbacks={self.max_rollbacks})",
                )
            elif not (can_roll_back() if callable(can_roll_back) else can_roll_back):
                detail = why_not() if callable(why_not) else why_not
                detail = f" ({detail})" if detail else ""
                if health.weights_damaged:
                    action, why = (
                        GuardAction.HALT,
                        f"no finite snapshot to roll back to and the weights are non-finite{detail}",
                    )
                else:
                    action, why = GuardAction.SKIP, f"no trusted snapshot yet to roll back to{detail}"
        data = cause in _DIVERGENCE and health.diagnosis == "data" and action is GuardAction.SKIP
        # a divergence out of calm steps at an LR that did not rise (a weight corrupted to a huge finite value, an
        # optimizer state reset): nothing says the LR was at fault; the state is restored at the schedule's LR, and
        # a repeat (within repeat_window) is the trajectory's and cuts it
        sudden = (
            cause in _DIVERGENCE
            and action is GuardAction.ROLLBACK
            and self.action == "auto"
            and not (repeated or health.unsettled or health.lr_rose)
        )
        if (
            not data
            and not sudden
            and (
                cause in _DIVERGENCE
                or (
                    action is GuardAction.HALT
                    and self.rollbacks
                    and not health.weights_damaged
                    and health.diagnosis != "unrestorable"
                )
            )
        ):
            why = (why + "; " if why else "") + "the learning rate looks too high"
        if action is GuardAction.SKIP:
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        power = 1
        if action is GuardAction.ROLLBACK:
            self.rollbacks += 1
            # divergence again soon after a divergence rollback: the LR is far too high, and halving it once more
            # would spend the next rollback on the same lesson; each repeat doubles the exponent of the cut
            self.divergence_streak = self.divergence_streak + 1 if cause in _DIVERGENCE and repeated else 0
            if sudden:
                power, self.divergence_streak = 0, 0  # (a repeat is then the streak's second: lr_factor**2)
                why = (why + "; " if why else "") + (
                    "a sudden divergence after calm steps at an LR that did not rise: LR kept (a repeat cuts it)"
                )
            elif cause in _DIVERGENCE:
                power = min(2 ** max(self.divergence_streak, 0), 64)
            elif self.action == "auto" and health.diagnosis in ("transient", "data"):
                power = 0  # a rerun cleared the state: whatever made this a rollback, the LR was not at fault
            elif self.action == "auto" and health.nonfinite_batch:
                # the state is damaged, but by the batch's NaN/inf (a training_step that moves the weights along
                # its own gradient, as sharpness-aware minimisation does): the LR was not at fault
                power = 0
                why = (why + "; " if why else "") + "the damage came with a non-finite input batch: LR kept"
            elif self.action == "auto" and health.state_fault and not (trajectory_repeat or health.unsettled):
                # an isolated fault after a healthy stretch (a weight corrupted in place, a transient hardware
                # fault): nothing says the LR was at fault, so the state is restored at the schedule's LR
                power = 0
                first = health.step < self.repeat_window  # (no stretch of healthy steps before it yet)
                what = "a first fault at the start of the run" if first else "an isolated fault after healthy steps"
                why = (why + "; " if why else "") + f"{what}: LR kept"
        return Decision(action, cause, why, power, restore=action is GuardAction.HALT and restore)

    @property
    def rollbacks_left(self) -> bool:
        """Whether the budget allows another rollback."""
        return self.rollbacks < self.max_rollbacks

    def spend_rollback(self) -> None:
        """A rollback made outside :meth:`decide` (a stability cut that restarts from a snapshot)."""
        self.rollbacks += 1

    def _choose(self, cause: GuardCause, damaged: bool, repeated: bool, health: StepHealth) -> tuple[GuardAction, str]:
        if self.action == "halt":
            return GuardAction.HALT, "action='halt'"
        if self.action == "rollback":
            return GuardAction.ROLLBACK, ""
        in_a_row = self.consecutive_skips + 1 > self.max_consecutive_skips
        if self.action == "skip":
            escalate = GuardAction(self.escalate_to)
            if damaged:
                return escalate, _DAMAGE_REASON
            if in_a_row:
                return escalate, (
                    f"{self.consecutive_skips + 1} flagged steps in a row "
                    f"(max_consecutive_skips={self.max_consecutive_skips})"
                )
            return GuardAction.SKIP, ""
        # auto
        if cause is GuardCause.AMP_SCALE_COLLAPSE:
            return GuardAction.ROLLBACK, _COLLAPSE_REASON
        if health.diagnosis == "unrestorable":  # non-finite state no snapshot holds: a rollback cannot help
            return GuardAction.HALT, _UNRESTORABLE_REASON
        if cause in _DIVERGENCE and health.diagnosis == "data":  # the rerun found the model sound, the batch not
            return GuardAction.SKIP, "a divergence of the data, not of the model: buffers restored, LR kept"
        if damaged:
            return GuardAction.ROLLBACK, _DAMAGE_REASON
        if health.nonfinite_batch or health.diagnosis == "data":
            return GuardAction.SKIP, "a fault of the data, not of the run: buffers restored, LR kept"
        if in_a_row:
            return GuardAction.ROLLBACK, (
                f"{self.consecutive_skips + 1} faults in a row (max_consecutive_skips={self.max_consecutive_skips})"
            )
        if repeated and health.unsettled:
            return GuardAction.ROLLBACK, f"second fault within {self.repeat_window} steps, after an unstable stretch"
        if repeated:
            return GuardAction.SKIP, (
                f"another fault within {self.repeat_window} steps, but the steps before it were healthy: a bad "
                "batch; buffers restored, LR kept"
            )
        if health.diagnosis == "transient":
            return GuardAction.SKIP, "a transient fault (it did not reproduce): buffers restored, LR kept"
        return GuardAction.SKIP, "an isolated bad batch: buffers restored, LR kept"

    def state_dict(self) -> dict[str, Any]:
        return {
            "consecutive_skips": self.consecutive_skips,
            "rollbacks": self.rollbacks,
            "last_fault_step": self.last_fault_step,
            "last_trajectory_fault": self.last_trajectory_fault,
            "divergence_streak": self.divergence_streak,
            "healthy_run": self.healthy_run,
            "refunded": self.refunded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        last = state.get("last_fault_step")
        self.last_fault_step = None if last is None else int(last)
        # an older state has no separate record: every fault it counted is taken as the trajectory's
        trajectory = state.get("last_trajectory_fault", last)
        self.last_trajectory_fault = None if trajectory is None else int(trajectory)
        self.divergence_streak = int(state.get("divergence_streak", 0))
        self.healthy_run = int(state.get("healthy_run", 0))
        self.refunded = int(state.get("refunded", 0))
