"""GradGuard: gradguard's clipping and NaN/divergence recovery for a plain PyTorch (or Fabric) training loop.

The same core objects as the Lightning callbacks make every decision: the clipper of
:mod:`lightning_gradguard.core.clip._registry` (one per optimizer), the guard policy of
:mod:`lightning_gradguard.core.guard._policy`, the finite-divergence and stability detectors, the snapshot store and
the scheduler-safe LR scaling. This module only measures, wires those objects to a loop's model, optimizers,
schedulers and GradScaler, agrees across ranks, and logs. On the same gradient stream it takes the same decisions as
``AdaptiveGradientClipping`` + ``NaNGuard`` in a Trainer (``tests/plain/test_same_decisions.py`` checks it).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_gradguard.core._arg_checks import check_bool, check_choice, check_int, check_number
from lightning_gradguard.core.clip._registry import CLIPPERS, Clipper, ClipRecord, check_clip_options, make_clipper
from lightning_gradguard.core.guard._policy import POLICIES, GuardEvent, GuardPolicy
from lightning_gradguard.core.guard._step_judge import StepJudge, Verdict
from lightning_gradguard.core.measure._grad_stats import GradStats, compute_grad_stats
from lightning_gradguard.core.recover._snapshot import BufferCopy, SnapshotStore
from lightning_gradguard.plain.distributed import MaxReducer, Reduce, rank_and_world
from lightning_gradguard.plain.recovery import Recovery
from lightning_gradguard.plain.summary_log import SummaryLog

__all__ = ["GradGuard"]

_OWNER = "GradGuard"


def _as_list(value: Any, name: str, kind: type | tuple[type, ...]) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, kind):
            allowed = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise TypeError(f"{_OWNER}: {name} must be a {allowed} or a list of them, got {type(item).__name__}")
    return items


def _raw_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a wrapper (Fabric's ``_FabricOptimizer``, Lightning's ``LightningOptimizer``)."""
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


