"""See how gradients behave, layer by layer, in TensorBoard: norms, update ratios, vanishing/exploding layers."""

from __future__ import annotations

import math
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_gradguard.callbacks._log_writer import log_scalars, tensorboard_writers
from lightning_gradguard.callbacks._monitor_capture import LogCapture, capture_for_log, write_views
from lightning_gradguard.callbacks._monitor_state import EVENTS_TAG, MonitorState, report_layer_health
from lightning_gradguard.callbacks._pickling import WeakrefsNotPickled
from lightning_gradguard.callbacks._step_context import (
    grad_stats_for,
    log_due,
    on_measured,
    optimizer_index,
    step_record,
    weight_norms_with_measurement,
)
from lightning_gradguard.callbacks._strategy_support import check_supported_strategy
from lightning_gradguard.callbacks._tensorboard_layout import custom_scalars_layout
from lightning_gradguard.core._arg_checks import check_bool, check_int, check_number, check_positive
from lightning_gradguard.core.engine._scalars import tag
from lightning_gradguard.core.measure._grad_stats import GradStats, compute_grad_stats
from lightning_gradguard.core.measure._interval_stats import IntervalAggregate
from lightning_gradguard.core.measure._layer_health import ExplodingDetector, LayerHealthChanges, VanishingDetector

__all__ = ["EVENTS_TAG", "GradientNormMonitor", "custom_scalars_layout"]

_OWNER = "GradientNormMonitor"
_DUPLICATE = (
    "Found 2 GradientNormMonitor callbacks; use one: they would write the same gradguard/ tags twice (one monitor "
    "covers every optimizer). default_callbacks() already includes one: configure it with monitor_kwargs=..."
)


#: the default spacing of gradient-flow images, in steps (``flow_every_n_logs=None``)
FLOW_EVERY_N_STEPS = 500


