"""Recovery rules shared by every guard (the Trainer's :class:`NaNGuard` and the plain-loop ``GradGuard``).

The guards differ in where they find the optimizers and schedulers, not in what they do to them. This module holds
the LR arithmetic of a recovery once, so that both apply the same cut:

- :func:`rollback_lr` runs after a snapshot was restored (which brought back the LR that snapshot had). It scales
  the LR so that it ends ``lr_factor ** lr_power`` times the LR in force *before* the rollback, never above the
  snapshot's own LR. ``lr_power`` comes from :class:`~lightning_gradguard.core.guard._policy.Decision`: a divergence
  that returns soon after a divergence rollback doubles it (a geometric search for a stable LR).
- :func:`lower_lr` is the stability controller's cut: ``lr_factor ** lr_power`` on the current LR (the controller
  doubles ``lr_power`` when its cuts follow each other closely).
- :func:`stability_cut` carries out a :class:`~lightning_gradguard.core.guard._stability.StabilityFinding`: back to
  the state its ``target`` names (:func:`stability_target`) while the caller's rollback budget allows, else in place.
- :func:`cut_scale` is where a cut lands (never below the LR floor, never 0); :func:`recover_lr` undoes one cut
  after sustained healthy training.
- :func:`roll_back` is a whole rollback: restore the snapshot bit for bit, forget the newer snapshots, cut the LR;
  the hyperparameters the user changed by hand since the snapshot stay the user's (:func:`keep_user_settings`).
- :class:`StartState` keeps the untrained state apart during the first windows of a run: when the stability
  controller finds the model worse than untrained (a too-high LR from the first step), the guard restarts from it.
- :func:`halt_reason` and :func:`halt_report` assemble what a halt says and writes, from the halting event.
- :func:`snapshot_failure_message` says what a failed snapshot leaves the rollbacks with.

Both return the guard's new cumulative ``lr_scale`` (the product of all cuts so far), which snapshots record in
their ``meta["lr_scale"]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_gradguard.core.guard._policy import GuardEvent
from lightning_gradguard.core.guard._stability import StabilityFinding, StabilityTarget
from lightning_gradguard.core.recover._lr_scaling import scale_lr
from lightning_gradguard.core.recover._report import DivergenceReport
from lightning_gradguard.core.recover._snapshot import Snapshot, SnapshotStore, restore_snapshot


def cut_scale(lr_scale: float, lr_factor: float, lr_power: int = 1, floor: float = 0.0) -> float:
    """The cumulative LR scale after a cut of ``lr_factor ** lr_power`` from ``lr_scale``, never below ``floor``
    (nor above ``lr_scale``: a scale already under the floor stays where it is). Never raises, never returns 0.

    Example:
        >>> cut_scale(1.0, 0.5, 2)
        0.25
        >>> cut_scale(0.002, 0.5, 4, floor=1e-3)
        0.001
    """
    power = max(0, min(int(lr_power), 64))  # 0.5 ** 64 is 5e-20: far below any floor, and never 0.0
    target = lr_scale * lr_factor**power
    return max(target, min(floor, lr_scale)) if target > 0 else max(min(floor, lr_scale), 1e-300)


def rollback_lr_factor(
    lr_scale: float, snapshot_lr_scale: float, lr_factor: float, lr_power: int = 1, floor: float = 0.0
) -> float:
    """The multiplier to apply on top of a restored snapshot's LR.

    The target scale is :func:`cut_scale` of the scale before the rollback (``lr_power`` 0: no cut); the snapshot's
    state already carries ``snapshot_lr_scale``, so the factor is the ratio, capped at 1 (a rollback never raises
    the LR, e.g. when the snapshot predates an earlier cut that proved insufficient).

    Example:
        >>> rollback_lr_factor(1.0, 1.0, 0.5)
        0.5
        >>> rollback_lr_factor(0.5, 1.0, 0.5, lr_power=2)
        0.125
        >>> rollback_lr_factor(0.5, 1.0, 0.5, lr_power=0)  # an isolated state fault: the LR in force is kept
        0.5
    """
    snap = snapshot_lr_scale if snapshot_lr_scale > 0 else 1.0
    return min(cut_scale(lr_scale, lr_factor, lr_power, floor) / snap, 1.0)


def rollback_lr(
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    lr_scale: float,
    snapshot_lr_scale: float,
    lr_factor: float,
    lr_power: int = 1,
    floor: float = 0.0,
) -> float:
    """Cut the LR of freshly restored ``optimizers``/``schedulers``; returns the new cumulative LR scale."""
    factor = rollback_lr_factor(lr_scale, snapshot_lr_scale, lr_factor, lr_power, floor)
    if factor != 1.0:
        scale_lr(optimizers, schedulers, factor)
    return snapshot_lr_scale * factor


def lower_lr(
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    lr_scale: float,
    lr_factor: float,
    lr_power: int = 1,
    floor: float = 0.0,
) -> float:
    """Multiply the current LR by ``lr_factor ** lr_power`` (a stability cut), never below ``floor``; returns the
    new cumulative LR scale."""
    target = cut_scale(lr_scale, lr_factor, lr_power, floor)
    if target != lr_scale:
        scale_lr(optimizers, schedulers, target / lr_scale)
    return target


def recover_lr(
    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], lr_scale: float, lr_factor: float
) -> float:
    """Undo one cut: multiply the LR by ``1 / lr_factor``, never above the user's schedule (a cumulative scale of
    1); returns the new cumulative LR scale.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
        >>> recover_lr([opt], [], 0.25, 0.5), opt.param_groups[0]["lr"]
        (0.5, 0.5)
    """
    target = min(1.0, lr_scale / lr_factor) if lr_factor > 0 else 1.0
    if target > lr_scale > 0:
        scale_lr(optimizers, schedulers, target / lr_scale)
        return target
    return lr_scale


def roll_back(
    snapshot: Snapshot,
    store: SnapshotStore,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    lr_scale: float,
    lr_factor: float,
    lr_power: int = 1,
    floor: float = 0.0,
) -> tuple[dict[str, Any], float]:
    """Restore ``snapshot`` into the model, optimizers and schedulers, drop the store's newer snapshots and cut the
    LR (:func:`rollback_lr`). Returns the snapshot's extra states (e.g. a GradScaler's or a precision plugin's, for
    the caller to load where it keeps them) and the new cumulative LR scale.

    The hyperparameters the user changed by hand since the snapshot stay the user's (:func:`keep_user_settings`)."""
    live = user_settings(optimizers, schedulers)
    extra = restore_snapshot(snapshot, model, optimizers, schedulers)
    store.discard_after(snapshot)
    snap_scale = float(snapshot.meta.get("lr_scale", 1.0))
    keep_user_settings(optimizers, live, lr_scale, snap_scale, lr_blamed=lr_power > 0)
    return extra, rollback_lr(optimizers, schedulers, lr_scale, snap_scale, lr_factor, lr_power, floor)