class _Slot:
    """One optimizer's clipper and counters."""

    def __init__(self, clipper: Clipper | None) -> None:
        self.clipper = clipper
        self.steps = 0
        # counts of clipped steps: device tensors once a clipper answers with one (read only when reported)
        self.clipped_total: Any = 0
        self.clipped_since_log: Any = 0
        self.steps_since_log = 0
        self.record: ClipRecord | None = None
        self.params_key: tuple[tuple[int, int], ...] = ()
        self.params: list[Tensor] = []
        self.names: list[str] = []
        self.pending = False  # the clipper holds statistics of a step whose verdict is not in yet
        self.stats: GradStats | None = None


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
    :attr:`amp_overflow_steps`, never a fault). With gradient accumulation call :meth:`before_step` once per
    optimizer step, after the last micro-batch, with the summed loss. Under DDP (``torch.distributed`` initialised)
    every rank must make the same calls; decisions are agreed by one max-reduce per step.

    Logging: with ``writer`` (a ``torch.utils.tensorboard.SummaryWriter``), rank 0 writes the same ``gradguard/``
    tags as the callbacks every ``log_every_n_steps`` steps and at every event (step axis: :attr:`step`, the number
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
        amp_scale_floor: a GradScaler scale below this counts as divergence (> 0).
        raise_on_halt: raise :class:`~lightning_gradguard.DivergenceError` on halt (else :attr:`halted` is set and
            :meth:`before_step` returns False from then on).
        report_dir: on halt, write ``grad_guard_report.json``/``.txt`` there (cause, non-finite parameters, recent
            norms and losses, events); None: no report.
        writer: a ``SummaryWriter`` (anything with ``add_scalar``/``add_text``), used on rank 0 only.
        log_every_n_steps: scalar logging interval (>= 1).
        history_size: recent norms and losses kept for halt reports.
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
        amp_scale_floor: float = 1.0,
        raise_on_halt: bool = True,
        report_dir: str | os.PathLike | None = None,
        writer: Any = None,
        log_every_n_steps: int = 50,
        history_size: int = 50,
        all_reduce_max: Reduce | None = None,
        process_group: Any = None,
    ) -> None:
        o = _OWNER
        if not isinstance(model, nn.Module):
            raise TypeError(f"{o}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizers = [_raw_optimizer(x) for x in _as_list(optimizers, "optimizers", torch.optim.Optimizer)]
        self.schedulers = (
            [] if schedulers is None else (list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers])
        )
        self.scaler = scaler
        if clipping is not None and not isinstance(clipping, Clipper):
            check_choice("clipping", clipping, tuple(CLIPPERS), owner=o)
        if clipping_options is not None and not (
            isinstance(clipping_options, Mapping) and all(isinstance(k, str) for k in clipping_options)
        ):
            raise TypeError(
                f"{o}: clipping_options must be a dict of option name -> value, got {type(clipping_options).__name__}"
            )
        if clipping_options and not isinstance(clipping, str):
            raise ValueError(
                f"{o}: clipping_options is only for a method name; got clipping={clipping!r} "
                "(configure a clipper object through its own arguments)"
            )
        self.clipping = clipping
        #: the checked clipping options (empty: the method's defaults).
        self.clipping_options: dict[str, Any] = {}
        if clipping_options:
            self.clipping_options = check_clip_options(cast(str, clipping), owner=o, **clipping_options)
        self.action = check_choice("action", action, POLICIES, owner=o)
        self.escalate_to = check_choice("escalate_to", escalate_to, ("rollback", "halt"), owner=o)
        self.lr_factor = cast(float, check_number("lr_factor", lr_factor, low=0.0, high=1.0, low_open=True, owner=o))
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, 0, owner=o)
        self.snapshot_every_n_steps = check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1, owner=o)
        self.snapshot_confirm_steps = check_int("snapshot_confirm_steps", snapshot_confirm_steps, 0, owner=o)
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, 0, owner=o)
        self.check_params = check_bool("check_params", check_params, owner=o)
        self.divergence = check_bool("divergence", divergence, owner=o)
        self.stability = check_bool("stability", stability, owner=o)
        self.raise_on_halt = check_bool("raise_on_halt", raise_on_halt, owner=o)
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise TypeError(f"{o}: report_dir must be a str, a path or None, got {type(report_dir).__name__}")
        self.report_dir = report_dir
        pos = "a finite number > 0"
        self.spike_zscore = check_number(
            "spike_zscore", spike_zscore, low=0.0, low_open=True, high_open=True, allow_none=True, owner=o, describe=pos
        )
        self.spike_window = check_int("spike_window", spike_window, 2, high=10**6, owner=o)
        self.amp_scale_floor = cast(
            float,
            check_number(
                "amp_scale_floor", amp_scale_floor, low=0.0, low_open=True, high_open=True, owner=o, describe=pos
            ),
        )
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, owner=o)
        self.history_size = check_int("history_size", history_size, 1, high=10**6, owner=o)

        self.reduce = MaxReducer(all_reduce_max, process_group)
        self.rank = rank_and_world(process_group)[0] if all_reduce_max is None else None
        self.policy = GuardPolicy(action, max_consecutive_skips, escalate_to, max_rollbacks)
        self.judge = StepJudge(
            self.reduce,
            self.divergence,
            self.stability,
            self.spike_zscore,
            self.spike_window,
            self.amp_scale_floor,
            self.history_size,
        )
        self.store = SnapshotStore(capacity=2, confirm_steps=self.snapshot_confirm_steps)
        self.buffers = BufferCopy()
        self.log = SummaryLog(self, writer)
        self._names = self._param_names()
        self._slots = [self._new_slot() for _ in self.optimizers]
        for opt, slot in zip(self.optimizers, self._slots):  # e.g. complex parameters under clipping="value"
            if slot.clipper is not None:
                named = [(self._names.get(id(p), "?"), p) for g in opt.param_groups for p in g["params"]]
                slot.clipper.check_parameters(named, owner=o)
        #: optimizer steps attempted so far (the step axis of logs and events, like the Trainer's ``global_step``).
        self.step = 0
        self.skipped_steps = 0
        self.amp_overflow_steps = 0
        #: cumulative LR factor applied by rollbacks and stability cuts.
        self.lr_scale = 1.0
        #: every event as a plain dict (``GuardEvent.to_dict``), oldest first.
        self.events: list[dict[str, Any]] = []
        #: the latest :class:`~lightning_gradguard.core.clip.ClipRecord` of each optimizer index.
        self.last: dict[int, ClipRecord] = {}
        #: the action taken at the last step (``"healthy"``, ``"amp_overflow"``, ``"skip"``, ``"rollback"``, ...).
        self.last_action = "healthy"
        self.halted = False
        self._open = False  # a step window is open (buffers saved at its first forward)
        self._checked = False
        self._verdict: Verdict | None = None
        self._last_dropped = False  # the step the clippers last clipped was dropped: they must not learn from it
        self._since_snapshot = 0
        self.recovery = Recovery(self)
        self._hook = model.register_forward_pre_hook(self._on_forward)
        if self.action != "halt":
            self.recovery.take_snapshot(trusted=True)

    # ------------------------------------------------------------------ set-up helpers
    @property
    def inner_model(self) -> nn.Module:
        """The model without DDP or Fabric wrappers (its parameter names carry no wrapper prefix)."""
        inner = self.model
        wrapped = getattr(inner, "module", None)
        while isinstance(wrapped, nn.Module) and wrapped is not inner:
            inner, wrapped = wrapped, getattr(wrapped, "module", None)
        return inner

    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.inner_model.named_parameters()}

    def _new_slot(self) -> _Slot:
        if self.clipping is None:
            return _Slot(None)
        if isinstance(self.clipping, Clipper):
            return _Slot(copy.deepcopy(self.clipping))
        return _Slot(make_clipper(self.clipping, owner=_OWNER, **self.clipping_options))

    def _on_forward(self, _module: nn.Module, _inputs: Any) -> None:
        if not self._open and torch.is_grad_enabled():  # the first training forward of a step: buffers as they are
            self._open = True
            self.buffers.save(self.model)

    @property
    def rollbacks(self) -> int:
        return self.policy.rollbacks

    def clip_rate(self, optimizer_idx: int = 0) -> float | None:
        """Share of optimizer ``optimizer_idx``'s steps that clipped so far; None before its first step."""
        slot = self._slots[optimizer_idx]
        return float(slot.clipped_total) / slot.steps if slot.steps else None

    # ------------------------------------------------------------------ the step
    def before_step(self, loss: Tensor | float | None = None) -> bool:
        """Measure, clip and judge this optimizer step; True: take it, False: do not (its gradients are now None).

        Args:
            loss: the step's (unscaled) training loss, summed over accumulated micro-batches; None if not known
                (then only the gradients are judged).
        """
        if self.halted:
            self._drop_grads()
            self._checked = True
            return False
        self._unscale()
        stats = [self._measure(i, opt) for i, opt in enumerate(self.optimizers)]
        for i, s in enumerate(stats):  # commit the previous step's statistics, then clip this one
            self._clip(i, s)
        verdict = self.judge.judge(self.step, stats, loss, self.scaler)
        self.log.observe(verdict.norm, verdict.loss)
        self._verdict = verdict
        self._checked = True
        self._last_dropped = verdict.health is not None
        if self._last_dropped:
            self._drop_grads()
        return not self._last_dropped

    def after_step(self) -> None:
        """Carry out the decision for the step just taken (or not): snapshot, roll back, lower the LR or halt."""
        if not self._checked:
            raise RuntimeError(f"{_OWNER}.after_step() called without before_step() for step {self.step}")
        self._checked, self._open = False, False
        if self.halted:
            self.step += 1
            return
        verdict, self._verdict = self._verdict, None
        if verdict is None:  # pragma: no cover - _checked guarantees a verdict
            return
        pending = verdict.health
        if pending is None:
            self.judge.clip_flags = [s.record.clipped for s in self._slots if s.record is not None]
        step = self.step
        self.step += 1
        if pending is not None:
            self.recovery.handle_fault(pending, verdict)
        elif verdict.lower_lr is not None:
            self.recovery.lower_lr(step, verdict.lower_lr)
        else:
            self.recovery.healthy(verdict.overflow)
        if pending is None and step % self.log_every_n_steps == 0:
            self.log.scalars(step)

    def _unscale(self) -> None:
        if self.scaler is None or not self.scaler.is_enabled():
            return
        states = getattr(self.scaler, "_per_optimizer_states", {})
        for opt in self.optimizers:
            stage = states.get(id(opt), {}).get("stage")
            if stage is None or getattr(stage, "name", "") == "READY":
                self.scaler.unscale_(opt)

    def _measure(self, idx: int, opt: torch.optim.Optimizer) -> GradStats:
        slot = self._slots[idx]
        key = tuple((id(g["params"]), len(g["params"])) for g in opt.param_groups)
        if slot.params_key != key:  # built once; again only when the param groups change
            slot.params = [p for g in opt.param_groups for p in g["params"]]
            slot.names = [self._names.get(id(p), f"opt{idx}.param_{j}") for j, p in enumerate(slot.params)]
            slot.params_key = key
        params, names = slot.params, slot.names
        clipper = slot.clipper
        return compute_grad_stats(params, names, clipper.norm_type if clipper is not None else 2.0)

    def _clip(self, idx: int, stats: GradStats) -> None:
        slot = self._slots[idx]
        slot.stats = stats
        if not stats.grads or slot.clipper is None:
            return
        if slot.pending:
            slot.clipper.commit(dropped=self._last_dropped)
        record = slot.clipper.clip_(stats)
        record.step = slot.steps
        slot.record = self.last[idx] = record
        slot.pending = True
        slot.steps += 1
        slot.steps_since_log += 1
        slot.clipped_total = slot.clipped_total + record.clipped  # no host read: a tensor stays on its device
        slot.clipped_since_log = slot.clipped_since_log + record.clipped

    def _drop_grads(self) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None  # optimizers leave parameters without a gradient (and their state) alone

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, clipper statistics, policy and detectors (plain data; in-memory snapshots are not included)."""
        for slot in self._slots:
            if slot.pending and slot.clipper is not None:
                slot.clipper.commit(dropped=self._last_dropped)
                slot.pending = False
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "amp_overflow_steps": self.amp_overflow_steps,
            "lr_scale": self.lr_scale,
            "events": [dict(e) for e in self.events],
            "clippers": [
                {
                    "steps": s.steps,
                    "clipped_total": int(s.clipped_total),
                    "clipper": s.clipper.state_dict() if s.clipper is not None else {},
                }
                for s in self._slots
            ],
            "policy": self.policy.state_dict(),
            **self.judge.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (after loading the model, optimizer and scheduler states yourself).

        The LR scale is not re-applied: the scaled learning rates are in the optimizer and scheduler states.
        A fresh trusted snapshot of the loaded state is taken.
        """
        self.step = int(state.get("step", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.amp_overflow_steps = int(state.get("amp_overflow_steps", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.events = [dict(e) for e in state.get("events", [])]
        for slot, saved in zip(self._slots, state.get("clippers", [])):
            slot.steps = int(saved.get("steps", 0))
            slot.clipped_total = int(saved.get("clipped_total", 0))
            if slot.clipper is not None:
                slot.clipper.load_state_dict(saved.get("clipper") or {})
            slot.pending = False
        self.policy.load_state_dict(state.get("policy") or {})
        self.judge.load_state_dict(state)
        self.store.reset()
        if self.action != "halt":
            self.recovery.take_snapshot(trusted=True)

    def close(self) -> None:
        """End of training: check the weights the last update made (no later step will), write the last interval's
        scalars, remove the forward hook and free the snapshots. A damaged state is then handled like any fault (a
        rollback, or a halt)."""
        self._hook.remove()
        self.recovery.check_weights()
        self.log.scalars(self.step, final=True)
        self.store.reset()
        self.buffers.clear()

    def record_event(self, event: GuardEvent) -> None:
        self.events.append(event.to_dict())
        self.log.event(event)

    def __repr__(self) -> str:
        return (
            f"GradGuard(clipping={self.clipping!r}, "
            + (f"clipping_options={self.clipping_options!r}, " if self.clipping_options else "")
            + f"action={self.action!r}, step={self.step}, "
            f"skipped={self.skipped_steps}, rollbacks={self.rollbacks}, lr_scale={self.lr_scale:g})"
        )
