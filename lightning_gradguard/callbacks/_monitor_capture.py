"""What the monitor keeps from one logging step's raw gradients, taken before any callback clips them.

The shared measurement (:class:`~lightning_gradguard.core.measure.GradStats`) holds the live ``.grad`` tensors; a
clipper listed before the monitor scales them in place in the same hook. Norms derived from the per-parameter norms
are pre-clip whenever they are read (those norms were taken at measurement time), but anything read from the
gradient values themselves (the gradient-flow bars, value histograms) must be taken at measurement time. The
monitor's :func:`~lightning_gradguard.callbacks._step_context.on_measured` listener calls :func:`capture_for_log`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from lightning_gradguard.callbacks._gradient_flow import layer_abs_stats, render_gradient_flow
from lightning_gradguard.core.engine._scalars import tag
from lightning_gradguard.core.measure._grad_stats import GradStats
from lightning_gradguard.core.measure._sharded import is_sharded


@dataclass
class LogCapture:
    """Pre-clip data of one logging step (device tensors, except ``grad_values``, which are CPU copies)."""

    step: int
    layer_names: list[str]
    layer_norms: Tensor
    layer_weight_norms: Tensor
    update_ratio: Tensor
    total_norm: Tensor
    flow: tuple[Tensor, Tensor] | None = None  # (mean |grad|, max |grad|) per layer, on gradient-flow steps
    grad_values: dict[str, Tensor] | None = None  # finite gradient values per layer, when histograms are on


def capture_for_log(stats: GradStats, step: int, flow: bool, values: bool) -> LogCapture:
    """Take what a logging step shows from ``stats`` now, while its gradients are still the raw ones."""
    norms = stats.layer_norms
    cap = LogCapture(
        step=step,
        layer_names=list(stats.layer_names),
        layer_norms=norms,
        layer_weight_norms=stats.layer_weight_norms.to(norms.device),
        update_ratio=stats.layer_update_ratio,
        total_norm=stats.total_norm,
    )
    if flow:
        cap.flow = layer_abs_stats(stats.grads, stats.layer_index, len(cap.layer_names))
    if values:
        by_layer: dict[str, list[Tensor]] = {}
        for g, li in zip(stats.grads, stats.layer_index.tolist()):
            if is_sharded(g):  # opt-in and costly anyway: the whole tensor, gathered on every rank (a collective)
                g = cast(Any, g).full_tensor()
            by_layer.setdefault(cap.layer_names[li], []).append(g.detach().reshape(-1))
        cap.grad_values = {}
        for layer, parts in by_layer.items():
            v = torch.cat(parts).float().cpu()  # a copy: the clipper may scale the live tensors next
            cap.grad_values[layer] = v[torch.isfinite(v)]
    return cap


def write_views(writers: list[Any], idx: int, cap: LogCapture, norms: Tensor, ratio: Tensor) -> None:
    """Write a logging step's histograms (layer norms, update ratios, opt-in values) and gradient-flow image.

    ``norms`` and ``ratio`` are the host copies of the per-layer vectors; non-finite entries are left out.
    """
    if not writers:
        return
    histograms = {tag("layer_grad_norms", idx): norms, tag("update_ratio", idx): ratio}
    histograms = {k: v[torch.isfinite(v)].double() for k, v in histograms.items()}
    for layer, values in (cap.grad_values or {}).items():
        histograms[tag(f"grads/{layer}", idx)] = values
    image = None
    if cap.flow is not None:
        title = f"gradient flow, step {cap.step}" + (f", optimizer {idx}" if idx else "")
        image = render_gradient_flow(cap.layer_names, cap.flow[0], cap.flow[1], title=title)
    for writer in writers:
        for name, values in histograms.items():
            if values.numel():
                writer.add_histogram(name, values.numpy(), global_step=cap.step)
        if image is not None:
            writer.add_image(tag("gradient_flow", idx), image, global_step=cap.step, dataformats="HWC")
