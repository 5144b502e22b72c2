"""Gradient clipping with thresholds learned from the run's own gradient-norm statistics (the Lightning adapter)."""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradguard.callbacks._log_writer import ProgressBarValues, log_scalars
from lightning_gradguard.callbacks._step_context import (
    StepRecord,
    grad_stats_for,
    log_due,
    optimizer_index,
    step_record,
)
from lightning_gradguard.callbacks._strategy_support import check_supported_strategy
from lightning_gradguard.core._arg_checks import check_bool, check_int
from lightning_gradguard.core.clip import CLIPPERS, Clipper, ClipRecord, check_clip_options, make_clipper
from lightning_gradguard.core.clip._options import MAX_NORM_TYPE, MAX_WARMUP, MAX_WINDOW
from lightning_gradguard.core.engine._scalars import clip_scalars, tag
from lightning_gradguard.core.measure._grad_stats import GradStats

__all__ = ["MAX_NORM_TYPE", "MAX_WARMUP", "MAX_WINDOW", "METHODS", "AdaptiveGradientClipping", "ClipRecord"]

Method = Literal["zscore", "percentile", "agc", "norm", "value", "per_parameter"]
METHODS: tuple[str, ...] = tuple(CLIPPERS)
_OWNER = "AdaptiveGradientClipping"
_BAR_EVERY = 10  # the progress bar's clip_rate is refreshed every this many steps of its optimizer


class _Slot:
    """One optimizer's clipper, counters, and the step record whose verdict its pending statistics wait for."""

    def __init__(self, clipper: Clipper) -> None:
        self.clipper = clipper
        self.steps = 0
        self.clipped_total: Any = 0
        self.clipped_since_log: Any = 0
        self.steps_since_log = 0
        self.awaiting: StepRecord | None = None

    def settle(self) -> bool:
        """Let the clipper learn from its last step now that the guard's verdict on it is in; True if it was
        dropped (a guard event)."""
        if self.awaiting is None:
            return False
        dropped = self.awaiting.dropped
        self.clipper.commit(dropped=dropped)
        self.awaiting = None
        return dropped


