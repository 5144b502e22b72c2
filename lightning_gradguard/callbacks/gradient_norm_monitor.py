"""See how gradients behave, layer by layer, in TensorBoard: norms, update ratios, vanishing/exploding layers."""

from __future__ import annotations

import math
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_gradguard.callbacks.gradient_flow import layer_abs_stats, render_gradient_flow
from lightning_gradguard.callbacks.log_writer import log_scalars, log_text, tag, tensorboard_writers
from lightning_gradguard.callbacks.step_context import grad_stats_for, optimizer_index, unwrap_optimizer
from lightning_gradguard.callbacks.strategy_support import check_supported_strategy
from lightning_gradguard.core.arg_checks import check_bool, check_int, is_number
from lightning_gradguard.core.grad_stats import GradStats
from lightning_gradguard.core.layer_health import ExplodingDetector, VanishingDetector

__all__ = ["GradientNormMonitor", "custom_scalars_layout"]

_STATE_VERSION = 1
_MAX_EVENTS = 1000
EVENTS_TAG = "gradguard/layer_health_events"


def custom_scalars_layout(num_optimizers: int = 1) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: one multi-line chart per optimizer with its grad norm, clip threshold and LR.

    TensorBoard's custom-scalars plugin treats each entry as a regular expression matched from the start of the tag
    (``re.match``), so each is anchored with ``$`` (``gradguard/grad_norm`` alone would also match
    ``gradguard/grad_norm_clipped``).
    """
    charts: dict[str, list[Any]] = {}
    for idx in range(max(1, num_optimizers)):
        title = "grad norm (pre-clip), clip threshold, learning rate"
        if idx:
            title += f" (optimizer {idx})"
        names = ("grad_norm", "clip_threshold", "lr")
        charts[title] = ["Multiline", [tag(n, idx) + "$" for n in names]]
    return {"gradguard": charts}


class _OptimizerState:
    """Log schedule and layer-health detectors of one optimizer."""

    def __init__(self, vanishing: VanishingDetector, exploding: ExplodingDetector) -> None:
        self.steps = 0  # optimizer steps seen (drives the log schedule, like AdaptiveGradientClipping)
        self.logs = 0  # logging steps done (drives the gradient-flow schedule)
        self.vanishing = vanishing
        self.exploding = exploding
        self.vanishing_flagged: set[str] = set()
        self.exploding_flagged: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "logs": self.logs,
            "vanishing": self.vanishing.state_dict(),
            "exploding": self.exploding.state_dict(),
            "vanishing_flagged": sorted(self.vanishing_flagged),
            "exploding_flagged": sorted(self.exploding_flagged),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.logs = int(state.get("logs", 0))
        self.vanishing.load_state_dict(state.get("vanishing") or {})
        self.exploding.load_state_dict(state.get("exploding") or {})
        self.vanishing_flagged = set(state.get("vanishing_flagged") or ())
        self.exploding_flagged = set(state.get("exploding_flagged") or ())


def _check_float(name: str, value: Any, low: float, rng: str, allow_inf: bool = False, strict: bool = True) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be a number {rng}, got {type(value).__name__} ({value!r})")
    finite_ok = math.isfinite(value) or (allow_inf and value == math.inf)
    above = value > low if strict else value >= low
    if not (finite_ok and above):
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return float(value)


class GradientNormMonitor(Callback):
    r"""Log gradient health to TensorBoard: global and per-layer norms, update ratios, vanishing/exploding layers.

    Acts in ``on_before_optimizer_step`` (gradients complete, unscaled under AMP, not yet clipped), once per optimizer
    step and per optimizer, and only every ``log_every_n_steps`` steps of that optimizer: on other steps it does
    nothing at all. The statistics come from the shared once-per-step measurement
    (:func:`~lightning_gradguard.callbacks.step_context.grad_stats_for`), so running it next to
    :class:`~lightning_gradguard.AdaptiveGradientClipping` and :class:`~lightning_gradguard.NaNGuard` measures the
    gradients once, and ``gradguard/grad_norm`` is the norm **before** any clipping. A logging step costs one host
    synchronisation (the per-layer vectors are copied to the CPU together).

    Layers are the modules that own parameters (``net.0.weight`` and ``net.0.bias`` form layer ``net.0``), in the
    order the optimizer holds them (for ``model.parameters()`` that is definition order, input to output).

    **Vanishing layers.** A layer whose update ratio (gradient norm / weight norm) is below ``vanishing_threshold``
    for ``vanishing_patience`` consecutive *logged* steps is vanishing. A layer with all-zero weights and a non-zero
    gradient is never vanishing. **Exploding layers.** A layer whose gradient norm exceeds ``exploding_factor``
    times its own running geometric mean (EMA of the log norm over logged steps, decay ``exploding_ema_decay``) is
    exploding at that step, once it has ``exploding_warmup`` logged steps of history; the spike enters the history
    capped at the bound. Both detectors ignore NaN/inf norms (see :mod:`lightning_gradguard.core.layer_health`).
    The first time a layer is flagged, a warning names it; every time a layer becomes flagged (or a vanishing one
    recovers) a line goes to the text tag ``gradguard/layer_health_events`` and to :attr:`events`.

    Written at step ``trainer.global_step`` (tags of optimizers after the first end in ``_opt<i>``):

    =====================================  ===========  =========================================================
    tag                                    kind         value
    =====================================  ===========  =========================================================
    ``gradguard/grad_norm``                scalar       global gradient norm (``norm_type``), before clipping
    ``gradguard/lr``                       scalar       learning rate of the optimizer's first param group
    ``gradguard/vanishing_layers``         scalar       how many layers are vanishing now
    ``gradguard/exploding_layers``         scalar       how many layers are exploding at this step
    ``gradguard/nonfinite_layers``         scalar       layers whose gradient norm is NaN/inf (left out of the
                                                        histograms)
    ``gradguard/layer_grad_norms``         histogram    the per-layer gradient norms of this step
    ``gradguard/update_ratio``             histogram    per-layer gradient norm / weight norm
    ``gradguard/grads/<layer>``            histogram    gradient values of each layer (``log_grad_histograms``)
    ``gradguard/gradient_flow``            image        mean and max ``|grad|`` per layer, log scale, every
                                                        ``flow_every_n_logs`` logs (needs matplotlib)
    ``gradguard/layer_health_events``      text         step and names of layers newly vanishing/exploding
    ``custom_scalars__config__``           layout       custom-scalars chart: grad norm, clip threshold, LR
    =====================================  ===========  =========================================================

    Scalars go to every logger (TensorBoard, CSV, ...); histograms, images, text and the layout only to
    :class:`~lightning.pytorch.loggers.TensorBoardLogger`\ s. Only global rank zero writes. Without a logger the
    callback still runs its detectors (warnings, :attr:`vanishing_layers`, ...) and says so once.

    Attributes:
        vanishing_layers: names of the layers vanishing now (all optimizers).
        exploding_layers: names of the layers flagged exploding at their latest logged step (all optimizers).
        last_grad_norm: the latest logged global norm (a float; None before the first log).
        last_step: ``trainer.global_step`` of the latest log (None before the first log).
        events: dicts ``{"step", "optimizer", "kind", "layer"}`` with ``kind`` one of ``"vanishing"``,
            ``"recovered"``, ``"exploding"`` (the last 1000).

    Args:
        log_every_n_steps: log every n steps of each optimizer (>= 1); None: the Trainer's ``log_every_n_steps``.
        norm_type: p of the gradient norms (> 0 or ``inf``); weight norms are always L2.
        log_grad_histograms: also write a histogram of each layer's gradient values (costly for big models).
        flow_every_n_logs: draw the gradient-flow image every n logging steps (>= 0; 0 = never).
        vanishing_threshold: update ratio below which a layer counts as vanishing (> 0).
        vanishing_patience: consecutive logged steps below the threshold that flag a layer (>= 1).
        exploding_factor: a layer norm this many times its running geometric mean is exploding (> 1).
        exploding_ema_decay: weight of the past in each layer's running log norm, in (0, 1).
        exploding_warmup: logged steps of history a layer needs before it can be flagged exploding (>= 1).
        progress_bar: show the global norm as ``grad_norm`` in the progress bar (computed and synchronised every
            step, not only on logging steps).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range (the message names it, the allowed range and the value received).
        RuntimeError: at setup, for sharded strategies (FSDP, DeepSpeed).

    Example:
        >>> monitor = GradientNormMonitor(log_every_n_steps=25, flow_every_n_logs=4)
        >>> monitor.log_every_n_steps, monitor.vanishing_threshold, monitor.exploding_factor
        (25, 1e-07, 10.0)
        >>> GradientNormMonitor(flow_every_n_logs=-1)
        Traceback (most recent call last):
        ...
        ValueError: flow_every_n_logs must be >= 0, got -1
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        *,
        norm_type: float = 2.0,
        log_grad_histograms: bool = False,
        flow_every_n_logs: int = 10,
        vanishing_threshold: float = 1e-7,
        vanishing_patience: int = 3,
        exploding_factor: float = 10.0,
        exploding_ema_decay: float = 0.9,
        exploding_warmup: int = 5,
        progress_bar: bool = False,
    ) -> None:
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        self.norm_type = _check_float("norm_type", norm_type, 0.0, "> 0 (inf allowed)", allow_inf=True)
        self.log_grad_histograms = check_bool("log_grad_histograms", log_grad_histograms)
        self.flow_every_n_logs: int = check_int("flow_every_n_logs", flow_every_n_logs, 0)  # type: ignore[assignment]
        self.vanishing_threshold = _check_float("vanishing_threshold", vanishing_threshold, 0.0, "finite and > 0")
        self.vanishing_patience: int = check_int("vanishing_patience", vanishing_patience, 1)  # type: ignore[assignment]
        self.exploding_factor = _check_float("exploding_factor", exploding_factor, 1.0, "finite and > 1")
        self.exploding_ema_decay = _check_float("exploding_ema_decay", exploding_ema_decay, 0.0, "in (0, 1)")
        if self.exploding_ema_decay >= 1.0:
            raise ValueError(f"exploding_ema_decay must be in (0, 1), got {exploding_ema_decay!r}")
        self.exploding_warmup: int = check_int("exploding_warmup", exploding_warmup, 1)  # type: ignore[assignment]
        self.progress_bar = check_bool("progress_bar", progress_bar)

        self._log_every = self.log_every_n_steps or 50
        self._states: dict[int, _OptimizerState] = {}
        self._layout_written: weakref.WeakSet[Any] = weakref.WeakSet()
        self._warned: dict[str, set[str]] = {"vanishing": set(), "exploding": set()}
        self._said_no_logger = False
        self.last_grad_norm: float | None = None
        self.last_step: int | None = None
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ public views

    @property
    def vanishing_layers(self) -> set[str]:
        return set().union(*(s.vanishing_flagged for s in self._states.values()))

    @property
    def exploding_layers(self) -> set[str]:
        return set().union(*(s.exploding_flagged for s in self._states.values()))

    # ------------------------------------------------------------------ identity and state

    def _config(self) -> dict[str, Any]:
        return {"norm_type": self.norm_type, "log_every_n_steps": self.log_every_n_steps}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._config())

    def _state(self, idx: int) -> _OptimizerState:
        state = self._states.get(idx)
        if state is None:
            state = self._states[idx] = _OptimizerState(
                VanishingDetector(self.vanishing_threshold, self.vanishing_patience),
                ExplodingDetector(self.exploding_factor, self.exploding_ema_decay, self.exploding_warmup),
            )
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "optimizers": {idx: st.state_dict() for idx, st in sorted(self._states.items())},
            "warned": {kind: sorted(names) for kind, names in self._warned.items()},
            "last_grad_norm": self.last_grad_norm,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for idx, st in (state_dict.get("optimizers") or {}).items():
            self._state(int(idx)).load_state_dict(st)
        for kind, names in (state_dict.get("warned") or {}).items():
            self._warned.setdefault(kind, set()).update(names)
        self.last_grad_norm = state_dict.get("last_grad_norm", self.last_grad_norm)
        self.last_step = state_dict.get("last_step", self.last_step)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        monitors = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, GradientNormMonitor)]
        if len(monitors) > 1:
            raise ValueError(
                f"Found {len(monitors)} GradientNormMonitor callbacks; use one: they would write the same "
                "gradguard/ tags twice (one monitor already covers every optimizer)."
            )
        check_supported_strategy(trainer, type(self).__name__)
        self._log_every = self.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers:
            if not self._said_no_logger:
                self._said_no_logger = True
                rank_zero_info(
                    "GradientNormMonitor: the Trainer has no logger, so nothing is written; layer-health warnings "
                    "and the callback's attributes (vanishing_layers, exploding_layers, last_grad_norm) still work."
                )
            return
        layout = custom_scalars_layout(len(trainer.optimizers))
        for writer in tensorboard_writers(trainer):
            if writer not in self._layout_written:
                writer.add_custom_scalars(layout)
                self._layout_written.add(writer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        idx = optimizer_index(trainer, optimizer)
        state = self._state(idx)
        log_now = state.steps % self._log_every == 0
        state.steps += 1
        if self.progress_bar:
            stats = grad_stats_for(trainer, pl_module, optimizer, self.norm_type)
            if stats.grads:
                name = "grad_norm" if idx == 0 else f"grad_norm_opt{idx}"
                pl_module.log(name, stats.total_norm, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if not log_now:
            return
        stats = grad_stats_for(trainer, pl_module, optimizer, self.norm_type)
        if not stats.grads:
            return
        self._log(trainer, optimizer, idx, stats, state)

    # ------------------------------------------------------------------ one logging step

    def _log(self, trainer: pl.Trainer, optimizer: Any, idx: int, stats: GradStats, state: _OptimizerState) -> None:
        step = int(trainer.global_step)
        names = stats.layer_names
        norms = stats.layer_norms
        weights = stats.layer_weight_norms.to(norms.device)
        ratio = stats.layer_update_ratio
        # all-zero weights: a layer still receiving gradient is not vanishing (the ratio would read 0)
        vanishing_input = torch.where(weights > 0, ratio, torch.where(norms != 0, math.inf, 0.0))
        state.vanishing.update(vanishing_input, names)
        state.exploding.update(norms, names)
        host = torch.stack(
            [
                norms,
                ratio,
                state.vanishing.compute().to(norms.dtype),
                state.exploding.compute().to(norms.dtype),
                stats.total_norm.reshape(1).expand(len(names)).to(norms.dtype),
            ]
        ).cpu()  # the one synchronisation of a logging step
        norms_h, ratio_h, vanishing_h, exploding_h = host[0], host[1], host[2] > 0, host[3] > 0
        total = float(host[4, 0]) if len(names) else float(stats.total_norm)
        vanishing = {n for n, f in zip(names, vanishing_h.tolist()) if f}
        exploding = {n for n, f in zip(names, exploding_h.tolist()) if f}
        finite = torch.isfinite(norms_h)

        self.last_grad_norm = total
        self.last_step = step
        raw = unwrap_optimizer(optimizer)
        lr = raw.param_groups[0]["lr"] if raw.param_groups else math.nan
        metrics = {
            tag("grad_norm", idx): total,
            tag("lr", idx): float(lr),
            tag("vanishing_layers", idx): float(len(vanishing)),
            tag("exploding_layers", idx): float(len(exploding)),
            tag("nonfinite_layers", idx): float((~finite).sum()),
        }
        log_scalars(trainer, metrics, step=step)

        writers = tensorboard_writers(trainer)
        if writers:
            self._write_tensorboard(writers, idx, step, stats, state, norms_h, ratio_h)
        self._report(trainer, idx, step, state, vanishing, exploding)
        state.logs += 1

    def _write_tensorboard(
        self,
        writers: list[Any],
        idx: int,
        step: int,
        stats: GradStats,
        state: _OptimizerState,
        norms: Tensor,
        ratio: Tensor,
    ) -> None:
        histograms: dict[str, Tensor] = {}
        for name, values in (("layer_grad_norms", norms), ("update_ratio", ratio)):
            kept = values[torch.isfinite(values)]
            if kept.numel():
                histograms[tag(name, idx)] = kept.double()
        if self.log_grad_histograms:
            by_layer: dict[str, list[Tensor]] = {}
            index = stats.layer_index.tolist()
            for g, li in zip(stats.grads, index):
                by_layer.setdefault(stats.layer_names[li], []).append(g.detach().reshape(-1))
            for layer, parts in by_layer.items():
                values = torch.cat(parts).float().cpu()
                values = values[torch.isfinite(values)]
                if values.numel():
                    histograms[tag(f"grads/{layer}", idx)] = values
        image = None
        if self.flow_every_n_logs and state.logs % self.flow_every_n_logs == 0:
            names = stats.layer_names
            mean_abs, max_abs = layer_abs_stats(stats.grads, stats.layer_index, len(names))
            title = f"gradient flow, step {step}" + (f", optimizer {idx}" if idx else "")
            image = render_gradient_flow(names, mean_abs, max_abs, title=title)
        for writer in writers:
            for name, values in histograms.items():
                writer.add_histogram(name, values.numpy(), global_step=step)
            if image is not None:
                writer.add_image(tag("gradient_flow", idx), image, global_step=step, dataformats="HWC")

    def _report(
        self,
        trainer: pl.Trainer,
        idx: int,
        step: int,
        state: _OptimizerState,
        vanishing: set[str],
        exploding: set[str],
    ) -> None:
        new_vanishing = [n for n in state.vanishing.names if n in vanishing - state.vanishing_flagged]
        recovered = [n for n in state.vanishing.names if n in state.vanishing_flagged - vanishing]
        new_exploding = [n for n in state.exploding.names if n in exploding - state.exploding_flagged]
        state.vanishing_flagged = vanishing
        state.exploding_flagged = exploding
        if not (new_vanishing or recovered or new_exploding):
            return
        where = f" (optimizer {idx})" if idx else ""
        for name in new_vanishing:
            if name not in self._warned["vanishing"]:
                self._warned["vanishing"].add(name)
                rank_zero_warn(
                    f"GradientNormMonitor: layer {name!r}{where} is vanishing at step {step}: its update ratio "
                    f"(grad norm / weight norm) stayed below {self.vanishing_threshold:g} for "
                    f"{self.vanishing_patience} logged steps."
                )
        for name in new_exploding:
            if name not in self._warned["exploding"]:
                self._warned["exploding"].add(name)
                rank_zero_warn(
                    f"GradientNormMonitor: layer {name!r}{where} is exploding at step {step}: its gradient norm is "
                    f"more than {self.exploding_factor:g}x its running average."
                )
        parts = []
        for kind, layers in (("vanishing", new_vanishing), ("exploding", new_exploding), ("recovered", recovered)):
            for name in layers:
                self.events.append({"step": step, "optimizer": idx, "kind": kind, "layer": name})
            if layers:
                parts.append(f"{kind}: {', '.join(layers)}")
        del self.events[:-_MAX_EVENTS]
        log_text(trainer, EVENTS_TAG, f"step {step}{where}: " + "; ".join(parts), step)
