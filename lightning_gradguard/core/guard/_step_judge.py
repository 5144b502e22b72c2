"""The judgement of one optimizer step, shared by every guard: one stack of scalars, one cross-rank max, one host read.

The rules are the core detectors' (:class:`~lightning_gradguard.core.guard._divergence.DivergenceDetector`,
:class:`~lightning_gradguard.core.guard._stability.StabilityController`,
``LossSpikeDetector``); :class:`StepJudge` feeds them the step's pre-clip
gradient norm, loss and flags in one fixed order and returns a :class:`Verdict` whose
:class:`~lightning_gradguard.core.guard._policy.StepHealth` goes to the policy. The Trainer's ``NaNGuard`` and the
plain-loop ``GradGuard`` both use it, so both judge the same gradient stream alike.

An inf gradient norm with an enabled GradScaler and a finite loss is an AMP overflow (the scaler skips the step
itself), not a fault. The norm is the float64 one, finite exactly when every gradient element is. Under DDP the
step's causes are what this rank saw and the decision inputs (overflow, divergence, stability) are the maximum over
the ranks, so the detectors stay in lockstep; a rank that saw nothing itself records ``other_rank``.

The cross-rank reduction is injected (:class:`RankReducer`): the Trainer guard passes one built on
``trainer.strategy.reduce``, the plain guard one on ``torch.distributed`` (or Fabric's ``all_reduce``). With a single
process nothing is stacked or communicated: the scalars are read to the host directly. Under sharding the step's
values can instead travel with the gradient measurement's own collective (:meth:`StepJudge.rider`, a
:class:`~lightning_gradguard.core.measure.Rider`): everything but the norm is known before the measurement (the loss
after backward, the clip flags of the last step, the GradScaler's scale), and the norm is the global one, the same on
every rank; the judge then reads the carried maxima and reduces nothing itself.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

from lightning_gradguard.core.guard._divergence import DivergenceDetector
from lightning_gradguard.core.guard._loss_spike import LossSpikeDetector
from lightning_gradguard.core.guard._policy import GuardCause, StepHealth
from lightning_gradguard.core.guard._stability import StabilityController, StabilityFinding
from lightning_gradguard.core.measure._grad_stats import GradStats, vanished_mask
from lightning_gradguard.core.measure._host_read import read_scalars
from lightning_gradguard.core.measure._spike_score import SpikeScore

_GRADS = attrgetter("grads")
_CPU = torch.device("cpu")
_NEW_TUPLE = tuple.__new__  # StepScalars from a tuple without the generated __new__'s frame (what _make does)


def nan_as_inf(t: Tensor) -> Tensor:
    """``t`` with NaN made +inf and the infinities kept, for a MAX reduce (collectives may drop NaN). Plain
    ``nan_to_num`` would also turn +inf into the largest finite float: an inf loss would then look finite on the
    other ranks."""
    return torch.nan_to_num(t, nan=math.inf, posinf=math.inf, neginf=-math.inf)


class RankReducer(Protocol):
    """Element-wise maximum of a float64 vector over the ranks; ``world_size`` 1 means nothing to communicate."""

    @property
    def world_size(self) -> int: ...

    def __call__(self, local: Tensor) -> Tensor: ...


def any_rank(reduce: RankReducer | None, *flags: bool, device: torch.device | None = None) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks through ``reduce`` (one reduce; nothing to communicate on a single rank)."""
    if reduce is None or reduce.world_size <= 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=device)
    return tuple(v > 0 for v in reduce(t).tolist())


class StepScalars(NamedTuple):
    """The scalars :meth:`StepJudge.judge` reads for one step, in the order they are stacked and reduced (this
    rank's, or their maximum over the ranks). Flags are 0.0 or 1.0.

    Attributes:
        norm: the float64 pre-clip gradient norm.
        loss: the loss (0.0 when none was given).
        loss_nonfinite: the loss is NaN/inf.
        scale_bad: the GradScaler's scale is below the floor.
        spike: the loss z-score test fired.
        clip_flags: one per clipper: it clipped the previous step taken (the stability controller's input).
    """

    norm: float
    loss: float
    loss_nonfinite: float
    scale_bad: float
    spike: float
    clip_flags: list[float]

    @classmethod
    def of(cls, values: list[float]) -> StepScalars:
        """Name the slots of a stacked vector (the first five scalars, then the clip flags)."""
        return cls(values[0], values[1], values[2], values[3], values[4], values[5:])