class AdaptiveGradientClipping(Callback):
    r"""Clip gradients with a threshold learned from running statistics of the gradient norm.

    Acts in ``on_before_optimizer_step``: once per real optimizer step (after accumulation, AMP unscaling and the
    DDP all-reduce, before the update), per optimizer, each with its own clipper from
    :mod:`lightning_gradguard.core.clip._registry` (the rules live there, and so do the option checks:
    :func:`~lightning_gradguard.core.clip.make_clipper`; this class wires hooks and logs). Norms come from the
    shared per-step measurement, so nothing is measured twice.

    Methods: ``"zscore"`` (ZClip, arXiv 2504.02507: mean + z x std of an EMA of past norms), ``"percentile"``
    (AutoClip, Seetharaman et al. 2020), ``"agc"`` (Brock et al. 2021, unit-wise), fixed ``"norm"``, ``"value"``,
    ``"per_parameter"``. Adaptive thresholds warm up on ``min(fallback_factor * median, fallback_max_norm)`` of a
    window of the last ``warmup_steps`` norms until that window is settled (its older and newer halves agree within
    a factor sqrt(10): the falling norms of an exploding initialisation are a transient, not a reference; a steady run
    ends the warm-up after exactly ``warmup_steps`` steps; at most 10 x ``warmup_steps``; a fall of the level by
    ~100x across the window within those steps resumes it), may rise by at most 1 % per step, and learn only from steps
    the guard did not drop (committed at the next step, once :class:`~lightning_gradguard.NaNGuard` has ruled);
    NaN/inf norms are never clipped and never learned from, nor are zero norms (a masked or empty batch: they take no
    warm-up step, so no threshold is ever 0). A finite gradient is clipped by every method however large its norm.

    Tags (``_opt<i>`` for optimizers after the first), at log steps, after a step the guard dropped, and at the end
    (or failure) of the fit:
    ``gradguard/clip_threshold``, ``gradguard/grad_norm_clipped`` (post-clip norm), ``gradguard/clip_fraction``
    and ``gradguard/clipped_steps`` (since the previous write), ``gradguard/grad_norm_zscore`` (zscore).

    Args:
        method: one of :data:`METHODS`.
        z_threshold: zscore: clip norms with a z-score above this (> 0).
        clip_to: zscore: ``"threshold"`` or ``"mean"``, what an outlier is scaled down to.
        ema_decay: zscore: weight of the past in the EMA, in (0, 1).
        percentile: percentile: which percentile of recent norms is the threshold, in (0, 100].
        window: percentile: how many recent steps the estimator covers (2 ... 1e6).
        percentile_estimator: percentile: ``"window"`` (exact ring buffer) or ``"histogram"`` (decayed log buckets).
        clipping: agc: bound on unit gradient norm / unit weight norm (> 0).
        eps: agc: floor on the unit weight norm (> 0).
        exclude: agc: parameter/layer name patterns (``fnmatch``, or a module prefix) left unclipped.
        max_norm: norm / per_parameter: the fixed norm bound (> 0).
        clip_value: value: the fixed element bound (> 0).
        norm_type: p of the gradient norms, 1 ... 100 or inf (not for agc, which uses unit L2 norms).
        warmup_steps: zscore / percentile: steps on the fallback while statistics accumulate, and the size of the
            window whose settling ends the warm-up (0 ... 1e5; 0 acts as 1: the first step has nothing to compare
            with; below 6 the window is not tested for settling: the warm-up ends after exactly this many steps).
        fallback_factor: zscore / percentile: the warm-up threshold is this multiple of the median norm (>= 1).
        fallback_max_norm: zscore / percentile: fixed ceiling during warm-up (> 0; None for none), also on the first
            step; it clips the step, never what the statistics learn (default 1.0, ZClip's ``max_grad_norm``).
        log_every_n_steps: log interval (>= 1); None: ``trainer.log_every_n_steps``.
        progress_bar: show the share of steps clipped as ``clip_rate`` (refreshed every 10 steps).

    Raises:
        TypeError: an argument of the wrong type (the message names the class and the argument).
        ValueError: a value out of range, or an option the chosen method does not use (set to a non-default value);
            at setup, ``Trainer(gradient_clip_val>0)``, an unsupported strategy, or a complex parameter with
            ``method="value"``.

    Example:
        >>> cb = AdaptiveGradientClipping("zscore", z_threshold=3.0)
        >>> cb.method, cb.z_threshold
        ('zscore', 3.0)
        >>> AdaptiveGradientClipping("agc", z_threshold=3.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: AdaptiveGradientClipping: z_threshold=3.0 is not used by method='agc'; it applies to method ...
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
        fallback_max_norm: float | None = 1.0,
        log_every_n_steps: int | None = None,
        progress_bar: bool = False,
    ) -> None:
        o = _OWNER
        options = dict(
            z_threshold=z_threshold, clip_to=clip_to, ema_decay=ema_decay, percentile=percentile, window=window,
            percentile_estimator=percentile_estimator, clipping=clipping, eps=eps, exclude=exclude, max_norm=max_norm,
            clip_value=clip_value, norm_type=norm_type, warmup_steps=warmup_steps, fallback_factor=fallback_factor,
            fallback_max_norm=fallback_max_norm,
        )  # fmt: skip
        # every option is checked in core (the same checks and words as GradGuard's); kept as attributes for readers
        self._options = check_clip_options(method, owner=o, **options)
        self.method: str = method
        self.z_threshold: float = self._options["z_threshold"]
        self.clip_to: str = self._options["clip_to"]
        self.ema_decay: float = self._options["ema_decay"]
        self.percentile: float = self._options["percentile"]
        self.window: int = self._options["window"]
        self.percentile_estimator: str = self._options["percentile_estimator"]
        self.clipping: float = self._options["clipping"]
        self.eps: float = self._options["eps"]
        self.exclude: tuple[str, ...] = self._options["exclude"]
        self.max_norm: float = self._options["max_norm"]
        self.clip_value: float = self._options["clip_value"]
        self.norm_type: float = self._options["norm_type"]
        self.warmup_steps: int = self._options["warmup_steps"]
        self.fallback_factor: float = self._options["fallback_factor"]
        self.fallback_max_norm: float | None = self._options["fallback_max_norm"]
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True, owner=o)
        self.progress_bar = check_bool("progress_bar", progress_bar, owner=o)
        self._bar = ProgressBarValues()
        self._slots: dict[int, _Slot] = {}
        self._fits = 0  # fits trained (on_train_start)
        self._restored = False  # load_state_dict since the last fit started: a resume, not a new run
        self._log_every = self.log_every_n_steps or 50
        #: The latest :class:`ClipRecord` of each optimizer index.
        self.last: dict[int, ClipRecord] = {}

    # ------------------------------------------------------------------ state

    def _slot(self, idx: int) -> _Slot:
        slot = self._slots.get(idx)
        if slot is None:
            slot = self._slots[idx] = _Slot(make_clipper(self.method, owner=_OWNER, **self._options))
        return slot

    def clip_rate(self, optimizer_idx: int = 0) -> float | None:
        """Share of optimizer ``optimizer_idx``'s steps that clipped so far (resumes included); None before its
        first step."""
        slot = self._slots.get(optimizer_idx)
        if slot is None or slot.steps == 0:
            return None
        return float(slot.clipped_total) / slot.steps

    @property
    def state_key(self) -> str:
        # the method only (no tuning argument: a resume with a changed z_threshold keeps the statistics); two
        # clippers of different methods then reach setup, which refuses them with a clear message
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != self.method:  # Lightning reads state_key on every hook: build it once
            cached = self._state_key_cache = (self.method, self._generate_state_key(method=self.method))
        return cached[1]

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("callbacks") or {}
        if self.state_key in saved:
            return
        others = [k for k in saved if isinstance(k, str) and k.startswith(_OWNER)]
        if len(others) == 1:  # written with another method: keep the counters, warn about the statistics
            self.load_state_dict(saved[others[0]])

    def state_dict(self) -> dict[str, Any]:
        for slot in self._slots.values():
            slot.settle()  # checkpoints are written after every callback's on_train_batch_end: the verdict is in
        return {
            "optimizers": {
                idx: {"steps": s.steps, "clipped_total": int(s.clipped_total), "stats": s.clipper.state_dict()}
                for idx, s in sorted(self._slots.items())
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = True
        for idx, saved in (state_dict.get("optimizers") or {}).items():
            slot = self._slot(int(idx))
            slot.steps = int(saved.get("steps", 0))
            slot.clipped_total = int(saved.get("clipped_total", 0))
            dropped = slot.clipper.load_state_dict(saved.get("stats") or {})
            if dropped:
                rank_zero_warn(
                    f"{_OWNER}(method={self.method!r}): the checkpoint holds {' and '.join(dropped)} for optimizer "
                    f"{idx} that this configuration cannot use; dropped, its statistics start afresh (with warm-up)."
                )

    def snapshot_state(self) -> dict[int, Any]:
        """A copy of each optimizer's learned statistics, for a guard's rollback snapshot
        (:meth:`restore_snapshot_state`); the counters of clipped steps are not part of it."""
        for slot in self._slots.values():
            slot.settle()  # the guard snapshots after its verdict on the step: the step is learned (or not) now
        return {idx: copy.deepcopy(slot.clipper.state_dict()) for idx, slot in self._slots.items()}

    def clipping_in_probation(self) -> bool:
        """Whether any optimizer's learned statistics took over from the warm-up cap only recently."""
        return any(slot.clipper.in_probation for slot in self._slots.values())

    def pin_clipping(self) -> bool:
        """Hold each optimizer's threshold at its warm-up cap (``fallback_max_norm``) for the rest of the fit (the
        guard's restart of a network that died after the statistics released the cap:
        :meth:`~lightning_gradguard.core.clip.Clipper.pin`); returns whether any was pinned now."""
        return any([slot.clipper.pin() for slot in self._slots.values()])

    def rebase_clipping(self, optimizer: int, norms: list[float]) -> bool:
        """Restart optimizer ``optimizer``'s learned statistics from ``norms``, the run's gradient norms at a new level
        that the guard adopted (:meth:`~lightning_gradguard.core.clip.Clipper.rebase`); returns whether it did."""
        slot = self._slots.get(optimizer)
        return slot is not None and slot.clipper.rebase(norms)

    def restore_snapshot_state(self, state: dict[int, Any]) -> None:
        """A rollback: the statistics go back to what the snapshot held (an optimizer that had none then starts
        afresh, with its warm-up: a restart from the untrained state); the step that triggered the rollback is not
        learned. The counters of clipped steps keep counting."""
        for idx, slot in self._slots.items():
            slot.awaiting = None
            saved = state.get(idx)
            if saved is None:
                slot.clipper = make_clipper(self.method, owner=_OWNER, **self._options)
            else:
                slot.clipper.load_state_dict(copy.deepcopy(saved))

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clippers = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, AdaptiveGradientClipping)]
        if len(clippers) > 1:
            raise ValueError(
                f"Found {len(clippers)} {_OWNER} callbacks ({', '.join(repr(cb.method) for cb in clippers)}); use "
                "one: each would clip the gradients the previous one already clipped."
            )
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:  # Lightning: 0 means off
            raise ValueError(
                f"{_OWNER} clips gradients itself and cannot run together with "
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}): remove gradient_clip_val "
                "(for a fixed clip use AdaptiveGradientClipping(method='norm', max_norm=...) or method='value')."
            )
        check_supported_strategy(trainer, _OWNER)
        self._slot(0).clipper.check_parameters(list(pl_module.named_parameters()), owner=_OWNER)
        self._log_every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bar.reset()  # Lightning cleared the progress-bar values before this hook
        if self._fits and trainer.global_step == 0 and not self._restored:
            # the same callback given to a new Trainer (pre-training, then another task): the statistics and
            # counters of the last run describe another run's gradients; this one warms up afresh
            self._slots.clear()
            self.last.clear()
        self._fits += 1
        self._restored = False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        idx = optimizer_index(trainer, optimizer)
        slot = self._slot(idx)
        step = trainer.global_step  # read once: the property is 7 Python calls deep
        stats = grad_stats_for(trainer, pl_module, optimizer, slot.clipper.norm_type, step)
        if not stats.grads:
            return
        if slot.settle() and slot.steps_since_log:  # the guard dropped the last step: write the counts now
            log_scalars(trainer, self._counts(idx, slot), step=step)
        record = slot.clipper.clip_(stats)
        record.step = slot.steps
        slot.awaiting = shared = step_record(trainer, step)
        shared.clips[idx] = self.last[idx] = record
        slot.steps += 1
        slot.steps_since_log += 1
        slot.clipped_total = slot.clipped_total + record.clipped
        slot.clipped_since_log = slot.clipped_since_log + record.clipped
        if log_due(trainer, self._log_every):
            self._log(trainer, idx, slot, stats, record)
        if self.progress_bar:
            name = "clip_rate" if idx == 0 else f"clip_rate_opt{idx}"
            rate = lambda: torch.as_tensor(slot.clipped_total, dtype=torch.float32) / slot.steps  # noqa: E731
            self._bar.show_every(trainer, pl_module, name, rate, slot.steps, _BAR_EVERY)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush(trainer)

    # ------------------------------------------------------------------ logging

    def _flush(self, trainer: pl.Trainer) -> None:
        """Write what was counted since the last log (the end of a fit, or a halt, is never lost)."""
        for idx, slot in sorted(self._slots.items()):
            slot.settle()
            if slot.steps_since_log:
                log_scalars(trainer, self._counts(idx, slot), step=trainer.global_step)

    def _counts(self, idx: int, slot: _Slot) -> dict[str, float]:
        clipped = int(slot.clipped_since_log)
        metrics = {
            tag("clip_fraction", idx): clipped / max(1, slot.steps_since_log),
            tag("clipped_steps", idx): clipped,
        }
        slot.clipped_since_log, slot.steps_since_log = 0, 0
        return metrics  # type: ignore[return-value]

    def _log(self, trainer: pl.Trainer, idx: int, slot: _Slot, stats: GradStats, record: ClipRecord) -> None:
        metrics = clip_scalars(idx, stats, record, per_parameter=self.method == "per_parameter")
        metrics.update(self._counts(idx, slot))
        log_scalars(trainer, metrics, step=trainer.global_step)
