"""Gradient clipping with thresholds learned from running statistics of the gradient norm."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_gradguard.callbacks.log_writer import ProgressBarValues, log_scalars, tag
from lightning_gradguard.callbacks.step_context import grad_stats_for, optimizer_index
from lightning_gradguard.callbacks.strategy_support import check_supported_strategy
from lightning_gradguard.core.arg_checks import check_choice, check_int, is_number
from lightning_gradguard.core.clipping import (
    clip_by_agc_,
    clip_by_global_norm_,
    clip_by_param_norm_,
    clip_by_value_,
    clip_coefficient,
    scale_,
)
from lightning_gradguard.core.grad_stats import GradStats, layer_name_of, norms_of
from lightning_gradguard.core.running_stats import DecayedHistogramQuantile, EMAMeanVar, WindowQuantile
from lightning_gradguard.core.thresholds import fallback_threshold, zscore, zscore_clip_target, zscore_threshold

__all__ = ["AdaptiveGradientClipping", "ClipRecord"]

Method = Literal["zscore", "percentile", "agc", "norm", "value", "per_parameter"]
METHODS = ("zscore", "percentile", "agc", "norm", "value", "per_parameter")
ADAPTIVE = ("zscore", "percentile")
_STATE_VERSION = 1
#: The progress bar's clip_rate is refreshed every this many steps of its optimizer.
_BAR_EVERY = 10


@dataclass
class ClipRecord:
    """What the callback did to one optimizer at its latest step (tensors on the gradients' device; no sync).

    Attributes:
        step: the optimizer's own step counter (0-based) at that step.
        grad_norm: pre-clip global norm (``norm_type``).
        threshold: the global-norm threshold in force (zscore, percentile, norm), the per-parameter bound
            (per_parameter), the element bound (value); None for agc. ``inf`` means "no clipping".
        clipped: bool scalar, did the step clip anything.
        coefficient: the factor all gradients were multiplied by (global methods), per-parameter factors
            (per_parameter), None otherwise.
        warmup: whether the warm-up fallback was in force (host bool).
        zscore: (property) z-score of ``grad_norm`` against the statistics before the step; zscore method only,
            NaN while warming up; computed when read.
    """

    step: int
    grad_norm: Tensor
    threshold: Tensor | None
    clipped: Tensor
    coefficient: Tensor | None = None
    warmup: bool = False
    # zscore method: the statistics before the step (z is computed on access, i.e. on logging steps only)
    stat_mean: Tensor | None = None
    stat_var: Tensor | None = None
    stat_count: Tensor | None = None

    @property
    def zscore(self) -> Tensor | None:
        if self.stat_mean is None or self.stat_var is None or self.stat_count is None:
            return None
        if self.warmup:
            return torch.full_like(self.stat_mean, math.nan)
        z = zscore(self.grad_norm.to(self.stat_mean.dtype), self.stat_mean, self.stat_var)
        return torch.where(self.stat_count >= 2, z, math.nan)


class _OptimizerState:
    """Running statistics and counters of one optimizer (checkpointed through the callback's state_dict)."""

    def __init__(self, stats: EMAMeanVar | WindowQuantile | DecayedHistogramQuantile | None) -> None:
        self.stats = stats
        self.steps = 0  # optimizer steps seen (host counter, drives warm-up and the log schedule)
        self.steps_since_log = 0
        self.clipped_since_log = torch.zeros((), dtype=torch.long)
        self.clipped_total = torch.zeros((), dtype=torch.long)

    def count_clip(self, clipped: Tensor) -> None:
        dev = clipped.device
        if self.clipped_total.device != dev:
            self.clipped_total = self.clipped_total.to(dev)
            self.clipped_since_log = self.clipped_since_log.to(dev)
        inc = clipped.to(torch.long)
        self.clipped_total = self.clipped_total + inc
        self.clipped_since_log = self.clipped_since_log + inc
        self.steps += 1
        self.steps_since_log += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "steps_since_log": self.steps_since_log,
            "clipped_since_log": self.clipped_since_log.detach().cpu().clone(),
            "clipped_total": self.clipped_total.detach().cpu().clone(),
            "stats": self.stats.state_dict() if self.stats is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.steps_since_log = int(state.get("steps_since_log", 0))
        for key in ("clipped_since_log", "clipped_total"):
            value = state.get(key)
            if isinstance(value, Tensor):
                setattr(self, key, value.detach().clone().to(torch.long).reshape(()))
        if self.stats is not None and state.get("stats"):
            self.stats.load_state_dict(state["stats"])


def _check_positive(name: str, value: Any, allow_inf: bool = False) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    ok = value > 0 and (math.isfinite(value) or (allow_inf and value == math.inf))
    if not ok:
        rng = "> 0 (inf allowed)" if allow_inf else "finite and > 0"
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return float(value)


@lru_cache(maxsize=64)
def _excluded_mask(names: tuple[str, ...], patterns: tuple[str, ...]) -> tuple[bool, ...]:
    def hit(name: str) -> bool:
        layer = layer_name_of(name)
        return any(fnmatchcase(name, p) or fnmatchcase(layer, p) or name.startswith(p + ".") for p in patterns)

    return tuple(hit(n) for n in names)


class AdaptiveGradientClipping(Callback):
    r"""Clip gradients with a threshold learned from running statistics of the gradient norm.

    Acts in ``on_before_optimizer_step``: once per real optimizer step (after gradient accumulation, after AMP
    unscaling, before the parameter update), per optimizer (several optimizers and manual optimization supported;
    each optimizer has its own statistics). The norms come from the shared per-step measurement
    (:func:`~lightning_gradguard.callbacks.step_context.grad_stats_for`), so nothing is measured twice, and the clip
    is applied on the device with the coefficient as a tensor: no host synchronisation except on logging steps.

    Methods:

    - ``"zscore"`` (ZClip, arXiv 2504.02507): EMA mean and variance of the global norm (weight ``1 - ema_decay`` on
      the newest value, warm-started: the first values get their plain mean and variance). A norm above
      ``mean + z_threshold * std`` (statistics *before* this step) is scaled down to that threshold
      (``clip_to="threshold"``) or to the running mean (``clip_to="mean"``). The statistics are then updated with
      ``min(norm, threshold)``: a spike counts as the threshold, so one 1e6 blow-up barely moves later thresholds.
    - ``"percentile"`` (AutoClip, Seetharaman et al. 2020): threshold = the ``percentile``-th percentile of recent
      global norms, from a ring buffer of the last ``window`` norms (``percentile_estimator="window"``, exact) or an
      exponentially decayed log-bucket histogram with a memory of ``window`` steps (``"histogram"``, within 15%,
      O(1) in the window). Statistics are updated with the unclipped norm (a percentile is robust to outliers).
      Unlike AutoClip, the current norm is not part of its own threshold.
    - ``"agc"`` (Brock et al. 2021): unit-wise (each output row; biases and scalars as a whole), a gradient whose
      norm exceeds ``clipping * max(weight_norm, eps)`` is scaled down to it. ``exclude`` names layers to leave
      alone (the paper does not clip the final classifier layer).
    - ``"norm"``: fixed global-norm clipping at ``max_norm`` (like ``gradient_clip_val``).
    - ``"value"``: fixed element-wise clipping to ``[-clip_value, clip_value]``.
    - ``"per_parameter"``: each parameter's gradient clipped to its own norm bound ``max_norm``.

    Warm-up and fallback (zscore, percentile): for the first ``warmup_steps`` optimizer steps the statistics are
    collected while the threshold is ``min(fallback_factor * reference, fallback_max_norm)``, where the reference is
    the running mean (zscore) or median (percentile) of the norms seen so far. This protects a run from its second
    step on; the very first step has nothing to compare with and is only capped when ``fallback_max_norm`` is set.
    The same fallback applies later whenever no statistics exist yet (e.g. every earlier norm was NaN).

    Non-finite norms are never clipped (scaling inf gives NaN) and never enter the statistics: NaN/inf are for
    :class:`~lightning_gradguard.NaNGuard`. Refuses ``Trainer(gradient_clip_val=...)`` (two clippers fight).

    Logged every ``log_every_n_steps`` steps of each optimizer (tags of optimizers after the first end in
    ``_opt<i>``), at step ``trainer.global_step``:

    ==================================  =================================================================
    tag                                 value
    ==================================  =================================================================
    ``gradguard/clip_threshold``        threshold in force (global norm for zscore/percentile/norm; the
                                        per-parameter bound; the element bound for value); not for agc,
                                        nor while it is infinite
    ``gradguard/grad_norm_clipped``     global gradient norm after clipping (``norm_type``)
    ``gradguard/clip_fraction``         share of this optimizer's steps that clipped since the last log
    ``gradguard/grad_norm_zscore``      zscore only: z-score of the pre-clip norm (once statistics exist)
    ==================================  =================================================================

    The pre-clip norm itself is ``gradguard/grad_norm`` of :class:`~lightning_gradguard.GradientNormMonitor`.
    The log schedule counts each optimizer's own steps (with one optimizer that is ``trainer.global_step``; with two
    manual optimizers ``global_step`` grows by 2 per batch, and both still log every n of their steps).
    With ``progress_bar=True`` the share of all steps clipped so far shows as ``clip_rate`` (``clip_rate_opt<i>``),
    refreshed every 10 steps (Lightning's ``self.log`` would cost more than the clip on small models); each refresh
    is read to the host, one sync per 10 steps on GPU. Without a progress bar nothing is sent.

    The latest decision per optimizer index is kept in :attr:`last` (a :class:`ClipRecord`) for users and tests.

    Args:
        method: ``"zscore"``, ``"percentile"``, ``"agc"``, ``"norm"``, ``"value"`` or ``"per_parameter"``.
        z_threshold: zscore: clip norms with a z-score above this (> 0).
        clip_to: zscore: ``"threshold"`` or ``"mean"``, what an outlier is scaled down to.
        ema_decay: zscore: weight of the past in the EMA, in (0, 1) (0.97 ~ the last 33 steps).
        percentile: percentile: which percentile of recent norms is the threshold, in (0, 100].
        window: percentile: how many recent steps the estimator covers (>= 2).
        percentile_estimator: percentile: ``"window"`` (exact ring buffer) or ``"histogram"`` (decayed log buckets).
        clipping: agc: the bound on unit gradient norm / unit weight norm (> 0).
        eps: agc: floor on the unit weight norm (> 0).
        exclude: agc: layer or parameter name patterns (``fnmatch``, or a module name prefix) left unclipped, e.g.
            ``["fc"]`` or ``["head.*"]``.
        max_norm: norm / per_parameter: the fixed norm bound (> 0).
        clip_value: value: the fixed element bound (> 0).
        norm_type: p of the gradient norms (> 0 or inf); agc always uses unit L2 norms and requires 2.
        warmup_steps: zscore / percentile: steps on the fallback while statistics accumulate (>= 0).
        fallback_factor: zscore / percentile: the warm-up threshold is this multiple of the typical norm (>= 1).
        fallback_max_norm: optional fixed ceiling during warm-up (> 0, or None for none), also on the first step.
        log_every_n_steps: log every n steps of each optimizer (>= 1); None: ``trainer.log_every_n_steps``.
        progress_bar: show the clip rate in the progress bar.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range (the message names it, the allowed range and the value received), and
            at setup when ``Trainer(gradient_clip_val=...)`` (> 0) is set too or the Trainer holds a second
            AdaptiveGradientClipping.

    Example:
        >>> cb = AdaptiveGradientClipping("zscore", z_threshold=3.0)
        >>> cb.method, cb.z_threshold
        ('zscore', 3.0)
        >>> AdaptiveGradientClipping("zscore", z_threshold=-1)
        Traceback (most recent call last):
        ...
        ValueError: z_threshold must be finite and > 0, got -1
    """

    def __init__(
        self,
        method: Method = "zscore",
        *,
        z_threshold: float = 2.5,
        clip_to: Literal["threshold", "mean"] = "threshold",
        ema_decay: float = 0.97,
        percentile: float = 10.0,
        window: int = 1000,
        percentile_estimator: Literal["window", "histogram"] = "window",
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude: list[str] | tuple[str, ...] | None = None,
        max_norm: float = 1.0,
        clip_value: float = 1.0,
        norm_type: float = 2.0,
        warmup_steps: int = 10,
        fallback_factor: float = 10.0,
        fallback_max_norm: float | None = None,
        log_every_n_steps: int | None = None,
        progress_bar: bool = False,
    ) -> None:
        self.method = check_choice("method", method, METHODS)
        self.z_threshold = _check_positive("z_threshold", z_threshold)
        self.clip_to = check_choice("clip_to", clip_to, ("threshold", "mean"))
        if not is_number(ema_decay):
            raise TypeError(f"ema_decay must be a float in (0, 1), got {type(ema_decay).__name__} ({ema_decay!r})")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in the open interval (0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        if not is_number(percentile):
            raise TypeError(f"percentile must be a number in (0, 100], got {type(percentile).__name__}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.window = check_int("window", window, 2)
        self.percentile_estimator = check_choice("percentile_estimator", percentile_estimator, ("window", "histogram"))
        self.clipping = _check_positive("clipping", clipping)
        self.eps = _check_positive("eps", eps)
        if exclude is None:
            exclude = ()
        if isinstance(exclude, str) or not isinstance(exclude, (list, tuple)):
            raise TypeError(f"exclude must be a list or tuple of str, got {type(exclude).__name__} ({exclude!r})")
        for pattern in exclude:
            if not isinstance(pattern, str):
                raise TypeError(f"exclude must hold non-empty str patterns, got {pattern!r} in {exclude!r}")
        if not all(exclude):
            raise ValueError(f"exclude must hold non-empty str patterns, got an empty pattern in {exclude!r}")
        self.exclude = tuple(exclude)
        self.max_norm = _check_positive("max_norm", max_norm)
        self.clip_value = _check_positive("clip_value", clip_value)
        self.norm_type = _check_positive("norm_type", norm_type, allow_inf=True)
        if self.method == "agc" and self.norm_type != 2.0:
            raise ValueError(f"norm_type must be 2.0 with method='agc' (unit-wise L2 norms), got {norm_type!r}")
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        if not is_number(fallback_factor):
            raise TypeError(f"fallback_factor must be a number >= 1, got {type(fallback_factor).__name__}")
        if not (1.0 <= fallback_factor < math.inf):
            raise ValueError(f"fallback_factor must be finite and >= 1, got {fallback_factor!r}")
        self.fallback_factor = float(fallback_factor)
        self.fallback_max_norm = (
            None if fallback_max_norm is None else _check_positive("fallback_max_norm", fallback_max_norm)
        )
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        if not isinstance(progress_bar, bool):
            raise TypeError(f"progress_bar must be a bool, got {type(progress_bar).__name__} ({progress_bar!r})")
        self.progress_bar = progress_bar
        self._bar = ProgressBarValues()
        self._states: dict[int, _OptimizerState] = {}
        self._log_every = self.log_every_n_steps or 50
        #: The latest :class:`ClipRecord` of each optimizer index.
        self.last: dict[int, ClipRecord] = {}

    # ------------------------------------------------------------------ identity and state

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"method": self.method}
        if self.method == "zscore":
            config.update(z_threshold=self.z_threshold, clip_to=self.clip_to, ema_decay=self.ema_decay)
        elif self.method == "percentile":
            config.update(percentile=self.percentile, window=self.window, estimator=self.percentile_estimator)
        elif self.method == "agc":
            config.update(clipping=self.clipping, eps=self.eps, exclude=list(self.exclude))
        elif self.method in ("norm", "per_parameter"):
            config.update(max_norm=self.max_norm)
        else:
            config.update(clip_value=self.clip_value)
        if self.method != "agc":
            config["norm_type"] = self.norm_type
        return config

    def clip_rate(self, optimizer_idx: int = 0) -> float | None:
        """Share of optimizer ``optimizer_idx``'s steps that clipped, over the whole fit so far (resumes included);
        None before its first step. Reads one value from the device."""
        state = self._states.get(optimizer_idx)
        if state is None or state.steps == 0:
            return None
        return float(state.clipped_total) / state.steps

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._config())

    def _new_stats(self) -> EMAMeanVar | WindowQuantile | DecayedHistogramQuantile | None:
        if self.method == "zscore":
            return EMAMeanVar(decay=self.ema_decay)
        if self.method == "percentile":
            q = self.percentile / 100.0
            if self.percentile_estimator == "window":
                return WindowQuantile(q=q, window=self.window)
            return DecayedHistogramQuantile(q=q, window=self.window)
        return None

    def _state(self, idx: int) -> _OptimizerState:
        state = self._states.get(idx)
        if state is None:
            state = self._states[idx] = _OptimizerState(self._new_stats())
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "optimizers": {idx: st.state_dict() for idx, st in sorted(self._states.items())},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for idx, st in (state_dict.get("optimizers") or {}).items():
            self._state(int(idx)).load_state_dict(st)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clippers = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, AdaptiveGradientClipping)]
        if len(clippers) > 1:
            raise ValueError(
                f"Found {len(clippers)} AdaptiveGradientClipping callbacks "
                f"({', '.join(repr(cb.method) for cb in clippers)}); use one: each would clip the gradients the "
                "previous one already clipped."
            )
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:  # Lightning: 0 means off
            raise ValueError(
                "AdaptiveGradientClipping clips gradients itself and cannot run together with "
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}): remove gradient_clip_val "
                "(for a fixed clip use AdaptiveGradientClipping(method='norm', max_norm=...) or method='value')."
            )
        check_supported_strategy(trainer, type(self).__name__)
        self._log_every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bar.reset()  # Lightning cleared the progress-bar values before this hook

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        idx = optimizer_index(trainer, optimizer)
        norm_type = 2.0 if self.method == "agc" else self.norm_type
        stats = grad_stats_for(trainer, pl_module, optimizer, norm_type)
        if not stats.grads:
            return
        state = self._state(idx)
        record = self._clip(stats, state)
        self.last[idx] = record
        log_now = state.steps % self._log_every == 0
        state.count_clip(record.clipped)
        if log_now:
            self._log(trainer, idx, stats, state, record)
        if self.progress_bar:
            # refreshed every few steps: Lightning's self.log costs more than the clipping itself on small models
            suffix = "" if idx == 0 else f"_opt{idx}"
            self._bar.show_every(
                trainer,
                pl_module,
                f"clip_rate{suffix}",
                lambda: state.clipped_total.to(torch.float32) / state.steps,
                state.steps,
                _BAR_EVERY,
            )

    # ------------------------------------------------------------------ one step

    def _clip(self, stats: GradStats, state: _OptimizerState) -> ClipRecord:
        method = self.method
        norm = stats.total_norm
        if method == "zscore":
            return self._clip_zscore(stats, state)
        if method == "percentile":
            return self._clip_percentile(stats, state)
        if method == "norm":
            coef, clipped = clip_by_global_norm_(stats.grads, norm, self.max_norm)
            return ClipRecord(state.steps, norm, norm.new_tensor(self.max_norm), clipped, coef)
        if method == "per_parameter":
            coef, clipped = clip_by_param_norm_(stats.grads, stats.param_norms, self.max_norm)
            return ClipRecord(state.steps, norm, norm.new_tensor(self.max_norm), clipped, coef)
        if method == "value":
            clipped = clip_by_value_(stats.grads, self.clip_value, stats.finite)
            return ClipRecord(state.steps, norm, norm.new_tensor(self.clip_value), clipped)
        # agc
        params, grads = stats.params, stats.grads
        if self.exclude:
            mask = _excluded_mask(tuple(stats.names), self.exclude)
            params = [p for p, skip in zip(params, mask) if not skip]
            grads = [g for g, skip in zip(grads, mask) if not skip]
        if not grads:
            return ClipRecord(state.steps, norm, None, torch.zeros((), dtype=torch.bool, device=norm.device))
        clipped_units, _ = clip_by_agc_(params, grads, self.clipping, self.eps)
        return ClipRecord(state.steps, norm, None, clipped_units > 0)

    def _clip_zscore(self, stats: GradStats, state: _OptimizerState) -> ClipRecord:
        ema = cast(EMAMeanVar, state.stats)
        if stats.device.type == "cpu" and ema.on_cpu:
            return self._clip_zscore_host(stats, state)
        return self._clip_zscore_device(stats, state)

    def _clip_zscore_host(self, stats: GradStats, state: _OptimizerState) -> ClipRecord:
        """:meth:`_clip_zscore_device` in Python arithmetic for CPU gradients, with identical results.

        Reading a CPU tensor is not a device synchronisation, and the threshold rule is about thirty scalar torch
        operations of a few microseconds each: on small CPU models that cost more than the clip itself.
        """
        ema = cast(EMAMeanVar, state.stats)
        norm = stats.total_norm
        value = norm.item()
        mean, var, count = ema.host_values()
        cap = math.inf if self.fallback_max_norm is None else float(self.fallback_max_norm)
        fallback = min(self.fallback_factor * mean, cap) if count > 0 else cap
        warmup = state.steps < self.warmup_steps
        if warmup or count < 2:
            threshold = target = fallback
        else:
            threshold = mean + self.z_threshold * math.sqrt(max(var, 0.0))
            target = mean if self.clip_to == "mean" else threshold
        if math.isfinite(value) and value > threshold:
            coef = clip_coefficient(norm, target)  # float32 arithmetic, as on the device path
            scale_(stats.grads, coef)
        else:
            coef = torch.ones((), dtype=torch.float32)
        before = ema.compute()  # the statistics before this step (update_host rebinds, never mutates, them)
        ema.update_host(min(value, threshold))
        return ClipRecord(
            state.steps,
            norm,
            torch.tensor(threshold, dtype=torch.float64),
            coef < 1.0,
            coef,
            warmup,
            before["mean"],
            before["var"],
            before["count"],
        )

    def _clip_zscore_device(self, stats: GradStats, state: _OptimizerState) -> ClipRecord:
        ema = cast(EMAMeanVar, state.stats)
        norm = stats.total_norm
        mean, var, count = (t.to(norm.device) for t in ema.compute().values())  # no-op after the first step
        norm64 = norm.to(mean.dtype)
        fallback = fallback_threshold(mean, count > 0, self.fallback_factor, self.fallback_max_norm)
        warmup = state.steps < self.warmup_steps
        if warmup:
            threshold = target = fallback
        else:
            ready = count >= 2
            threshold = torch.where(ready, zscore_threshold(mean, var, self.z_threshold), fallback)
            target = threshold
            if self.clip_to != "threshold":
                clip_to = cast(Literal["threshold", "mean"], self.clip_to)
                target = torch.where(ready, zscore_clip_target(mean, var, self.z_threshold, clip_to), fallback)
        over = torch.isfinite(norm64) & (norm64 > threshold)
        coef = clip_coefficient(norm, torch.where(over, target, math.inf))
        scale_(stats.grads, coef)
        # a spike enters the statistics as the threshold, never as itself (ZClip); NaN/inf are masked inside
        ema.update(torch.minimum(norm64, threshold))
        return ClipRecord(state.steps, norm, threshold, coef < 1.0, coef, warmup, mean, var, count)

    def _clip_percentile(self, stats: GradStats, state: _OptimizerState) -> ClipRecord:
        est = cast("WindowQuantile | DecayedHistogramQuantile", state.stats)
        norm = stats.total_norm
        count = est.count
        warmup = state.steps < self.warmup_steps
        if warmup:
            median = est.compute(0.5)
            threshold = fallback_threshold(median, count > 0, self.fallback_factor, self.fallback_max_norm)
        else:
            cap = math.inf if self.fallback_max_norm is None else self.fallback_max_norm
            threshold = torch.where(count > 0, est.compute(), cap)
        threshold = threshold.to(norm.device)
        coef, clipped = clip_by_global_norm_(stats.grads, norm, threshold)
        est.update(norm)  # AutoClip keeps the unclipped norms; non-finite ones are masked inside
        return ClipRecord(state.steps, norm, threshold, clipped, coef, warmup)

    # ------------------------------------------------------------------ logging

    def _post_clip_norm(self, stats: GradStats, record: ClipRecord) -> Tensor:
        if self.method in ("zscore", "percentile", "norm") and record.coefficient is not None:
            return stats.total_norm * record.coefficient
        # value / per_parameter / agc change each gradient differently: measure again (logging steps only)
        p = stats.norm_type
        norms = norms_of(stats.grads, p)
        return torch.linalg.vector_norm(norms, p) if norms.numel() else norms.new_zeros(())

    def _log(self, trainer: pl.Trainer, idx: int, stats: GradStats, state: _OptimizerState, record: ClipRecord) -> None:
        metrics: dict[str, float] = {}
        if record.threshold is not None:
            threshold = float(record.threshold)
            if math.isfinite(threshold):
                metrics[tag("clip_threshold", idx)] = threshold
        post = float(self._post_clip_norm(stats, record))
        if math.isfinite(post):
            metrics[tag("grad_norm_clipped", idx)] = post
        metrics[tag("clip_fraction", idx)] = int(state.clipped_since_log) / max(1, state.steps_since_log)
        if record.zscore is not None:
            z = float(record.zscore)
            if math.isfinite(z):
                metrics[tag("grad_norm_zscore", idx)] = z
        state.clipped_since_log = torch.zeros_like(state.clipped_since_log)
        state.steps_since_log = 0
        log_scalars(trainer, metrics, step=trainer.global_step)