@dataclass
class Verdict:
    """The judgement of one step.

    Attributes:
        health: what was wrong, or None for a step to take.
        overflow: a GradScaler overflow step (taken; the scaler skips it).
        stability: the stability controller's finding that the LR should come down after this step, or None
            (also readable as :attr:`lower_lr`).
        loss, norm: this rank's loss (None when not given) and pre-clip gradient norm.
        stats: the measured statistics of the optimizers that had gradients.
    """

    health: StepHealth | None
    overflow: bool
    stability: StabilityFinding | None
    loss: float | None
    norm: float
    stats: list[GradStats] = field(default_factory=list)

    @property
    def lower_lr(self) -> StabilityFinding | None:
        """The stability finding (:attr:`stability`): the LR should come down after this step."""
        return self.stability


def total_norm64(live: list[GradStats], device: torch.device) -> Tensor:
    """The float64 pre-clip norm over every optimizer's gradients (the p-norm of their total norms): finite exactly
    when every gradient element is (a huge finite gradient is the clipper's business, not a fault)."""
    if not live:
        return torch.zeros((), dtype=torch.float64, device=device)
    if len(live) == 1:
        return live[0].total_norm64
    p = live[0].norm_type
    norms = torch.stack([s.total_norm64.to(device) for s in live])
    return norms.max() if p == math.inf else torch.linalg.vector_norm(norms, p)


class StepRider:
    """The judge's values of one step but the norm (loss, its finiteness, the scale flag, the spike test, the clip
    flags), ready to travel with the step's sharded measurement (:meth:`StepJudge.rider`).

    Built before the measurement from what :meth:`StepJudge.judge` will be given; :meth:`values` computes them when
    the measurement asks (the spike test is scored then and added to its window only when the judge uses them, so
    the detector moves once per step whichever way the values travel).
    """

    def __init__(self, judge: StepJudge, loss: Tensor | float | None, scale: Tensor | None) -> None:
        self.judge = judge
        self.loss = loss
        self.scale = scale
        self.clip_flags = judge.clip_flags  # the list object: a new one is set after every step
        self.device: torch.device | None = None
        self.local: Tensor | None = None  # this rank's values, float64
        self._commit: Any = None

    def values(self, device: torch.device) -> Tensor | None:
        if self.local is None:
            parts, self._commit = self.judge._parts(self.loss, self.scale, device, commit_spike=False)
            self.device, self.local = device, torch.stack([p.to(device, torch.float64).reshape(()) for p in parts])
        return nan_as_inf(self.local.clone())

    def fits(self, loss: Tensor | float | None, scale: Tensor | None, clip_flags: list[Any], dev: torch.device) -> bool:
        """Were these values built from what the judge is now given (else the judge builds its own)?"""
        return (
            self.local is not None
            and loss is self.loss
            and scale is self.scale
            and clip_flags is self.clip_flags
            and dev == self.device
        )

    def commit(self) -> None:
        """The judge uses these values: add the loss to the spike window (once)."""
        if self._commit is not None:
            self._commit()
            self._commit = None


class LossStream:
    """The detectors of one loss stream (one optimizer's loss: a GAN's generator and discriminator, or a second
    objective that starts late, are judged each against its own history) and the row it feeds the stability
    controller once the next step proves healthy."""

    __slots__ = ("controller", "detector", "last", "spikes")

    def __init__(self) -> None:
        self.detector = DivergenceDetector()
        self.controller = StabilityController()
        self.spikes = SpikeScore()  # the run's health number (logged, never acted on)
        #: the step's loss, norm, LR and vanished gradient tensors (a mask per tensor; older checkpoints: a share;
        #: None: not measured)
        self.last: tuple[float, float, float | None, tuple[bool, ...] | float | None] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "divergence": self.detector.state_dict(),
            "stability": self.controller.state_dict(),
            "spike_score": self.spikes.state_dict(),
            "pending_row": list(self.last) if self.last is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("divergence") or {})
        self.controller.load_state_dict(state.get("stability") or {})
        self.spikes.load_state_dict(state.get("spike_score") or {})
        row = state.get("pending_row")
        if row is None:
            self.last = None
        else:
            lr = float(row[2]) if len(row) > 2 and row[2] is not None else None
            raw = row[3] if len(row) > 3 else None
            vanished: tuple[bool, ...] | float | None = None
            if isinstance(raw, (list, tuple)):
                vanished = tuple(bool(v) for v in raw)
            elif raw is not None:
                vanished = float(raw)  # older checkpoints: the share
            self.last = (float(row[0]), float(row[1]), lr, vanished)


