"""The adaptive clippers: thresholds learned from the run's own gradient norms (z-score and percentile).

Both share the warm-up (:class:`~lightning_gradguard.core.clip._warmup.WarmupReference`), the growth limit of the
threshold (:func:`~lightning_gradguard.core.clip._thresholds.limit_growth`) and the deferred commit: a step is learned
from only at :meth:`~lightning_gradguard.core.clip.Clipper.commit`, once it is known whether the step was
dropped. NaN/inf norms are never clipped and never learned from; nor are zero (and tiny) norms
(:func:`~lightning_gradguard.core.clip._thresholds.informative`): a masked or empty batch says nothing about how
large a healthy gradient is, and a statistic that learned it would set the threshold to 0, which scales every later
gradient to 0 and, through the growth limit, stays 0. Zero-norm steps do not count as warm-up steps either (the
warm-up waits for real norms, however many masked batches come first), and no threshold in force is ever 0: while
the statistics have nothing to go by, the fallback applies.

The warm-up ends only when its reference is settled (issue 24): a deep plain network whose initialisation explodes
starts with norms of 100s that fall by orders of magnitude as the capped steps tame it, and statistics learned from
those steps would start ~100x above where the run settles and never clip it again. The window slides until its
halves agree, with the fallback (and its cap) in force meanwhile; a fall of its level within the first
``MAX_WARMUP_FACTOR`` x ``warmup_steps`` steps resumes the warm-up (:meth:`_AdaptiveClipper._maybe_start`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from lightning_gradguard.core.clip._base import Clipper, ClipRecord, Number
from lightning_gradguard.core.clip._ops import clip_by_global_norm_, clip_coefficient, foreach_mul_
from lightning_gradguard.core.clip._options import check_clip_option as _opt
from lightning_gradguard.core.clip._recurrence import RecurringOutliers
from lightning_gradguard.core.clip._running_stats import DecayedHistogramQuantile, WindowQuantile
from lightning_gradguard.core.clip._thresholds import (
    TINY_NORM,
    ema_step,
    informative,
    limit_growth,
    minimum,
    zscore_threshold,
)
from lightning_gradguard.core.clip._warmup import MAD_TO_STD, MAX_WARMUP_FACTOR, WarmupReference, lower_median
from lightning_gradguard.core.measure._grad_stats import GradStats


class _AdaptiveClipper(Clipper):
    """Shared by the z-score and percentile clippers: warm-up, growth limit, deferred commit."""

    def __init__(self, warmup_steps: int, fallback_factor: float, fallback_max_norm: float | None) -> None:
        o = type(self).__name__  # arguments are checked as everywhere (core/clip/_options.py), naming this class
        warmup_steps = self.warmup_steps = _opt("warmup_steps", warmup_steps, o)
        fallback_factor = self.fallback_factor = _opt("fallback_factor", fallback_factor, o)
        fallback_max_norm = _opt("fallback_max_norm", fallback_max_norm, o)
        self.cap = math.inf if fallback_max_norm is None else float(fallback_max_norm)
        self.warm = WarmupReference(max(1, warmup_steps), fallback_factor, self.cap)
        self.max_warmup = MAX_WARMUP_FACTOR * self.warm.size  # the warm-up ends by then, settled or not
        self.seen = 0  # committed steps (host counter)
        self.started = False  # the warm-up is over: the reference is full and the statistics run (host flag)
        self._probation = False  # started, and the window still slides: a fall of its level resumes the warm-up
        self._fell = False  # the probation undid a start (the norms fell) less than max_warmup steps into the run
        self.limit: Number = math.inf  # threshold in force at the last committed step
        self.pinned = False  # held at the warm-up's capped fallback for good (pin())
        self._pending: tuple[Number, Number] | None = None  # (norm, threshold) of the step awaiting its verdict

    @property
    def warming_up(self) -> bool:
        return not self.started

    def _maybe_start(self) -> None:
        """Before a step's threshold: end the warm-up once its window is settled, or undo a start that the run
        proved premature.

        - The warm-up ends once the window is full (``warmup_steps`` steps; zero-norm steps take none) and settled
          (:meth:`~lightning_gradguard.core.clip._warmup.WarmupReference.settled`: its older and newer halves agree
          within a factor sqrt(10), so it is not a transient such as the falling norms of an exploding
          initialisation), or at the latest after ``MAX_WARMUP_FACTOR`` x ``warmup_steps`` steps. Until then the
          fallback threshold (and its cap) stays in force and the window slides. A steady run ends it after exactly
          ``warmup_steps`` steps.
        - Probation: until ``MAX_WARMUP_FACTOR`` x ``warmup_steps`` steps the window keeps sliding after the start;
          if the newer half of the window falls an order of magnitude below the older (about 100x across the window:
          :meth:`~lightning_gradguard.core.clip._warmup.WarmupReference.fell`), the statistics were learned from a
          transient (a plateau of exploding norms as long as the window looks steady while it lasts): they are
          dropped and the warm-up resumes until the window settles at the new level. A rise is never a reason: that
          is what the statistics are there to clip. A start undone this way still counts as recent for
          :attr:`in_probation` until the probation period is over (the fall is often the network the released
          statistics let blow up, dying: its divergence is theirs, though the cap is back in force by then).

        Asked from ``warmup_steps`` committed steps on (the window cannot be full earlier), then at every step until
        the probation is over: one host read per step on the tensor path, only during those first steps; nothing
        afterwards."""
        if self.pinned or self.seen < self.warm.size or not (self._probation or not self.started):
            return
        taken, settled, fell = self.warm.progress()
        if taken >= self.max_warmup:
            self._fell = False
        if self.started:
            if taken >= self.max_warmup:
                self._probation = False
            elif fell:
                self.started = self._probation = False
                self._fell = True
                self._restart()
            return
        if taken >= self.warm.size and (settled or taken >= self.max_warmup):
            self.started, self._probation = True, self.warm.tested and taken < self.max_warmup
            self._begin()

    @property
    def in_probation(self) -> bool:
        """The statistics took over from the warm-up's cap less than ``MAX_WARMUP_FACTOR`` x ``warmup_steps`` steps
        into the run: they are on probation now, or the probation undid their start when the norms fell (see
        :meth:`_maybe_start`). False without a finite cap, and once pinned."""
        return math.isfinite(self.cap) and ((self.started and self._probation) or self._fell)

    def pin(self) -> bool:
        """Never (again) leave the warm-up: the threshold stays ``min(fallback_factor * median, cap)`` of the
        sliding window, so ``cap`` (``fallback_max_norm``) binds while the norms are far above it, as a fixed clip
        would. Asked by the guard when it restarts a network that died after the statistics released the cap (their
        warm-up learned the norms of an exploding start). False when already pinned or without a finite cap."""
        if self.pinned or not math.isfinite(self.cap):
            return False
        self.pinned, self._fell = True, False
        if self.started:
            self.started = self._probation = False
            self._restart()
        return True

    def rebase(self, norms: Sequence[float]) -> bool:
        """Restart the statistics from ``norms`` (finite, above ``TINY_NORM``), the run's gradient norms at a new level
        that the guard's divergence detector adopted: far norms that hold while the loss does not rise (a
        class-incremental step: norms ~1e-3 on a separable first task, ~7 on the whole task). Statistics of the old
        level would clip the new one for hundreds of steps, their threshold growing 1 % a step (a run that then ended
        2-3 % below the unclipped one). Not during the warm-up (its window slides by itself) or once pinned. The
        step awaiting its commit is one of ``norms``: it is not learned again."""
        values = [float(v) for v in norms if math.isfinite(float(v)) and float(v) > TINY_NORM]
        if not values or self.pinned or not self.started or not self._rebase(values):
            return False
        self._pending = None
        self.limit = torch.full_like(self.limit, math.inf) if isinstance(self.limit, Tensor) else math.inf
        return True

    def _rebase(self, values: list[float]) -> bool:
        """Restart the method's statistics from ``values``; whether the method can."""
        return False

    def _restart(self) -> None:
        """The probation found the window's level fallen (its halves an order of magnitude apart): drop the statistics
        learned since the start (the warm-up's fallback is in force again until the window settles)."""

    def _begin(self) -> None:
        """The warm-up just ended (the window is full and settled, or the bound was reached): start the statistics
        from it."""

    def commit(self, dropped: bool = False) -> None:
        pending, self._pending = self._pending, None
        if pending is None or dropped:
            return
        norm, threshold = pending
        # during the warm-up the reference and the growth limit follow the uncapped warm-up threshold: the fixed cap
        # (fallback_max_norm) clips the step, it must not drag the statistics down to itself
        reference = self.warm.threshold(capped=False) if self.warming_up else threshold
        useful = informative(norm, reference)  # finite, and not a zero (or tiny) norm
        # a spike enters as the threshold, never as itself (ZClip); what is not learned stays NaN, to be left out
        if isinstance(norm, Tensor):
            capped: Number = torch.where(useful, minimum(norm, threshold), math.nan)
        else:
            capped = min(norm, float(threshold)) if useful else math.nan
        if self.warming_up:
            threshold = reference
            self.warm.add(self._warm_entry(norm, threshold, useful))
        elif self._probation:  # the window goes on sliding, by the warm-up's own rule
            window = self.warm.threshold(capped=False)
            self.warm.add(self._warm_entry(norm, window, informative(norm, window)))
        self._learn(norm, capped, useful)
        self.seen += 1
        # the limit follows the threshold in force, when finite and positive (an infinite one means "nothing to go by
        # yet"), except at a zero-norm step: like an absent one, it moves nothing
        if isinstance(norm, Tensor):
            threshold = torch.as_tensor(threshold, dtype=norm.dtype, device=norm.device)
            moves = (useful | ~torch.isfinite(norm)) & torch.isfinite(threshold) & (threshold > TINY_NORM)
            self.limit = torch.where(moves, threshold, self.limit)
        elif (useful or not math.isfinite(norm)) and math.isfinite(threshold) and threshold > TINY_NORM:
            self.limit = threshold

    def _warm_entry(self, norm: Number, threshold: Number, useful: Any) -> Number:
        """What a warm-up step adds to the reference: its norm, or the current median when the norm was above
        ``threshold`` (the uncapped warm-up threshold); when it is not ``useful``, NaN for a NaN/inf step (it takes a
        warm-up step and adds nothing) and 0 for a zero or tiny norm (it takes nothing). Not the threshold: at
        ``fallback_factor`` x the median, a run of such steps would lift the median tenfold every few steps (a
        blow-up inside the warm-up would capture the statistics)."""
        med = self.warm.median()
        if isinstance(norm, Tensor):
            instead = torch.where(torch.isnan(torch.as_tensor(med, dtype=torch.float64)).to(norm.device),
                                  threshold, med)  # fmt: skip
            skipped = torch.where(torch.isfinite(norm), 0.0, math.nan)
            return torch.where(useful, torch.where(norm <= threshold, norm, instead), skipped)
        if not useful:
            return 0.0 if math.isfinite(norm) else math.nan
        if norm <= threshold:
            return norm
        return float(threshold) if math.isnan(float(med)) else float(med)

    def _learn(self, norm: Number, capped: Number, useful: Any) -> None:
        raise NotImplementedError

    def _base_state(self) -> dict[str, Any]:
        limit = self.limit
        return {
            "method": self.method,
            "seen": self.seen,
            "started": self.started,
            "probation": self._probation,
            "fell": self._fell,
            "pinned": self.pinned,
            "limit": float(limit) if isinstance(limit, Tensor) else limit,
            "warmup": self.warm.state_dict(),
        }

    def _load_base(self, state: dict[str, Any]) -> None:
        self._pending = None
        self.seen = int(state.get("seen", 0))
        self.started = bool(state.get("started", self.seen >= self.warm.size))  # older states: a step count
        self._probation = self.started and bool(state.get("probation", False))  # older states: none
        self.pinned = bool(state.get("pinned", False))
        self._fell = bool(state.get("fell", False)) and not self.pinned
        limit = float(state.get("limit", math.inf))
        if not limit > TINY_NORM:  # a threshold of 0 (learned from zero norms by an older version) never stands
            limit = math.inf
        self.limit = limit if isinstance(self.limit, float) else torch.tensor(limit, dtype=torch.float64)
        self.warm.load_state_dict(state.get("warmup", {}))