class GradientNormMonitor(WeakrefsNotPickled, Callback):
    r"""Log gradient health to TensorBoard: global and per-layer norms, update ratios, vanishing/exploding layers.

    Every optimizer step it folds the shared pre-clip global norm
    (:func:`~lightning_gradguard.callbacks._step_context.grad_stats_for`, measured once per step for all gradguard
    callbacks) into an on-device interval aggregate: no host read. On logging steps
    (:func:`~lightning_gradguard.callbacks._step_context.log_due`, the same batches for every optimizer and callback)
    it writes, with one host read. What it draws from the raw gradients (per-layer mean/max ``|grad|``, value
    histograms) is captured by an :func:`~lightning_gradguard.callbacks._step_context.on_measured` listener right after
    the measurement, before any clipper scales the gradients, whatever the callback order.
    ``gradguard/grad_norm_max``/``_mean`` cover every step since the previous write and are also written when the
    guard drops a step, at fit end and on an exception, so a spike between two logs is never lost.

    Layers are the modules that own parameters (``net.0.weight`` + ``net.0.bias`` = ``net.0``), in optimizer order.
    **Vanishing**: update ratio (grad norm / weight norm) below ``vanishing_threshold`` for ``vanishing_patience``
    consecutive logs. **Exploding**: norm above ``exploding_factor`` x the layer's running geometric mean and above
    ``exploding_z`` standard deviations of its own log norm (a layer whose norm routinely swings 10x is not exploding
    when it swings again), after ``exploding_warmup`` logs (``core/measure/_layer_health.py``). A layer's first flag
    is a warning; every change goes to the text tag ``gradguard/layer_health_events`` and :attr:`events`.

    Tags (``_opt<i>`` appended for optimizers after the first): scalars ``grad_norm``, ``grad_norm_max``,
    ``grad_norm_mean`` (each with a ``_log10`` twin), ``lr``, ``vanishing_layers``, ``exploding_layers``,
    ``nonfinite_layers``; histograms ``layer_grad_norms``, ``update_ratio``, opt-in ``grads/<layer>``; image
    ``gradient_flow``; text ``layer_health_events``; the Custom Scalars layout
    (:mod:`~lightning_gradguard.callbacks._tensorboard_layout`). Scalars go to every logger, the rest to TensorBoard.

    Attributes:
        vanishing_layers, exploding_layers: names of the layers flagged now (all optimizers).
        last_grad_norm, last_step: the latest logged global norm and its ``trainer.global_step`` (None before).
        events: dicts ``{"step", "optimizer", "kind", "layer"}``, kind ``vanishing``/``recovered``/``exploding``.

    Args:
        log_every_n_steps: log every n batches that stepped (>= 1); None: the Trainer's ``log_every_n_steps``.
        norm_type: p of the gradient norms (> 0 or ``inf``); weight norms are always L2.
        log_grad_histograms: also write a histogram of each layer's gradient values (costly for big models).
        flow_every_n_logs: draw the gradient-flow image every n logging steps (>= 0; 0 = never); None (the default):
            about every :data:`FLOW_EVERY_N_STEPS` steps, that is every 10 logs at the Trainer's default of logging
            every 50 steps, and not every 10 steps when a run logs every step (an image costs tens of
            milliseconds to draw, more than a small model's step).
        vanishing_threshold, vanishing_patience: see above (> 0; >= 1).
        exploding_factor, exploding_ema_decay, exploding_warmup, exploding_z: see above (> 1; in (0, 1); >= 1;
            >= 0, 0: the factor alone).
        progress_bar: show the global norm as ``grad_norm`` in the progress bar (one host read every step).

    Example:
        >>> monitor = GradientNormMonitor(log_every_n_steps=25, flow_every_n_logs=4)
        >>> monitor.log_every_n_steps, monitor.vanishing_threshold, monitor.exploding_factor
        (25, 1e-07, 10.0)
        >>> GradientNormMonitor(flow_every_n_logs=-1)
        Traceback (most recent call last):
        ...
        ValueError: GradientNormMonitor: flow_every_n_logs must be an int >= 0 or None, got -1
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        *,
        norm_type: float = 2.0,
        log_grad_histograms: bool = False,
        flow_every_n_logs: int | None = None,
        vanishing_threshold: float = 1e-7,
        vanishing_patience: int = 3,
        exploding_factor: float = 10.0,
        exploding_ema_decay: float = 0.9,
        exploding_warmup: int = 5,
        exploding_z: float = 3.0,
        progress_bar: bool = False,
    ) -> None:
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True, owner=_OWNER)
        self.norm_type = check_positive("norm_type", norm_type, allow_inf=True, owner=_OWNER)
        self.log_grad_histograms = check_bool("log_grad_histograms", log_grad_histograms, owner=_OWNER)
        self.flow_every_n_logs = check_int("flow_every_n_logs", flow_every_n_logs, 0, allow_none=True, owner=_OWNER)
        self.vanishing_threshold = check_positive("vanishing_threshold", vanishing_threshold, owner=_OWNER)
        self.vanishing_patience = check_int("vanishing_patience", vanishing_patience, 1, owner=_OWNER)
        self.exploding_factor: float = check_number(  # type: ignore[assignment]
            "exploding_factor",
            exploding_factor,
            low=1.0,
            low_open=True,
            high_open=True,
            describe="finite and > 1",
            owner=_OWNER,
        )
        self.exploding_ema_decay: float = check_number(  # type: ignore[assignment]
            "exploding_ema_decay",
            exploding_ema_decay,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            describe="in (0, 1)",
            owner=_OWNER,
        )
        self.exploding_warmup = check_int("exploding_warmup", exploding_warmup, 1, owner=_OWNER)
        self.exploding_z: float = check_number(  # type: ignore[assignment]
            "exploding_z", exploding_z, low=0.0, high_open=True, describe="finite and >= 0", owner=_OWNER
        )
        self.progress_bar = check_bool("progress_bar", progress_bar, owner=_OWNER)

        self._log_every = self.log_every_n_steps or 50
        self._states: dict[int, MonitorState] = {}
        self._layout_written: weakref.WeakSet[Any] = weakref.WeakSet()
        self._health = LayerHealthChanges()
        self._trainer: weakref.ref[pl.Trainer] | None = None
        self._measured: tuple[GradStats, int] | None = None  # the latest measurement shown to the listener
        self._said_no_logger = False
        self.last_grad_norm: float | None = None
        self.last_step: int | None = None
        self.events: list[dict[str, Any]] = []

    @property
    def vanishing_layers(self) -> set[str]:
        return self._health.flagged("vanishing")

    @property
    def exploding_layers(self) -> set[str]:
        return self._health.flagged("exploding")

    # ------------------------------------------------------------------ identity and state

    @property
    def state_key(self) -> str:
        # two monitors with equal keys make Lightning refuse the Trainer with its own generic RuntimeError, before
        # any hook of ours runs (see the README); equal settings are the only way to get equal keys
        args = (self.norm_type, self.log_every_n_steps)
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != args:  # Lightning reads state_key on every hook: build it once
            cached = self._state_key_cache = (
                args,
                self._generate_state_key(norm_type=args[0], log_every_n_steps=args[1]),
            )
        return cached[1]

    def _state(self, idx: int) -> MonitorState:
        state = self._states.get(idx)
        if state is None:
            state = self._states[idx] = MonitorState(
                VanishingDetector(self.vanishing_threshold, self.vanishing_patience),
                ExplodingDetector(
                    self.exploding_factor, self.exploding_ema_decay, self.exploding_warmup, self.exploding_z
                ),
            )
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": {idx: st.state_dict() for idx, st in sorted(self._states.items())},
            "health": self._health.state_dict(),
            "last_grad_norm": self.last_grad_norm,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for idx, st in (state_dict.get("optimizers") or {}).items():
            self._state(int(idx)).load_state_dict(st)
        self._health.load_state_dict(state_dict.get("health") or {})
        self.last_grad_norm = state_dict.get("last_grad_norm", self.last_grad_norm)
        self.last_step = state_dict.get("last_step", self.last_step)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        monitors = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GradientNormMonitor)]
        if len(monitors) > 1:
            raise ValueError(_DUPLICATE.replace("Found 2", f"Found {len(monitors)}"))
        check_supported_strategy(trainer, type(self).__name__)
        self._log_every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        self._trainer = weakref.ref(trainer)
        on_measured(trainer, self._on_measured)
        if trainer.world_size > 1:  # sharded: a logging step's weight norms ride with the measurement
            weight_norms_with_measurement(trainer, self._weights_due)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers and not self._said_no_logger:
            self._said_no_logger = True
            rank_zero_info(
                "GradientNormMonitor: the Trainer has no logger, so nothing is written; layer-health warnings "
                "and the callback's attributes (vanishing_layers, exploding_layers, last_grad_norm) still work."
            )
        layout = custom_scalars_layout(len(trainer.optimizers))
        for writer in tensorboard_writers(trainer):
            if writer not in self._layout_written:
                writer.add_custom_scalars(layout)
                self._layout_written.add(writer)

    def _weights_due(self, optimizer: Any, norm_type: float, step: int) -> bool:
        """Will the listener below read this new measurement's weight norms (a logging step, in our norm)?"""
        trainer = self._trainer() if self._trainer is not None else None
        return trainer is not None and norm_type == self.norm_type and log_due(trainer, self._log_every)

    def _on_measured(self, stats: GradStats, idx: int, step: int) -> None:
        """Right after the step's measurement, before any callback changes the gradients."""
        self._measured = (stats, idx)  # the hook below finds its optimizer's index here (until the batch ends)
        trainer = self._trainer() if self._trainer is not None else None
        state = self._state(idx)
        if trainer is None or state.seen_step == step or not stats.grads:
            return
        if stats.norm_type != self.norm_type:  # another callback measured another norm: take ours, still pre-clip
            stats = compute_grad_stats(stats.params, stats.names, self.norm_type)
        state.seen_step = step
        state.record = step_record(trainer, step)
        host = stats.total_norm_host if IntervalAggregate.host_fast_path else None  # no tensor op on the CPU
        state.norms.update(stats.total_norm if host is None else host)
        if log_due(trainer, self._log_every):
            every = self.flow_every_n_logs
            if every is None:
                every = max(1, -(-FLOW_EVERY_N_STEPS // self._log_every))  # ceil: never more often than that
            flow = every > 0 and state.logs % every == 0
            state.pending = capture_for_log(stats, step, flow=flow, values=self.log_grad_histograms)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        stats = grad_stats_for(trainer, pl_module, optimizer, self.norm_type, step)  # the listener above ran by now
        if not stats.grads:
            return
        measured = self._measured  # the listener saw these statistics with their optimizer's index
        idx = measured[1] if measured is not None and measured[0] is stats else optimizer_index(trainer, optimizer)
        state = self._state(idx)
        if self.progress_bar:
            name = "grad_norm" if idx == 0 else f"grad_norm_opt{idx}"
            pl_module.log(name, stats.total_norm, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        capture, state.pending = state.pending, None
        if capture is not None and capture.step == step:
            self._log(trainer, idx, capture, state, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._measured = None
        for idx, state in self._states.items():  # a step the guard dropped is an event: show its norms now
            if state.record is not None and state.record.dropped:
                self._write_interval(trainer, idx, state, state.record.step)
                state.record = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_all(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush_all(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._trainer is not None:
            weight_norms_with_measurement(trainer, None)
        self._trainer = None
        self._measured = None

    # ------------------------------------------------------------------ writing

    def _flush_all(self, trainer: pl.Trainer) -> None:
        for idx, state in self._states.items():
            self._write_interval(trainer, idx, state, max(state.seen_step, 0))  # the last step folded in

    def _write_interval(self, trainer: pl.Trainer, idx: int, state: MonitorState, step: int) -> None:
        interval = state.norms.flush()
        if interval is not None:
            metrics = {tag("grad_norm_max", idx): interval["max"], tag("grad_norm_mean", idx): interval["mean"]}
            log_scalars(trainer, metrics, step=step)

    def _log(self, trainer: pl.Trainer, idx: int, cap: LogCapture, state: MonitorState, optimizer: Any) -> None:
        step, names, norms = cap.step, cap.layer_names, cap.layer_norms
        weights = cap.layer_weight_norms
        vanishing_input = torch.where(weights > 0, cap.update_ratio, torch.where(norms != 0, math.inf, 0.0))
        state.vanishing.update(vanishing_input, names)
        state.exploding.update(norms, names)
        flags = torch.stack([state.vanishing.compute(), state.exploding.compute()]).to(norms.dtype)
        host = torch.cat([norms, cap.update_ratio, flags.reshape(-1), cap.total_norm.reshape(1).to(norms.dtype)])
        host = host.cpu()  # the one synchronisation of a logging step
        n = len(names)
        norms_h, ratio_h, total = host[:n], host[n : 2 * n], float(host[-1])
        vanishing = {name for name, f in zip(names, (host[2 * n : 3 * n] > 0).tolist()) if f}
        exploding = {name for name, f in zip(names, (host[3 * n : 4 * n] > 0).tolist()) if f}
        self.last_grad_norm, self.last_step = total, step
        groups = getattr(optimizer, "param_groups", None) or [{"lr": math.nan}]
        metrics = {
            tag("grad_norm", idx): total,
            tag("lr", idx): float(groups[0]["lr"]),
            tag("vanishing_layers", idx): float(len(vanishing)),
            tag("exploding_layers", idx): float(len(exploding)),
            tag("nonfinite_layers", idx): float((~torch.isfinite(norms_h)).sum()),
        }
        log_scalars(trainer, metrics, step=step)
        self._write_interval(trainer, idx, state, step)
        write_views(tensorboard_writers(trainer), idx, cap, norms_h, ratio_h)
        why = {
            "vanishing": f"its update ratio (grad norm / weight norm) stayed below {self.vanishing_threshold:g} for "
            f"{self.vanishing_patience} logged steps",
            "exploding": f"its gradient norm is more than {self.exploding_factor:g}x its running average and more "
            f"than {self.exploding_z:g} standard deviations of its own log norm above it",
        }
        report_layer_health(trainer, self._health, self.events, idx, step, names, vanishing, exploding, why)
        state.logs += 1