class StepJudge:
    """Feeds the detectors and builds each step's :class:`Verdict`.

    With one process and everything on the CPU the step's values are read directly as Python numbers
    (:attr:`host_fast_path`); otherwise they are stacked as tensors, reduced across ranks and read in one transfer.
    Either way the same decision code runs on the same numbers.

    Args:
        reduce: the cross-rank maximum (None: a single process).
        divergence, stability: run the divergence detector / the stability controller.
        spike_zscore, spike_window: the optional loss z-score test (None: off).
        amp_scale_floor: a GradScaler scale below this is a collapse.
        history_size: rows of (step, norm) and (step, loss) kept for reports.
    """

    #: read CPU values directly in a single process (class-wide switch; tests set it to False for the tensor path)
    host_fast_path: ClassVar[bool] = True

    def __init__(
        self,
        reduce: RankReducer | None,
        divergence: bool,
        stability: bool,
        spike_zscore: float | None,
        spike_window: int,
        amp_scale_floor: float,
        history_size: int,
    ) -> None:
        self.reduce = reduce
        self.divergence = divergence
        self.stability = stability
        self.amp_scale_floor = amp_scale_floor
        #: GradScaler overflow steps in a row (each halved the scale) that make a collapse (None: only the floor)
        self.amp_max_halvings: int | None = None
        self.overflows_in_a_row = 0
        #: whether the guard can test a climb's claim on the batches (it sets this; the controllers read it)
        self.testable = True
        #: whether the guard tests a far loss level that holds on the batch before it becomes the reference (it sets
        #: this where a rerun can run; the divergence detectors read it: :attr:`DivergenceDetector.test_held`)
        self.test_held = False
        #: the loss streams by key (the optimizer's index; 0 for a single optimizer or one loss for all)
        self.streams: dict[int, LossStream] = {0: LossStream()}
        self.spike = LossSpikeDetector(spike_zscore, spike_window) if spike_zscore else None
        self.grad_history: deque[list[float]] = deque(maxlen=history_size)
        self.loss_history: deque[list[float]] = deque(maxlen=history_size)
        #: clip flags (bools or device tensors) of the last step taken: the stability controller's input next step.
        self.clip_flags: list[Any] = []
        self._sized: Any = None  # the reducer whose world size _one_rank holds
        self._one_rank = reduce is None
        self._rider: StepRider | None = None  # the values offered to this step's measurement

    @property
    def detector(self) -> DivergenceDetector:
        """The divergence detector of stream 0."""
        return self.streams[0].detector

    @property
    def controller(self) -> StabilityController:
        """The stability controller of stream 0."""
        return self.streams[0].controller

    def stream(self, key: int) -> LossStream:
        """The detectors of loss stream ``key`` (created on first use)."""
        found = self.streams.get(key)
        if found is None:
            found = self.streams[key] = LossStream()
        return found

    def rider(self, loss: Tensor | float | None, scaler: Any) -> StepRider | None:
        """The values :meth:`judge` will reduce for this step, offered to the step's measurement so that they travel
        in its collective (sharded gradients over every rank); None where the judge reduces nothing (one process).
        ``loss`` and ``scaler``: what :meth:`judge` will be given. :meth:`judge` uses the carried maxima only when
        they were built from the same loss, scale and clip flags, and otherwise reduces as always."""
        reduce = self.reduce
        if reduce is None or reduce.world_size <= 1:
            return None
        self._rider = rider = StepRider(self, loss, self._scale_of(scaler)[1])
        return rider

    @staticmethod
    def _scale_of(scaler: Any) -> tuple[bool, Tensor | None]:
        """(is a GradScaler enabled, its scale tensor or None)."""
        scaled = scaler is not None and scaler.is_enabled()
        scale = getattr(scaler, "_scale", None) if scaled else None
        return scaled, scale if isinstance(scale, Tensor) else None

    def _parts(
        self, loss: Tensor | float | None, scale: Tensor | None, dev: torch.device, commit_spike: bool = True
    ) -> tuple[list[Tensor], Any]:
        """The step's scalar tensors but the norm (:class:`StepScalars` order from ``loss``), and the spike window's
        pending commit when ``commit_spike`` is False (None otherwise, or when nothing is pending)."""
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        loss_t = self._loss_tensor(loss, dev) if loss is not None else zero
        scale_bad = self._scale_bad(scale, dev) if scale is not None else zero
        commit = None
        if self.spike is not None and loss is not None:
            if commit_spike:
                spike = self.spike.update(loss_t)
            else:
                spike, commit = self.spike.score(loss_t)
        else:
            spike = zero
        parts = [loss_t, ~torch.isfinite(loss_t), scale_bad, spike]
        parts += [torch.as_tensor(c, device=dev).reshape(()) for c in self.clip_flags]  # tensors: no read
        return parts, commit

    def _carried(
        self, live: list[GradStats], loss: Tensor | float | None, scale: Tensor | None, dev: torch.device
    ) -> tuple[StepScalars, StepScalars] | None:
        """(mine, the maxima) from the values that travelled with the measurement of ``live``, or None when they
        did not (then the judge reduces them itself)."""
        rider, self._rider = self._rider, None
        if rider is None or len(live) != 1:
            return None
        carried = live[0].carried
        if carried is None or carried[0] is not rider or not rider.fits(loss, scale, self.clip_flags, dev):
            return None
        rider.commit()
        norm = total_norm64(live, dev).to(dev, torch.float64).reshape(1)
        local = torch.cat([norm, rider.local])  # type: ignore[list-item]
        # the norm is the global one, the same on every rank: its maximum is itself (NaN sent as in _values)
        glob = torch.cat([nan_as_inf(norm.clone()), carried[1].to(dev, torch.float64)])
        values = torch.cat([local, glob]).tolist()
        return StepScalars.of(values[: local.numel()]), StepScalars.of(values[local.numel() :])

    def _values(self, parts: list[Tensor], dev: torch.device) -> tuple[StepScalars, StepScalars]:
        """(this rank's values, their maximum over the ranks), in one host read."""
        if self.reduce is None or self.reduce.world_size <= 1:
            mine = StepScalars.of([float(v) for v in read_scalars(parts, dev, dtype=torch.float64)])
            return mine, mine
        local = torch.stack([p.to(dev, torch.float64).reshape(()) for p in parts])
        glob = self.reduce(nan_as_inf(local.clone()))
        values = torch.cat([local, glob.to(dev, torch.float64)]).tolist()
        return StepScalars.of(values[: len(parts)]), StepScalars.of(values[len(parts) :])

    def _loss_tensor(self, loss: Tensor | float, dev: torch.device) -> Tensor:
        """The loss as a scalar tensor on ``dev``: a Python number keeps its float64 precision, a tensor its dtype."""
        raw = loss.detach() if isinstance(loss, Tensor) else torch.tensor(loss, dtype=torch.float64)
        return raw.to(dev).reshape(())

    def _scale_bad(self, scale: Tensor, dev: torch.device) -> Tensor:
        """Float64 scalar tensor, 1 when the GradScaler's scale tensor is below the floor (read from the tensor
        itself: ``get_scale()`` would read it to the host)."""
        return (scale.to(dev).reshape(()) < self.amp_scale_floor).to(torch.float64)

    def _host_parts(
        self, live: list[GradStats], stats: list[GradStats], loss: Tensor | float | None, scale: Tensor | None
    ) -> StepScalars | None:
        """The values the tensor path of :meth:`judge` reads (:class:`StepScalars`), read directly when there is one
        process and everything is on the CPU: no scalar tensors are built only to be read back (each costs a few
        microseconds of dispatch). None where that does not apply."""
        reduce = self.reduce
        if reduce is not self._sized:  # the world size is fixed for a reducer (one per fit): read it once
            self._sized, self._one_rank = reduce, reduce is None or reduce.world_size <= 1
        if (  # is_cpu, not .device: building a torch.device object costs more than reading the values
            not self.host_fast_path
            or not self._one_rank
            or (stats and not stats[0].total_norm64.is_cpu)
            or (isinstance(loss, Tensor) and not loss.is_cpu)
            or (scale is not None and not scale.is_cpu)
        ):
            return None
        for c in self.clip_flags:
            if isinstance(c, Tensor) and not c.is_cpu:
                return None
        dev = _CPU
        norm = live[0].total_norm64_host if len(live) == 1 else None  # the value the measurement already read
        if norm is None:
            norm = total_norm64(live, dev).item()
        if loss is None:
            loss_v, spike = 0.0, 0.0
        else:
            loss_v = loss.item() if isinstance(loss, Tensor) else float(loss)
            spike = float(self.spike.update(self._loss_tensor(loss, dev))) if self.spike is not None else 0.0
        bad_scale = float(self._scale_bad(scale, dev)) if scale is not None else 0.0
        nonfinite_loss = 0.0 if math.isfinite(loss_v) else 1.0
        return _NEW_TUPLE(StepScalars, (norm, loss_v, nonfinite_loss, bad_scale, spike, [*map(float, self.clip_flags)]))

    def judge(
        self,
        step: int,
        stats: list[GradStats],
        loss: Tensor | float | None,
        scaler: Any,
        stream: int = 0,
        lr: float | None = None,
    ) -> Verdict:
        """Judge one step before its update from the optimizers' ``stats``, the (unscaled) ``loss`` and the
        GradScaler (None or disabled: no AMP). ``stream``: which loss stream the loss belongs to (the optimizer's
        index under manual optimization with several optimizers); ``lr``: the LR of the step (None: unknown)."""
        streamed = self.streams.get(stream) or self.stream(stream)
        live = list(filter(_GRADS, stats))  # the optimizers that had gradients
        has_loss = loss is not None
        scaled, scale = self._scale_of(scaler)
        host = self._host_parts(live, stats, loss, scale)
        if host is not None:
            mine = glob = host
            self._rider = None
        else:
            dev = stats[0].device if stats else _CPU
            carried = self._carried(live, loss, scale, dev)
            if carried is not None:  # reduced with the measurement
                mine, glob = carried
            else:
                parts, _ = self._parts(loss, scale, dev)
                mine, glob = self._values([total_norm64(live, dev), *parts], dev)
        self.clip_flags = []
        norm, loss_v = mine.norm, (mine.loss if has_loss else math.nan)
        self.grad_history.append([step, norm])
        if has_loss:
            self.loss_history.append([step, loss_v])
        # what this rank saw; the decision below uses what every rank shares
        nonfinite_loss = has_loss and mine.loss_nonfinite > 0
        nonfinite_grad = not math.isfinite(norm)
        global_grad_bad = not math.isfinite(glob.norm)
        overflow = scaled and global_grad_bad and not (glob.loss_nonfinite > 0 or glob.scale_bad > 0)
        halvings = self.amp_max_halvings
        collapsed = False
        if overflow:
            self.overflows_in_a_row += 1
            # the scaler halved its scale at every one of these steps and no update got through: the scale is
            # collapsing (the OPT-175B logbook's "grinding to a halt"); the same on every rank (shared values)
            collapsed = halvings is not None and self.overflows_in_a_row >= halvings
        elif scaled:
            self.overflows_in_a_row = 0
        if collapsed:
            overflow = False
            self.overflows_in_a_row = 0
        if overflow:
            nonfinite_grad = False  # the GradScaler's business
        loss_divergence = grad_divergence = False
        if not overflow and self.divergence and has_loss:  # on shared values: the detectors stay in lockstep
            streamed.detector.test_held = self.test_held
            loss_divergence, grad_divergence = streamed.detector.update(glob.loss, glob.norm)
        if not overflow:  # shared values: every rank's score is the same
            streamed.spikes.update(glob.loss if has_loss else None, glob.norm)
        scale_collapse, loss_spike = mine.scale_bad > 0 or collapsed, mine.spike > 0
        if collapsed:
            nonfinite_grad = False  # named as the collapse it is
        other_rank = (
            (global_grad_bad and not overflow) or glob.loss_nonfinite > 0 or glob.scale_bad > 0 or glob.spike > 0
        )
        health, cause = None, None
        # a StepHealth with every flag False is a healthy step (its contract): none is built for one
        if (
            other_rank
            or nonfinite_loss
            or nonfinite_grad
            or scale_collapse
            or loss_spike
            or loss_divergence
            or grad_divergence
        ):
            health = StepHealth(
                step,
                nonfinite_loss=nonfinite_loss,
                nonfinite_grad=nonfinite_grad,
                scale_collapse=scale_collapse,
                loss_spike=loss_spike,
                loss_divergence=loss_divergence,
                grad_divergence=grad_divergence,
            )
            # the same on every rank: some rank's loss or gradients were non-finite (the rerun diagnosis runs then)
            health.nonfinite_somewhere = glob.loss_nonfinite > 0 or (global_grad_bad and not overflow)
            cause = health.cause
            if cause is None and other_rank:  # only another rank saw something
                health.other_rank = True
                cause = health.cause
        healthy = cause is None and not overflow
        finding = None
        last = streamed.last
        if self.stability and healthy and last is not None:
            clipped = max(glob.clip_flags, default=0.0) > 0  # flags: 0 or 1
            streamed.controller.testable = self.testable
            finding = streamed.controller.update(last[0], last[1], clipped, last[2], last[3])
        if healthy and has_loss:
            # which gradients vanished, only while the dead-network rule examines the run (one small read)
            vanished = vanished_mask(live) if self.stability and streamed.controller.wants_vanished else None
            streamed.last = (glob.loss, glob.norm, lr, vanished)
        else:
            streamed.last = None
        verdict = Verdict(None, overflow, finding, loss_v if has_loss else None, norm, live)
        if health is not None and cause is not None:
            # without the detector nothing says the run was stable before the fault: assume it was not
            # (a divergence: before its far values began; its own far steps say nothing about what came before)
            detector = streamed.detector
            diverged = cause in (GuardCause.LOSS_DIVERGENCE, GuardCause.GRAD_DIVERGENCE)
            health.unsettled = (
                (detector.unsettled_before if diverged else detector.unsettled) if self.divergence else True
            )
            verdict.health = health
        return verdict

    def after_state_change(self) -> None:
        """A rollback or LR cut: the run restarts from another state (baselines kept, counting in progress not)."""
        for streamed in self.streams.values():
            streamed.last = None
            streamed.detector.restart_runs()
            streamed.controller.reset()
            streamed.controller.forget_undone()

    def restart_from_scratch(self) -> None:
        """A restart from the untrained state after the network died: the baselines describe the failed trajectory
        (a dead network's collapsed norms would call the fresh network's norms a divergence), so every detector
        learns anew and every controller starts a new run (its counters of findings kept)."""
        for streamed in self.streams.values():
            streamed.last = None
            streamed.detector.reset()
            streamed.controller.forget_run()

    def forget_last_step(self) -> None:
        """A new run of steps (e.g. a new fit without a resumed state): no previous step feeds the controller."""
        for streamed in self.streams.values():
            streamed.last = None
        self.clip_flags = []

    def state_dict(self) -> dict[str, Any]:
        first = self.streams[0].state_dict()
        return {
            **first,  # stream 0 under the keys of a single stream (older checkpoints have only these)
            "streams": {str(k): v.state_dict() for k, v in self.streams.items() if k != 0},
            "spike": self.spike.state_dict() if self.spike is not None else None,
            "grad_history": [list(r) for r in self.grad_history],
            "loss_history": [list(r) for r in self.loss_history],
            "clip_flags": [bool(c) for c in self.clip_flags],
            "overflows_in_a_row": self.overflows_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streams = {0: LossStream()}
        self.streams[0].load_state_dict(state)
        for key, sub in dict(state.get("streams") or {}).items():
            self.stream(int(key)).load_state_dict(sub)
        if self.spike is not None and state.get("spike"):
            self.spike.load_state_dict(state["spike"])
        self.grad_history.clear()
        self.grad_history.extend(list(r) for r in state.get("grad_history", []))
        self.loss_history.clear()
        self.loss_history.extend(list(r) for r in state.get("loss_history", []))
        self.clip_flags = [bool(c) for c in state.get("clip_flags", [])]
        self.overflows_in_a_row = int(state.get("overflows_in_a_row", 0))