class ZScoreClipper(_AdaptiveClipper):
    """ZClip (Kumar et al. 2025, arXiv 2504.02507) with statistics a blow-up cannot capture.

    - Warm-up (``warmup_steps`` committed steps, at least 1, not counting zero-norm steps, which are never learned,
      and longer while the window of the last ``warmup_steps`` norms is not settled, as when an exploding
      initialisation is being tamed; see :meth:`_AdaptiveClipper._maybe_start`): threshold
      ``min(fallback_factor * median, cap)`` of the window (``cap`` = ``fallback_max_norm``, 1.0 by default as
      ZClip's ``max_grad_norm``, Kumar et al. 2025; it clips the step only: the median learns from the norms as
      measured); then the EMA starts from the window's median and MAD (a spike in it, at step 0 too, is left out).
    - Afterwards: threshold ``mean + z_threshold * std`` of an EMA (weight ``max(1 - ema_decay, 1 / n)`` on the
      newest value), std floored at 5 % of the mean, and at most 1 % above the previous step's threshold.
    - A norm above the threshold is scaled to the threshold (``clip_to="threshold"``) or to the mean (``"mean"``)
      and enters the statistics as the threshold.
    - Unless the statistics no longer describe the stream: whatever the distribution, at most ``1 / z_threshold**2``
      of it lies beyond ``mean + z_threshold * std`` (Chebyshev's inequality). While the recent share of steps above
      the threshold (an EMA with the statistics' weight) exceeds that bound, the statistics lag a drift (a GAN's or an
      RL target's norms that grow as training goes) and a norm above the threshold but within ``fallback_factor`` x
      of it is no outlier: it is still clipped, but learned as measured (not as the threshold) and the growth limit
      is lifted, so the statistics follow the drift instead of lagging it for ever. A norm an order of magnitude
      beyond enters as the threshold however often it comes. (Releasing such steps unclipped was tried: a healthy
      deep plain CNN whose norms grow as it learns then died at chance.)
    - Exceeders that recur (:class:`~lightning_gradguard.core.clip._recurrence.RecurringOutliers`): a norm above the
      threshold that is the third or later of a chain, each within the statistics' horizon ``1 / (1 - ema_decay)``
      of the previous with a calm step between, is a component of the stream (the rare class of an imbalanced
      classifier), not an outlier: clipped at its step, learned as measured (at most ``fallback_factor`` x the
      threshold), growth limit lifted. Isolated spikes (further apart than the horizon) and blow-ups (consecutive)
      never build a chain.

    On CPU gradients the rule runs on Python floats (no tensor dispatch: the whole decision costs a few microseconds);
    on other devices on scalar tensors without host synchronisation. The arithmetic is the same functions of
    :mod:`~lightning_gradguard.core.clip._thresholds` in both cases; set :attr:`host_fast_path` to False to force the
    tensor path on the CPU (tests run their fits both ways).
    """

    method = "zscore"
    options = ("z_threshold", "clip_to", "ema_decay", "warmup_steps", "fallback_factor", "fallback_max_norm")
    #: use Python floats for CPU gradients (class-wide switch; tests flip it to exercise the tensor path).
    host_fast_path: ClassVar[bool] = True

    def __init__(
        self,
        z_threshold: float = 2.5,
        clip_to: str = "threshold",
        ema_decay: float = 0.97,
        warmup_steps: int = 10,
        fallback_factor: float = 10.0,
        fallback_max_norm: float | None = 1.0,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__(warmup_steps, fallback_factor, fallback_max_norm)
        o = type(self).__name__
        self.z_threshold = _opt("z_threshold", z_threshold, o)
        self.to_mean = _opt("clip_to", clip_to, o) == "mean"
        self.ema_decay = _opt("ema_decay", ema_decay, o)
        self.norm_type = _opt("norm_type", norm_type, o)
        self.mean: Number = 0.0
        self.var: Number = 0.0
        self.count: Number = 0  # finite values in the statistics
        #: EMA (weight 1 - ema_decay) of the share of steps above the statistical threshold, since the warm-up
        self.exceed: Number = 0.0
        #: Chebyshev's bound: at most 1 / z**2 of any distribution lies z standard deviations beyond its mean
        self.bound = 1.0 / (self.z_threshold * self.z_threshold)
        self._stat: Number = math.inf  # the statistical threshold of the step awaiting its commit
        self._drifting: Number = False  # the recent share of steps above it exceeds Chebyshev's bound
        self._free: Number = False  # that step was above the threshold and is learned as measured (a drift)
        #: exceeders that recur within the statistics' horizon are a component of the stream, not outliers
        self.recurrence = RecurringOutliers(horizon=1.0 / (1.0 - self.ema_decay))
        self._over: Number = False  # the step awaiting its commit was above the threshold (after the warm-up)

    # ---------------------------------------------------------------- host/tensor representation

    def _use_host(self, norm: Tensor) -> bool:
        return self.host_fast_path and norm.is_cpu  # not .device: a torch.device object costs ~10 us cold

    def _to_tensors(self, device: torch.device) -> None:
        def t(v: Number) -> Tensor:
            return v.to(device) if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64, device=device)

        self.mean, self.var, self.count, self.limit = t(self.mean), t(self.var), t(self.count), t(self.limit)
        self.exceed = t(self.exceed)
        self.warm.to_tensor(device)
        self.recurrence.to_tensor(device)

    # ---------------------------------------------------------------- the rule

    def _threshold(self) -> tuple[Number, Number]:
        """``(threshold, target)`` for the coming step."""
        if self.warming_up:
            thr = self.warm.threshold()
            return thr, thr
        thr = limit_growth(zscore_threshold(self.mean, self.var, self.z_threshold), self.limit)
        target = minimum(self.mean, thr) if self.to_mean else thr
        self._stat = thr
        # Chebyshev: whatever the distribution, at most 1 / z**2 of it lies beyond mean + z * std. A stream that
        # exceeds the threshold more often than that (recently) is not described by these statistics: they lag a
        # drift (a GAN's or an RL target's norms that grow as training goes), and its moderate values (within
        # fallback_factor x the threshold) are no outliers: clip_ still clips them but they are learned as measured
        # until the statistics describe the stream again. A norm an order of magnitude beyond enters as the threshold.
        # Nothing to go by (no value, or statistics of zeros from an older version): the fallback, never 0.
        if isinstance(self.count, Tensor):
            ready = (self.count > 0) & (thr > TINY_NORM)
            self._drifting = ready & (self.exceed > self.bound)
            return torch.where(ready, thr, self.cap), torch.where(ready, target, self.cap)
        if not (self.count > 0 and thr > TINY_NORM):
            self._drifting = False
            return self.cap, self.cap
        self._drifting = self.exceed > self.bound
        return thr, target

    def _begin(self) -> None:
        self.mean, self.var, self.count = self.warm.robust_start()  # the robust reference, not its raw values
        self.exceed = torch.zeros_like(self.exceed) if isinstance(self.exceed, Tensor) else 0.0
        self.recurrence.reset()

    def _rebase(self, values: list[float]) -> bool:
        center = lower_median(values)  # the robust start of the warm-up (median, MAD) on the new level's norms
        var = (MAD_TO_STD * lower_median([abs(v - center) for v in values])) ** 2
        if isinstance(self.mean, Tensor):
            like = cast(Tensor, self.mean)
            self.mean, self.var = torch.full_like(like, center), torch.full_like(like, var)
            self.count = torch.full_like(like, float(len(values)))
            self.exceed = torch.zeros_like(like)
        else:
            self.mean, self.var, self.count, self.exceed = center, var, len(values), 0.0
        self.recurrence.reset()
        return True

    def _restart(self) -> None:
        if isinstance(self.mean, Tensor):
            zeros = (torch.zeros_like(cast(Tensor, v)) for v in (self.mean, self.var, self.count))
            self.mean, self.var, self.count = zeros
        else:
            self.mean, self.var, self.count = 0.0, 0.0, 0
        self.recurrence.reset()

    def _learn(self, norm: Number, capped: Number, useful: Any) -> None:
        if self.warming_up:
            return
        step = 1.0 - self.ema_decay
        if isinstance(capped, Tensor):
            finite = torch.isfinite(capped)
            count = self.count + finite.to(torch.float64)
            rate = (1.0 / count.clamp_min(1.0)).clamp_min(1.0 - self.ema_decay)
            mean, var = ema_step(self.mean, self.var, torch.where(finite, capped, 0.0), rate)
            self.mean = torch.where(finite, mean, self.mean)
            self.var = torch.where(finite, var, self.var)
            self.count = count
            over = torch.as_tensor(norm > self._stat).to(torch.float64)
            self.exceed = torch.where(finite, self.exceed + step * (over - self.exceed), self.exceed)
            self.limit = torch.where(torch.as_tensor(self._free, device=count.device), math.inf, self.limit)
            self.recurrence.update(self._over, norm <= self._stat, useful)
            return
        self.recurrence.update(self._over, norm <= self._stat, useful)
        if math.isfinite(capped):
            self.count = int(self.count) + 1
            weight = max(1.0 / self.count, 1.0 - self.ema_decay)
            self.mean, self.var = ema_step(float(self.mean), float(self.var), capped, weight)
            above = 1.0 if norm > self._stat else 0.0
            self.exceed = float(self.exceed) + step * (above - float(self.exceed))
            if self._free:  # learned as measured: the growth limit follows the statistics, not a stale threshold
                self.limit = math.inf

    def clip_(self, stats: GradStats) -> ClipRecord:
        norm = stats.total_norm64
        if self._pending is not None:
            self.commit()
        if self._use_host(norm):
            if isinstance(self.mean, Tensor):
                self._from_tensors()
            self._maybe_start()
            warm, mean, var = self.warming_up, self.mean, self.var
            value = stats.total_norm64_host  # the value the measurement already read (CPU)
            if value is None:
                value = norm.item()
            thr, target = self._threshold()
            released = False
            coef: Number = 1.0
            clipped: Tensor | bool = False
            over = not warm and math.isfinite(value) and value > thr
            self._over = over
            if math.isfinite(value) and value > thr:
                # a drift's moderate exceeders, and exceeders that recur (a component of the stream), are learned as
                # measured (at most fallback_factor x the threshold); both are still clipped at their own step
                released = not warm and (
                    (bool(self._drifting) and value <= self.fallback_factor * float(thr))
                    or bool(self.recurrence.recurring(over))
                )
                coef = min(1.0, float(target) / (value + 1e-6))
                foreach_mul_(stats.local_grads, coef)
                clipped = True
            self._free = released
            self._pending = (value, self.fallback_factor * float(thr) if released else thr)
            host = stats.total_norm_host  # the float32 total as a Python float: no tensor op on the CPU
            grad_norm = stats.total_norm if host is None else host
            return ClipRecord(grad_norm, thr, clipped, coef, warm, stat_mean=mean, stat_var=var)
        if not isinstance(self.mean, Tensor) or self.mean.device != norm.device:
            self._to_tensors(norm.device)
        self._maybe_start()
        warm, mean, var = self.warming_up, self.mean, self.var
        thr_t, target = self._threshold()
        thr = torch.as_tensor(thr_t, dtype=torch.float64, device=norm.device)
        over = torch.isfinite(norm) & (norm > thr)
        drifting = torch.as_tensor(self._drifting, device=norm.device)
        if warm:
            self._over = released_t = torch.zeros_like(over)
        else:
            self._over = over
            released_t = over & ((drifting & (norm <= self.fallback_factor * thr)) | self.recurrence.recurring(over))
        self._free = released_t
        coef_t = clip_coefficient(norm, torch.where(over, torch.as_tensor(target), math.inf))
        grads = stats.local_grads
        if grads:
            wide = grads[0].dtype in (torch.float64, torch.complex128)
            foreach_mul_(grads, coef_t.to(torch.float64 if wide else torch.float32))
        self._pending = (norm, torch.where(released_t, self.fallback_factor * thr, thr))
        return ClipRecord(stats.total_norm, thr_t, coef_t < 1.0, coef_t, warm, stat_mean=mean, stat_var=var)

    def _from_tensors(self) -> None:
        self.mean, self.var = float(self.mean), float(self.var)
        self.exceed = float(self.exceed)
        self.count, self.limit = int(self.count), float(self.limit)
        self.recurrence.to_host()
        values = self.warm.state_dict()
        self.warm.reset()
        self.warm.load_state_dict(values)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._base_state(),
            "mean": float(self.mean),
            "var": float(self.var),
            "count": int(self.count),
            "exceed": float(self.exceed),
            "recurrence": self.recurrence.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        if state.get("method") != self.method:
            return [f"{state.get('method')!r} clipping statistics"] if state.get("method") else []
        on_tensors = isinstance(self.mean, Tensor)
        device = self.mean.device if isinstance(self.mean, Tensor) else None
        self._load_base(state)
        self.limit = float(self.limit)
        self.mean, self.var = float(state.get("mean", 0.0)), max(0.0, float(state.get("var", 0.0)))
        self.count = int(state.get("count", 0))
        self.exceed = float(state.get("exceed", 0.0))
        self.recurrence.to_host()
        self.recurrence.load_state_dict(state.get("recurrence", {}))  # older states: no chain
        if self.started and self.count > 0 and not self.mean > TINY_NORM:  # zeros learned by an older version
            self.started, self.mean, self.var, self.count, self.limit = False, 0.0, 0.0, 0, math.inf
            self._probation = False
            self.warm.reset()
        if on_tensors and device is not None:
            self._to_tensors(device)
        return []


