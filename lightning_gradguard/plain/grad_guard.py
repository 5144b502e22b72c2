"""GradGuard: gradguard's clipping and NaN/divergence recovery for a plain PyTorch (or Fabric) training loop.

The same core as the Lightning callbacks makes every decision and carries it out: the clippers of
:mod:`lightning_gradguard.core.clip` (one per optimizer) and the guard engine of
:mod:`lightning_gradguard.core.engine` (judge, policy, snapshots, rollbacks, LR cuts, halts, events), which reaches
the loop through :class:`~lightning_gradguard.plain._loop_host.LoopHost`. This module only checks the arguments and
turns ``before_step``/``after_step`` into the engine's calls. On the same gradient stream it takes the same
decisions as ``AdaptiveGradientClipping`` + ``NaNGuard`` in a Trainer (``tests/plain/test_same_decisions.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from lightning_gradguard.core._arg_checks import check_bool, check_choice
from lightning_gradguard.core.clip import Clipper, ClipRecord
from lightning_gradguard.core.engine import EngineField, GuardEngine, check_guard_options
from lightning_gradguard.core.guard import GuardDecision
from lightning_gradguard.core.guard._step_judge import Verdict
from lightning_gradguard.core.recover._lr_watch import LR_OVERWRITE, LrWatch, keep_cut
from lightning_gradguard.plain._clip_slots import ClipSlots
from lightning_gradguard.plain._distributed import MaxReducer, Reduce, rank_and_world
from lightning_gradguard.plain._loop_host import (
    LoopHost,
    check_loop_clipping,
    check_loop_extras,
    check_loop_objects,
    unwrap_model,
)

__all__ = ["GradGuard"]

#: the old ``last_action`` strings of each outcome
_LAST_ACTION = {
    GuardDecision.HEALTHY: "healthy",
    GuardDecision.AMP_OVERFLOW: "amp_overflow",
    GuardDecision.SKIPPED: "skip",
    GuardDecision.ROLLED_BACK: "rollback",
    GuardDecision.LOWERED_LR: "lower_lr",
    GuardDecision.HALTED: "halt",
}

#: the key marking, in a GradScaler's per-optimizer state of this step, gradients that ``before_step`` unscaled
_UNSCALED_BY_GUARD = "gradguard_unscaled"


def _unscale_once(scaler: Any, optimizer: Any) -> None:
    """``scaler.unscale_`` while a guard protects ``scaler``: gradients that ``before_step`` already unscaled in this
    step are left as they are (torch would raise "unscale_() has already been called on this optimizer since the
    last update()"); any other call is the scaler's own. The mark lives in the scaler's per-optimizer state, which
    ``scaler.update()`` clears."""
    states = getattr(scaler, "_per_optimizer_states", {})
    for key in {id(optimizer), id(getattr(optimizer, "optimizer", optimizer))}:
        state = states.get(key)  # .get: looking must not create an entry in the defaultdict
        if state is not None and state.get(_UNSCALED_BY_GUARD):
            return
    type(scaler).unscale_(scaler, optimizer)


def _install_unscale_once(scaler: Any) -> None:
    """Make ``scaler.unscale_`` tolerate the guard's own unscaling (an instance attribute: a ``functools.partial``
    of a module function, so the scaler still pickles and deep-copies)."""
    current = scaler.__dict__.get("unscale_")
    if getattr(current, "func", None) is not _unscale_once and callable(getattr(type(scaler), "unscale_", None)):
        scaler.unscale_ = functools.partial(_unscale_once, scaler)


class GradGuard:
    r"""Clip adaptively and survive NaN/inf and divergence in a hand-written training loop.

    Two calls per optimizer step::

        loss.backward()
        if guard.before_step(loss):   # measure once, clip, decide (all ranks agree)
            optimizer.step()
        scheduler.step()              # if you have one
        guard.after_step()            # snapshot, roll back, lower the LR or halt; log
        optimizer.zero_grad()

    :meth:`before_step` measures the gradients of every optimizer once (pre-clip), clips them with the chosen
    method, and judges the step (non-finite loss or gradient, finite divergence, optional loss spike, collapsing AMP
    scale). It returns False for a step that must not be taken; its gradients are then already ``None``, so even an
    ``optimizer.step()`` called anyway changes nothing (a true skip: Adam moments and step counts stay as they were).
    :meth:`after_step` carries out the policy's decision: a rollback restores model, optimizers, schedulers and
    GradScaler bit for bit from the newest trusted snapshot and multiplies the LR by ``lr_factor`` wherever a
    scheduler keeps it (:func:`~lightning_gradguard.core.recover._lr_scaling.scale_lr`); a halt raises
    :class:`~lightning_gradguard.DivergenceError`.

    With a ``torch.amp.GradScaler`` pass it as ``scaler``: :meth:`before_step` unscales the gradients first (so
    norms and thresholds are the real ones), pass it the *unscaled* loss, call ``scaler.step(optimizer)`` when it
    returns True and ``scaler.update()`` after every step; overflow steps are the scaler's business (counted in
    :attr:`amp_overflow_steps`, never a fault). There is no ``scaler.unscale_(optimizer)`` to call: a call of your own
    after :meth:`before_step` (e.g. before your own ``clip_grad_norm_``, or ``fabric.clip_gradients``) leaves the
    already unscaled gradients alone, and one before :meth:`before_step` is seen and not repeated (the guard then
    measures the gradients as your code left them). With gradient accumulation call :meth:`before_step` once per
    optimizer step, after the last micro-batch, with the summed loss. Under DDP (``torch.distributed`` initialised)
    every rank must make the same calls; decisions are agreed by one max-reduce per step.

    A loop that sets the LR by hand every iteration (``param_group["lr"] = get_lr(it)``) would undo an LR cut at
    the next write: while the guard's cut is in force (:attr:`lr_scale` below 1), :meth:`before_step` and
    :meth:`after_step` find param groups whose LR changed since the guard last left them (a registered scheduler's
    step is recognised as such) and, by default, multiply the value the loop wrote by :attr:`lr_scale`
    (``lr_overwrite="reapply"``). Write your schedule's own LR: do not multiply it by :attr:`lr_scale` yourself.

    Events (skip, rollback, LR cut, warning, halt) are announced on rank 0 with the line the Lightning callbacks
    print (``GuardEvent.line``, with this class's name as the owner): once on stderr and as a WARNING record of the
    ``lightning_gradguard.plain`` logger (``lightning_gradguard.fabric`` for ``FabricGradGuard``), never twice:
    when your logging already prints that record on the terminal, the guard prints nothing itself. With
    ``writer`` (a ``torch.utils.tensorboard.SummaryWriter``), rank 0 writes the same ``gradguard/`` tags and event
    text as the callbacks every ``log_every_n_steps`` steps and at every event (step axis: :attr:`step`, the number
    of optimizer steps attempted before this one, like the Trainer's ``global_step``).

    Args:
        model: the model (a ``DistributedDataParallel`` or Fabric wrapper is fine; snapshots hold its state).
        optimizers: one optimizer or a list (Fabric/Lightning wrappers are unwrapped).
        schedulers: LR schedulers to restore and rescale with the optimizers.
        scaler: a ``torch.amp.GradScaler`` (or None).
        clipping: a method name of :data:`~lightning_gradguard.core.clip.CLIPPERS` (``"zscore"``,
            ``"percentile"``, ``"agc"``, ``"norm"``, ``"value"``, ``"per_parameter"``), a configured core clipper
            (e.g. ``ZScoreClipper(z_threshold=3.0)``; copied for each optimizer), or None for none.
        clipping_options: the method's options by name, as ``AdaptiveGradientClipping`` takes them (e.g.
            ``{"z_threshold": 3.0, "warmup_steps": 20}``); checked by
            :func:`~lightning_gradguard.core.clip.make_clipper`, so a bad one raises the callback's message (with
            ``GradGuard`` named). Only with a method name.
        action: the guard policy: ``"auto"``, ``"rollback"``, ``"skip"`` or ``"halt"`` (see
            :class:`~lightning_gradguard.core.guard.GuardPolicy`).
        lr_factor: LR multiplier per rollback or stability cut, in (0, 1].
        max_consecutive_skips, escalate_to, max_rollbacks: as for ``NaNGuard``.
        snapshot_every_n_steps: healthy steps between in-memory snapshots (>= 1).
        snapshot_confirm_steps: healthy steps a snapshot must survive before it is trusted (>= 0).
        check_params: name non-finite weights on faults and refuse non-finite snapshots.
        divergence: treat finite divergence of the loss or gradient norm as a fault.
        stability: lower the LR (or restart from the untrained state) when it looks too high.
        spike_zscore, spike_window: optional loss z-score test (None: off).
        amp_scale_floor: a GradScaler scale below this is a collapse (> 0; default 2**-24, as for ``NaNGuard``).
        amp_max_halvings: overflow steps in a row that make a collapse too (as for ``NaNGuard``; None: off).
        raise_on_halt: raise :class:`~lightning_gradguard.DivergenceError` on halt (else :attr:`halted` is set and
            :meth:`before_step` returns False from then on).
        report_dir: on halt, write ``grad_guard_report.json``/``.txt`` there (cause, non-finite parameters, recent
            norms and losses, events); None: no report.
        writer: a ``SummaryWriter`` (anything with ``add_scalar``/``add_text``), used on rank 0 only.
        announce: print each event's line on stderr (once; not when your logging configuration already shows the
            record on the terminal); False: only the ``logging`` record (your configuration decides where it goes).
        lr_overwrite: what to do when the loop has set a param group's LR by hand while the guard's LR cut is in
            force: ``"reapply"`` multiplies the written value by :attr:`lr_scale` (the cut stays in force),
            ``"warn"`` warns once and leaves it, ``"ignore"`` leaves it silently (for loops that apply
            :attr:`lr_scale` themselves).
        log_every_n_steps: scalar logging interval (>= 1).
        history_size: recent norms and losses kept for halt reports.
        min_lr_scale, lr_recovery_steps, rollback_refill_steps: the LR floor, the recovery of a cut LR and the
            refill of the rollback budget, as for ``NaNGuard``.
        rerun: on a non-finite step, recompute it with the ``recompute`` callable given to :meth:`before_step` (from
            the same state, then from the trusted snapshot) and say whether the fault was transient, of the data or
            of the state (see ``NaNGuard``); a transient or data fault costs no LR. No effect without ``recompute``.
        shard_snapshots: with a ``DistributedDataParallel`` model, each rank keeps only its 1/world part of each
            snapshot; a rollback gathers the whole state back (see ``NaNGuard``). False: a whole copy per rank.
        snapshot_budget_mb: host memory this rank's snapshots may take (None: a quarter of the machine's memory per
            local process, ``LOCAL_WORLD_SIZE``); a state whose snapshots would exceed it gets none (a warning says
            so with the sizes; a fault is then skipped, or halts) rather than exhausting the host.
        all_reduce_max: custom ``tensor -> element-wise max over ranks`` (Fabric); None uses torch.distributed.
        process_group: the torch.distributed group (None: the default group).

    Raises:
        TypeError, ValueError: a bad argument; the message names the class and the argument.

    Example:
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = GradGuard(model, opt, clipping="zscore", action="auto")
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> guard.before_step()
        True
        >>> opt.step(); guard.after_step(); guard.step
        1
    """

    action = EngineField(options=True)
    lr_factor = EngineField(options=True)
    max_consecutive_skips = EngineField(options=True)
    escalate_to = EngineField(options=True)
    snapshot_every_n_steps = EngineField(options=True)
    snapshot_confirm_steps = EngineField(options=True)
    max_rollbacks = EngineField(options=True)
    check_params = EngineField(options=True)
    divergence = EngineField(options=True)
    stability = EngineField(options=True)
    spike_zscore = EngineField(options=True)
    spike_window = EngineField(options=True)
    amp_scale_floor = EngineField(options=True)
    raise_on_halt = EngineField(options=True)
    report_dir = EngineField(options=True)
    history_size = EngineField(options=True)
    min_lr_scale = EngineField(options=True)
    lr_recovery_steps = EngineField(options=True)
    rollback_refill_steps = EngineField(options=True)
    rerun = EngineField(options=True)
    shard_snapshots = EngineField(options=True)
    snapshot_budget_mb = EngineField(options=True)
    warnings = EngineField()
    policy = EngineField()
    store = EngineField()
    skipped_steps = EngineField()
    amp_overflow_steps = EngineField()
    #: cumulative LR factor applied by rollbacks and stability cuts.
    lr_scale = EngineField()
    #: every event as a plain dict (``GuardEvent.to_dict``), oldest first.
    events = EngineField()
    #: what the guard did at the last step (a :class:`~lightning_gradguard.core.guard.GuardDecision`).
    reason = EngineField("outcome")
    cause = EngineField()
    spike_score = EngineField()
    spike_scores = EngineField()
    halted = EngineField()
    halt_error = EngineField()
    report_path = EngineField()
    rollbacks = EngineField()

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        schedulers: Any = (),
        scaler: Any = None,
        *,
        clipping: str | Clipper | None = "zscore",
        clipping_options: Mapping[str, Any] | None = None,
        action: str = "auto",
        lr_factor: float = 0.5,
        max_consecutive_skips: int = 3,
        escalate_to: str = "rollback",
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
        report_dir: str | os.PathLike | None = None,
        writer: Any = None,
        announce: bool = True,
        lr_overwrite: str = "reapply",
        log_every_n_steps: int = 50,
        history_size: int = 50,
        min_lr_scale: float = 1e-3,
        lr_recovery_steps: int | None = 1000,
        rollback_refill_steps: int | None = 100,
        rerun: bool = True,
        shard_snapshots: bool = True,
        snapshot_budget_mb: float | None = None,
        all_reduce_max: Reduce | None = None,
        process_group: Any = None,
    ) -> None:
        o = type(self).__name__
        guard_args = {k: v for k, v in locals().items() if k not in _NOT_GUARD_OPTIONS}
        self.model, self.optimizers, self.schedulers = check_loop_objects(model, optimizers, schedulers, o)
        check_loop_extras(scaler, writer, all_reduce_max, o, process_group)
        self.scaler = scaler
        self.clipping = clipping
        #: the checked clipping options (empty: the method's defaults).
        self.clipping_options: dict[str, Any] = check_loop_clipping(clipping, clipping_options, o)
        self.engine = GuardEngine(check_guard_options(o, "grad_guard_report", **guard_args))
        terminal = check_bool("announce", announce, owner=o)
        #: what a hand-set LR gets while the guard's cut is in force (``"reapply"``, ``"warn"`` or ``"ignore"``).
        self.lr_overwrite = check_choice("lr_overwrite", lr_overwrite, LR_OVERWRITE, owner=o)
        self.log_every_n_steps = cast(int, self.engine.options.log_every_n_steps)
        reducer = MaxReducer(all_reduce_max, process_group)
        self.rank = self._global_rank(process_group, all_reduce_max)
        self.reduce = reducer
        self._host = LoopHost(
            model, self.optimizers, self.schedulers, scaler, reducer, self.rank, writer, self.engine.options.report_dir,
            logger=logging.getLogger(self._logger_name), terminal=terminal,
        )  # fmt: skip
        if scaler is not None:
            _install_unscale_once(scaler)
        self._lrs = LrWatch(self.optimizers, self.schedulers)
        self._lr_told = self._scheduler_told = False
        names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
        self._clips = self._host.clips = ClipSlots(self.optimizers, names, clipping, self.clipping_options, o)
        #: the latest :class:`~lightning_gradguard.core.clip.ClipRecord` of each optimizer index.
        self.last: dict[int, ClipRecord] = self._clips.last
        #: optimizer steps attempted so far (the step axis of logs and events, like the Trainer's ``global_step``).
        self.step = 0
        self._checked = False
        self._verdict: Verdict | None = None
        self._hook = model.register_forward_pre_hook(self._on_forward)
        self.engine.start(self._host, self.step)

    #: the logger of the events (a child of ``lightning_gradguard``, like the callbacks' loggers)
    _logger_name: ClassVar[str] = "lightning_gradguard.plain"

    def _global_rank(self, process_group: Any, all_reduce_max: Reduce | None) -> int | None:
        """This process's rank for rank-zero output (None: unknown, every process writes)."""
        if all_reduce_max is None:
            return rank_and_world(process_group)[0]
        return rank_and_world()[0] if rank_and_world()[1] > 1 else None

    @property
    def announce(self) -> bool:
        """Whether events are also printed on stderr (see the class docstring); may be changed at any time."""
        return self._host.terminal

    @announce.setter
    def announce(self, value: bool) -> None:
        self._host.terminal = check_bool("announce", value, owner=type(self).__name__)

    @property
    def inner_model(self) -> nn.Module:
        """The model without DDP or Fabric wrappers (its parameter names carry no wrapper prefix)."""
        return unwrap_model(self.model)

    @property
    def judge(self) -> Any:
        """The engine's step judge (its detectors and histories)."""
        return self.engine.judge_

    @property
    def last_action(self) -> str:
        """:attr:`reason` as the strings of earlier releases (``"healthy"``, ``"skip"``, ``"rollback"``, ...)."""
        return _LAST_ACTION[self.engine.outcome]

    def _on_forward(self, _module: nn.Module, _inputs: Any) -> None:
        # the first training forward of a step: buffers as they are (not the guard's own rerun of the step, which
        # comes after the bad forward: it would save the buffers that forward spoiled as the ones to restore)
        if torch.is_grad_enabled() and not self._host.busy:
            self.engine.open_window(self.model)

    def clip_rate(self, optimizer_idx: int = 0) -> float | None:
        """Share of optimizer ``optimizer_idx``'s steps that clipped so far; None before its first step."""
        slot = self._clips.slots[optimizer_idx]
        return float(slot.clipped_total) / slot.steps if slot.steps else None

    # ------------------------------------------------------------------ the step
    def before_step(self, loss: Tensor | float | None = None, recompute: Callable[[], Any] | None = None) -> bool:
        """Measure, clip and judge this optimizer step; True: take it, False: do not (its gradients are now None).

        Args:
            loss: the step's (unscaled) training loss, summed over accumulated micro-batches; None if not known
                (then only the gradients are judged).
            recompute: a callable that computes this step's loss again from the model as it is (e.g.
                ``lambda: loss_fn(model(x), y)``), for the rerun diagnosis of a non-finite step (``rerun=True``):
                called only on such a fault, on a loss divergence judged against a thin reference (the first
                steps) and before a restart that claims the model is no better than untrained (each tested on
                this batch), with the random-number state of the step's first forward restored; the guard takes
                the gradients itself and never touches ``.grad``. None: no rerun diagnosis.
        """
        self._host.recompute = recompute
        self._checked = True
        self._keep_lr_cut()
        if self.halted:
            self._drop_grads()
            return False
        self._unscale()
        stats = self._clips.measure_and_clip()
        verdict = self._verdict = self.engine.judge(self.step, stats, loss)
        self._clips.observe(verdict.norm)
        dropped = self._clips.last_dropped = verdict.health is not None
        if dropped:
            self._drop_grads()
        self._lrs.record()
        return not dropped

    def after_step(self) -> None:
        """Carry out the decision for the step just taken (or not): snapshot, roll back, lower the LR or halt."""
        if not self._checked:
            raise RuntimeError(f"{type(self).__name__}.after_step() called without before_step() for step {self.step}")
        self._checked = False
        self._keep_lr_cut()  # an LR written between before_step and now
        step, self.step = self.step, self.step + 1
        if self._verdict is None:  # halted before this step
            self.engine.end_step(step)
            return
        self._verdict = None
        flagged = self.engine.end_step(step, self._clips.clip_flags())
        self._lrs.record()
        if self.engine.log_due(step):  # a flagged step's guard scalars went out with its event
            self._host.emit_scalars({**self._clips.scalars(), **({} if flagged else self.engine.scalars())}, step)

    def _keep_lr_cut(self) -> None:
        """While an LR cut is in force: find param groups whose LR the loop wrote since the guard last left them and
        re-apply :attr:`lr_scale` to the written value (``lr_overwrite="reapply"``) or warn once (``"warn"``)."""
        scale = self.lr_scale
        if scale == 1.0 or self.lr_overwrite == "ignore":
            return
        written = self._lrs.hand_set()
        if self._lrs.unregistered and not self._scheduler_told and self._host.is_global_zero():
            self._scheduler_told = True
            warnings.warn(
                f"{type(self).__name__}: the learning rate of optimizer {self._lrs.unregistered[0]} is stepped by an "
                f"LR scheduler that {type(self).__name__} was not given, while the guard's LR cut is in force "
                f"(lr_scale={scale:.6g}): the scheduler may undo the cut, and a rollback does not restore it. Pass "
                "every scheduler (schedulers=...).",
                UserWarning,
                stacklevel=3,
            )
        if not written:
            return
        first, told = written[0], self._lr_told
        self._lr_told = True
        where = f"optimizer {first.optimizer}, param group {first.group}: {first.left:.6g} -> {first.now:.6g}"
        if self.lr_overwrite == "warn":
            if not told and self._host.is_global_zero():
                warnings.warn(
                    f"{type(self).__name__}: the learning rate was set by hand ({where}) while the guard's LR cut is "
                    f"in force (lr_scale={scale:.6g}): the cut is undone. Multiply your LR by guard.lr_scale, or "
                    "pass lr_overwrite='reapply' to let the guard do it.",
                    UserWarning,
                    stacklevel=3,
                )
            return
        keep_cut(self._lrs, self.optimizers, scale, written)
        if not told and self._host.is_global_zero():
            logging.getLogger(self._logger_name).info(
                "%s: the learning rate was set by hand (%s) while the LR cut is in force: lr_scale=%.6g re-applied "
                "to the written value (said once; lr_overwrite='reapply')",
                type(self).__name__, where, scale,
            )  # fmt: skip

    def _unscale(self) -> None:
        scaler = self._host.scaler()
        if scaler is None:
            return
        states = getattr(scaler, "_per_optimizer_states", {})
        for opt in self.optimizers:
            stage = states.get(id(opt), {}).get("stage")
            if stage is None or getattr(stage, "name", "") == "READY":
                scaler.unscale_(opt)
                state = getattr(scaler, "_per_optimizer_states", {}).get(id(opt))
                if isinstance(state, dict):
                    state[_UNSCALED_BY_GUARD] = True  # a later scaler.unscale_(opt) of the user's is a no-op

    def _drop_grads(self) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None  # optimizers leave parameters without a gradient (and their state) alone

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, clipper statistics, policy and detectors (plain data; in-memory snapshots are not included)."""
        state = self.engine.state_dict()
        del state["snapshots"]
        return {"step": self.step, **state, "clippers": self._clips.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (after loading the model, optimizer and scheduler states yourself).

        The LR scale is not re-applied: the scaled learning rates are in the optimizer and scheduler states (load
        those first: the LRs found here are taken as the ones the guard left, the reference for a hand-set LR).
        A fresh trusted snapshot of the loaded state is taken.
        """
        self.step = int(state.get("step", 0))
        self._clips.load_state_dict(state.get("clippers", []))
        self.engine.load_state_dict(state)
        self.engine.start(self._host, self.step)
        self._lrs.record()

    def close(self) -> None:
        """End of training: check the weights the last update made (no later step will), write the last interval's
        scalars, every scalar's last value and the overview figure, remove the forward hook and free the snapshots. A
        damaged state is then handled like any fault (a rollback, or a halt)."""
        self._hook.remove()
        self.engine.check_weights(self.step)
        self._host.emit_scalars({**self._clips.scalars(final=True), **self.engine.scalars()}, self.step)
        self.engine.finish(self.step, "halt" if self.engine.halted else "end")  # last values and the overview
        self.engine.stop()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(clipping={self.clipping!r}, "
            + (f"clipping_options={self.clipping_options!r}, " if self.clipping_options else "")
            + f"action={self.action!r}, step={self.step}, "
            f"skipped={self.skipped_steps}, rollbacks={self.rollbacks}, lr_scale={self.lr_scale:g})"
        )


_NOT_GUARD_OPTIONS = frozenset(
    {"self", "o", "model", "optimizers", "schedulers", "scaler", "clipping", "clipping_options", "writer",
     "announce", "lr_overwrite", "all_reduce_max", "process_group", "__class__"}
)  # fmt: skip
