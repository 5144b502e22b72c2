"""What :class:`~lightning_gradguard.plain.GradGuard` does after a step: snapshots, skips, rollbacks, LR cuts, halts.

The decisions come from the core objects the guard holds (``GuardPolicy.decide``, the snapshot store's trust rule,
``core.recovery_rules``); this module applies them to the loop's model, optimizers, schedulers and GradScaler,
and records each event as a :class:`~lightning_gradguard.core.guard.GuardEvent`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from lightning_gradguard.core.guard._policy import GuardAction, GuardEvent, StepHealth
from lightning_gradguard.core.recover._rules import (
    START_KEEP_WINDOWS,
    StartState,
    halt_reason,
    halt_report,
    roll_back,
    snapshot_failure_message,
    stability_cut,
)
from lightning_gradguard.core.recover._snapshot import nonfinite_entries, nonfinite_weights_and_buffers, take_snapshot
from lightning_gradguard.errors import DivergenceError

if TYPE_CHECKING:
    from lightning_gradguard.plain.grad_guard import GradGuard

__all__ = ["Recovery"]


class Recovery:
    """The guard's actions on its model, optimizers, schedulers and scaler."""

    def __init__(self, guard: GradGuard) -> None:
        self.g = guard
        self.start_state = StartState(START_KEEP_WINDOWS * guard.judge.controller.window)

    # ------------------------------------------------------------------ healthy steps and snapshots
    def healthy(self, overflow: bool) -> None:
        g = self.g
        g.policy.healthy()
        if overflow:  # the scaler skipped this update: it tests nothing, so it confirms no snapshot
            g.amp_overflow_steps += 1
            g.last_action = "amp_overflow"
            return
        g.last_action = "healthy"
        g.store.step_healthy()
        if g.action != "halt":
            g._since_snapshot += 1
            if g._since_snapshot >= g.snapshot_every_n_steps:
                g._since_snapshot = 0
                self.take_snapshot()

    def take_snapshot(self, trusted: bool = False) -> None:
        """Copy the state; keep it only if it is finite on every rank (else the older snapshots stay)."""
        g = self.g
        snap, error, bad = None, None, []
        try:
            extra = {"scaler": g.scaler.state_dict()} if g.scaler is not None and g.scaler.is_enabled() else {}
            snap = take_snapshot(
                g.model, g.optimizers, g.schedulers, g.step, extra=extra, meta={"lr_scale": g.lr_scale}
            )
            bad = nonfinite_entries(snap.model) if g.check_params else []
        except Exception as err:  # e.g. host memory exhausted: must not end the run the guard keeps alive
            error = err
        failed, damaged = g.reduce.any(error is not None, bool(bad))
        if failed:
            message = snapshot_failure_message("GradGuard", g.step, error, g.store.compute())
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        elif damaged:  # the last update made the weights non-finite before any loss or gradient could show it
            health = StepHealth(max(g.step - 1, 0), update_skipped=False)
            self._diagnose(health)
            health.nonfinite_params = health.nonfinite_params or not health.nonfinite_buffers
            self.handle_fault(health)
        elif snap is not None:
            g.store.update(snap, trusted=trusted)
            if trusted:
                self.start_state.offer(snap)
        self.start_state.expire(g.step)

    def check_weights(self) -> None:
        """The last update is checked by no later step: check the weights themselves (at the end of training)."""
        g = self.g
        if g.check_params and g.step > 0 and not g.halted:
            health = StepHealth(g.step, update_skipped=False)
            self._diagnose(health)
            if health.weights_damaged:
                self.handle_fault(health)

    # ------------------------------------------------------------------ faults
    def handle_fault(self, health: StepHealth, verdict: Any = None) -> None:
        """Carry out the policy's decision for a flagged step (``verdict``: the step's judgement, None when the
        fault was found outside a step, e.g. in a snapshot)."""
        g = self.g
        loss, norm, stats = (verdict.loss, verdict.norm, verdict.stats) if verdict is not None else (None, None, [])
        event = GuardEvent(health.step, "", "", g.lr_scale, loss=loss, grad_norm=norm)
        names: list[str] = []
        if health.update_skipped:
            g.skipped_steps += 1
            g.buffers.restore()  # undo what the bad batch did to BatchNorm statistics
            if health.nonfinite_grad:
                names = [n for s in stats for n in s.nonfinite_names()]
                event.nonfinite_grads = names[:20]
        if g.check_params and (health.update_skipped or health.weights_damaged):
            params, buffers = self._diagnose(health)
            event.nonfinite_params, event.nonfinite_buffers = params[:20], buffers[:20]
        decision = g.policy.decide(health, can_roll_back=g.store.compute() is not None)
        event.cause, event.reason = decision.cause.value if decision.cause else "", decision.reason
        if decision.action is GuardAction.ROLLBACK:
            event.snapshot_step = self.rollback(decision.lr_power)
        event.lr_scale = g.lr_scale
        if decision.action is GuardAction.HALT:
            self.halt(event)
            return
        event.kind = decision.action.value
        g.last_action = "rollback" if event.kind == "rollback" else "skip"
        g.record_event(event)

    def _diagnose(self, health: StepHealth) -> tuple[list[str], list[str]]:
        """Names of this rank's non-finite weights and buffers; the health flags OR-ed over the ranks."""
        names = nonfinite_weights_and_buffers(self.g.inner_model)
        health.nonfinite_params, health.nonfinite_buffers = self.g.reduce.any(bool(names[0]), bool(names[1]))
        return names

    def rollback(self, lr_power: int = 1) -> int:
        """Restore the newest trusted snapshot and cut the LR; returns the snapshot's step."""
        g = self.g
        snap = g.store.compute()
        if snap is None:  # the policy rolls back only when a trusted snapshot exists
            raise RuntimeError("GradGuard: rollback without a trusted snapshot")
        extra, g.lr_scale = roll_back(
            snap, g.store, g.model, g.optimizers, g.schedulers, g.lr_scale, g.lr_factor, lr_power
        )
        if "scaler" in extra and g.scaler is not None:
            g.scaler.load_state_dict(extra["scaler"])
        self._after_state_change()
        return snap.step

    def lower_lr(self, step: int, reason: str) -> None:
        """The stability controller's cut (``core.recovery_rules.stability_cut``)."""
        g = self.g
        snap, extra, g.lr_scale = stability_cut(
            self.start_state, g.store, g.judge.controller, g.policy, g.model, g.optimizers, g.schedulers, g.lr_scale,
            g.lr_factor, step,
        )  # fmt: skip
        if "scaler" in extra and g.scaler is not None:
            g.scaler.load_state_dict(extra["scaler"])
        g.last_action = "rollback" if snap is not None else "lower_lr"
        self._after_state_change()
        event = GuardEvent(step, g.last_action, "lr_too_high", g.lr_scale, reason=reason)
        event.snapshot_step = snap.step if snap is not None else None
        g.record_event(event)

    def _after_state_change(self) -> None:
        self.g._since_snapshot = 0
        self.g.judge.after_state_change()

    def halt(self, event: GuardEvent) -> None:
        g = self.g
        g.last_action = "halt"
        g.halted = True
        event.kind = "halt"
        event.reason = halt_reason(event)
        if g.report_dir is not None:
            counters = {
                "skipped_steps": g.skipped_steps,
                "rollbacks": g.rollbacks,
                "amp_overflow_steps": g.amp_overflow_steps,
            }
            report = halt_report(
                event, g.optimizers, g.lr_scale, counters, g.judge.grad_history, g.judge.loss_history, g.events
            )
            if g.rank in (0, None):
                event.report_path = str(report.write(g.report_dir, "grad_guard_report")[0])
        g.record_event(event)
        if g.raise_on_halt:
            raise DivergenceError(event.reason, step=event.step, report_path=event.report_path)