class PercentileClipper(_AdaptiveClipper):
    """AutoClip (Seetharaman et al. 2020): threshold = the ``percentile``-th percentile of the last ``window``
    finite norms (exact ring buffer, or a decayed log-bucket histogram), at most 1 % above the previous step's
    threshold; the same warm-up as :class:`ZScoreClipper`. The estimator keeps the unclipped norms (a percentile is
    robust to outliers); the current norm is not part of its own threshold."""

    method = "percentile"
    options = ("percentile", "window", "percentile_estimator", "warmup_steps", "fallback_factor", "fallback_max_norm")

    def __init__(
        self,
        percentile: float = 10.0,
        window: int = 1000,
        percentile_estimator: str = "window",
        warmup_steps: int = 10,
        fallback_factor: float = 10.0,
        fallback_max_norm: float | None = 1.0,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__(warmup_steps, fallback_factor, fallback_max_norm)
        o = type(self).__name__
        q = _opt("percentile", percentile, o) / 100.0
        window = _opt("window", window, o)
        percentile_estimator = _opt("percentile_estimator", percentile_estimator, o)
        self.estimator: WindowQuantile | DecayedHistogramQuantile = (
            WindowQuantile(q=q, window=window)
            if percentile_estimator == "window"
            else DecayedHistogramQuantile(q=q, window=window)
        )
        self.norm_type = _opt("norm_type", norm_type, o)

    def _learn(self, norm: Number, capped: Number, useful: Any) -> None:
        if isinstance(useful, Tensor):  # what is not learned goes in as NaN, which the estimator masks
            self.estimator.update(torch.where(useful, norm, math.nan))
        else:
            self.estimator.update(norm if useful else math.nan)

    def clip_(self, stats: GradStats) -> ClipRecord:
        norm = stats.total_norm64
        if self._pending is not None:
            self.commit()
        self._maybe_start()
        warm = self.warming_up
        if warm:
            thr = self.warm.threshold()
            thr = torch.as_tensor(thr, dtype=torch.float64, device=norm.device)
        else:
            est = self.estimator
            q = limit_growth(est.compute().to(norm.device), self.limit)
            # an empty window, or one of zeros (an older version learned them): the fallback, never 0
            thr = torch.where((est.count.to(norm.device) > 0) & (q > TINY_NORM), q, self.cap)
        coef, clipped = clip_by_global_norm_(stats.local_grads, norm, thr)
        self._pending = (norm, thr)
        return ClipRecord(stats.total_norm, thr, clipped, coef, warm)

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        if state.get("method") != self.method:
            return [f"{state.get('method')!r} clipping statistics"] if state.get("method") else []
        self._load_base(state)
        saved = state.get("estimator", {})
        dropped = []
        if saved and not self.estimator.load_state_dict(saved):
            dropped.append("the percentile estimator's history (its window or kind changed)")
        return dropped