def _raw(optimizer: Any) -> Any:
    """The torch optimizer behind a wrapper (Fabric's, Lightning's), which is what a scheduler built on it holds."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def user_settings(
    optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
) -> list[list[dict[str, Any]] | None]:
    """The live hyperparameters (every param-group entry but ``params``) of each optimizer that no LR scheduler
    drives (None for the others: their scheduler's restored state decides what comes next). A scheduler built on a
    wrapped optimizer (Fabric's) drives the optimizer inside."""
    driven = {id(_raw(getattr(s, "optimizer", None))) for s in schedulers}
    return [
        None if id(_raw(opt)) in driven else [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        for opt in optimizers
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an entry that does not compare is left as restored
        return True


def _kept(
    key: str, mine: Any, restored: Any, lr_scale: float, snapshot_lr_scale: float, lr_blamed: bool
) -> tuple[bool, Any]:
    """``(changed, value)``: whether the user changed entry ``key`` since the snapshot (``mine`` live, ``restored``
    the snapshot's), and the value to put back (see :func:`keep_user_settings`)."""
    if key != "lr":
        return (False, restored) if _same(mine, restored) else (True, mine)
    if not (lr_scale > 0 and snapshot_lr_scale > 0 and isinstance(mine, (int, float))):
        return False, restored
    if not isinstance(restored, (int, float)):
        return False, restored
    user, then = mine / lr_scale, restored / snapshot_lr_scale
    if _same(user, then):
        return False, restored
    if lr_blamed:
        user = min(user, then)
    return True, user * snapshot_lr_scale


def keep_user_settings(
    optimizers: Sequence[torch.optim.Optimizer],
    live: Sequence[list[dict[str, Any]] | None],
    lr_scale: float,
    snapshot_lr_scale: float,
    lr_blamed: bool,
) -> None:
    """After a restore: put back the hyperparameters the user changed by hand since the snapshot, in optimizers that
    no scheduler drives (``live``: :func:`user_settings` before the restore).

    A rollback restores the training state, not the user's decisions: an LR divided by 10 at an epoch by a
    callback, a weight decay raised, a rebuilt optimizer's settings. Restored from the older snapshot they were
    undone for good (the hook that made the change does not run again): a hand LR drop from 0.1 to 0.001, rolled
    back after an isolated fault ("LR kept"), left the rest of the run at 0.1. An entry counts as changed when it
    differs from the restored one; the LR is compared without the guard's own scale (``lr_scale`` live,
    ``snapshot_lr_scale`` restored). Where the rollback blames the LR (``lr_blamed``: it cuts it), an LR the user
    raised since the snapshot is not put back (the snapshot's, lower, is cut); one the user lowered is.

    A setting held in a tensor (a tensor ``lr``) stays the user's *object*: the restore put a copy of the snapshot's
    tensor in its place, so the live tensor goes back into the group, holding the value chosen as above (a user who
    writes ``lr_t.fill_(...)`` later still reaches the optimizer). Read on the host: one read per such setting, on a
    rollback only."""
    for opt, groups in zip(optimizers, live):
        if groups is None or len(groups) != len(opt.param_groups):
            continue
        for group, before in zip(opt.param_groups, groups):
            for key, value in before.items():
                if key not in group:
                    continue
                restored = group[key]
                if not isinstance(value, torch.Tensor):
                    if not isinstance(restored, torch.Tensor):
                        changed, chosen = _kept(key, value, restored, lr_scale, snapshot_lr_scale, lr_blamed)
                        if changed:
                            group[key] = chosen
                    continue
                if not isinstance(restored, torch.Tensor) or restored.shape != value.shape or restored is value:
                    continue
                with torch.no_grad():
                    if value.numel() == 1 and not value.is_complex():
                        _, chosen = _kept(key, float(value), float(restored), lr_scale, snapshot_lr_scale, lr_blamed)
                        value.fill_(chosen)
                    else:
                        value.copy_(restored)
                group[key] = value


#: stability windows during which the untrained state is kept apart (a too-high LR from the first step shows in
#: the first few; afterwards the copy's memory is freed)
START_KEEP_WINDOWS = 8


class StartState:
    """The state a run started from, kept apart (besides the snapshot store) for ``keep_steps`` steps.

    A model that the stability controller finds worse than untrained has gained nothing since the start: its newest
    snapshot is as damaged as its weights, and the only good state is the first one. The guard hands the start
    snapshot here; :meth:`restart_target` says whether to restart from it; after ``keep_steps`` the copy is dropped
    (a too-high LR from the first step shows within a few windows; later, the memory is better spent elsewhere).

    Example:
        >>> import torch
        >>> from lightning_gradguard.core.recover._snapshot import take_snapshot
        >>> start = StartState(keep_steps=100)
        >>> start.offer(take_snapshot(torch.nn.Linear(1, 1), step=0))
        >>> start.restart_target(worse_than_start=True, step=60) is not None
        True
        >>> start.restart_target(worse_than_start=True, step=150) is None
        True
    """

    def __init__(self, keep_steps: int) -> None:
        self.keep_steps = int(keep_steps)
        self.snapshot: Snapshot | None = None
        self.since = 0  # the step the kept copy's time began: 0, or the step of the last restart from it

    def offer(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` if it is the state of step 0; forget any older one otherwise (a resumed run has no
        untrained state to return to)."""
        self.snapshot = snapshot if snapshot.step == 0 else None

    def expire(self, step: int) -> None:
        """Drop the copy once ``step`` is ``keep_steps`` past the start (or past the last restart from it)."""
        if step > self.since + self.keep_steps:
            self.snapshot = None

    def renew(self, step: int) -> None:
        """A restart from the copy at ``step``: a new run begins, and the copy is kept ``keep_steps`` more."""
        self.since = int(step)

    def restart_target(self, worse_than_start: bool, step: int) -> Snapshot | None:
        """The snapshot to restart from, or None (not worse than untrained, or the copy expired)."""
        self.expire(step)
        return self.snapshot if worse_than_start else None


def stability_target(
    start: StartState, store: SnapshotStore, target: StabilityTarget, step: int, window: int
) -> tuple[Snapshot | None, bool]:
    """Where a stability cut rolls back to, and whether that is the untrained state (None: cut the LR, keep the
    state), for a finding's ``target``. ``"start"`` (a model worse than untrained) restarts from the start (once the
    start copy has expired, like a climb); ``"before_climb"`` (a loss that climbed) goes back to the newest trusted
    snapshot taken before the climb (two windows before ``step``); ``"in_place"`` keeps the state."""
    worse_than_start = target == "start"
    snapshot = start.restart_target(worse_than_start, step)
    if snapshot is not None:
        return snapshot, True
    if worse_than_start or target == "before_climb":  # (the start copy expired: the newest state from before)
        return store.compute(before=step - 2 * window), False
    return None, False


def stability_cut(
    start: StartState,
    store: SnapshotStore,
    finding: StabilityFinding,
    can_roll_back: bool,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    lr_scale: float,
    lr_factor: float,
    step: int,
    window: int,
    floor: float = 0.0,
) -> tuple[Snapshot | None, dict[str, Any], float]:
    """Carry out the stability controller's ``finding`` (a
    :class:`~lightning_gradguard.core.guard._stability.StabilityFinding` of a controller with ``window`` steps per
    window) at ``step``.

    Rolls back to :func:`stability_target`'s snapshot when ``can_roll_back`` (the guard's rollback budget is not
    spent), else cuts the LR in place, by ``lr_factor ** finding.lr_power`` either way (never below ``floor``).
    Returns the snapshot restored (None: the state was kept; otherwise the caller spends one rollback of its
    budget), its extra states (a GradScaler's or precision plugin's, for the caller to load) and the new cumulative
    LR scale.
    """
    target, from_scratch = stability_target(start, store, finding.target, step, window)
    if target is None or not can_roll_back:
        return None, {}, lower_lr(optimizers, schedulers, lr_scale, lr_factor, finding.lr_power, floor)
    if from_scratch:
        restart_store(store, target)
        start.renew(step)
    extra, lr_scale = roll_back(
        target, store, model, optimizers, schedulers, lr_scale, lr_factor, finding.lr_power, floor
    )
    return target, extra, lr_scale


def restart_store(store: SnapshotStore, start: Snapshot) -> None:
    """Make ``start`` the store's only snapshot (the newer ones were taken on a trajectory that only got worse)."""
    store.reset()
    store.update(start, trusted=True)


def halt_reason(event: GuardEvent) -> str:
    """The sentence a halt reports: the cause in words, then the policy's reason (when it gave one)."""
    cause = event.cause.replace("_", " ")
    return f"{cause}; {event.reason}" if event.reason else cause


def halt_report(
    event: GuardEvent,
    optimizers: Iterable[torch.optim.Optimizer],
    lr_scale: float,
    counters: dict[str, int],
    grad_history: Iterable[Sequence[float]],
    loss_history: Iterable[Sequence[float]],
    events: Sequence[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> DivergenceReport:
    """The report of a halt at ``event`` (whose ``reason`` is already :func:`halt_reason`'s sentence); ``events``
    are the earlier events, the halting one is appended."""
    return DivergenceReport(
        step=event.step,
        reason=event.reason,
        cause=event.cause,
        nonfinite_loss=event.cause == "nonfinite_loss",
        nonfinite_grads=event.nonfinite_grads,
        nonfinite_params=event.nonfinite_params,
        lr=[[float(grp["lr"]) for grp in opt.param_groups] for opt in optimizers],
        lr_scale=lr_scale,
        counters=dict(counters),
        grad_norm_history=[list(r) for r in grad_history],
        loss_history=[list(r) for r in loss_history],
        events=[*events, event.to_dict()],
        extra=dict(extra or {}),
    )


def snapshot_failure_message(owner: str, step: int, error: BaseException | None, kept: Snapshot | None) -> str:
    """The warning for a snapshot that could not be taken at ``step`` (``error``: this rank's, None when it failed on
    another rank); ``kept`` is the newest trusted snapshot the rollbacks fall back to."""
    keep = f"the snapshot of step {kept.step}" if kept is not None else "no snapshot (a fault now halts)"
    where = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
    return f"{owner} could not take a snapshot at step {step} ({where}); rollbacks use {keep}"
