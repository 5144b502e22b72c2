"""The gradient-flow figure: mean and max |grad| per layer, from input to output, on a log scale.

Drawn with matplotlib's object-oriented API on an Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), never through ``pyplot``: no global figure registry, no backend switch, nothing left open
in the user's process. matplotlib is imported on first use only; when it is missing, :func:`render_gradient_flow`
returns None and warns once per process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_gradguard.core.grad_stats import norms_of

__all__ = ["MATPLOTLIB_HINT", "layer_abs_stats", "render_gradient_flow"]

MATPLOTLIB_HINT = (
    "matplotlib is not installed: the gradguard/gradient_flow image is skipped "
    "(pip install matplotlib, or lightning-gradguard[examples])."
)
_warned_missing = False
_MAX_LABEL = 32  # longer layer names are shown by their last characters


def layer_abs_stats(grads: Sequence[Tensor], layer_index: Tensor, n_layers: int) -> tuple[Tensor, Tensor]:
    """``(mean_abs, max_abs)``: float32 vectors with the mean and the max of ``|grad|`` over each layer's elements.

    ``layer_index[i]`` is the layer of ``grads[i]``. Uses two multi-tensor norm passes (L1 and inf norms), so it
    costs about two extra reads of the gradients; the callback calls it on gradient-flow steps only.
    """
    if not grads:
        empty = torch.zeros(n_layers, dtype=torch.float32)
        return empty, empty.clone()
    l1 = norms_of(grads, 1.0)
    linf = norms_of(grads, math.inf)
    device = l1.device
    index = layer_index.to(device)
    numel = torch.tensor([float(g.numel()) for g in grads], dtype=torch.float32, device=device)
    total = torch.zeros(n_layers, dtype=torch.float32, device=device).index_add(0, index, l1)
    count = torch.zeros(n_layers, dtype=torch.float32, device=device).index_add(0, index, numel)
    mean_abs = total / count.clamp_min(1.0)
    max_abs = torch.zeros(n_layers, dtype=torch.float32, device=device).scatter_reduce(
        0, index, linf, reduce="amax", include_self=True
    )
    # NaN must survive the amax (scatter_reduce's amax propagates it on CPU and CUDA); make it explicit anyway
    nan_count = torch.zeros(n_layers, dtype=torch.float32, device=device).index_add(0, index, torch.isnan(linf).float())
    max_abs = torch.where(nan_count > 0, math.nan, max_abs)
    return mean_abs, max_abs


def render_gradient_flow(
    layer_names: Sequence[str],
    mean_abs: Sequence[float] | Tensor,
    max_abs: Sequence[float] | Tensor,
    title: str | None = None,
    dpi: int = 80,
) -> np.ndarray | None:
    """Draw the gradient-flow bar chart and return it as an ``(H, W, 3)`` uint8 RGB array.

    Layers run left (input) to right (output). Each layer gets a light bar for its max ``|grad|`` and a dark bar for
    its mean ``|grad|``, on a logarithmic y axis, so layers whose gradients are orders of magnitude smaller than the
    rest (vanishing) stand out. Zero and non-finite values have no bar (a log axis cannot show them); non-finite ones
    are marked with a red "x" at the top of the axis.

    Returns:
        The image, or None when matplotlib is not installed (one warning per process).
    """
    global _warned_missing
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            warnings.warn(MATPLOTLIB_HINT, UserWarning, stacklevel=2)
        return None

    names = list(layer_names)
    means = np.asarray(torch.as_tensor(mean_abs).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    maxes = np.asarray(torch.as_tensor(max_abs).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    n = len(names)
    if means.shape != (n,) or maxes.shape != (n,):
        raise ValueError(f"expected {n} values per series, got {means.shape[0]} means and {maxes.shape[0]} maxes")
    good_mean = np.isfinite(means) & (means > 0)
    good_max = np.isfinite(maxes) & (maxes > 0)
    bad = ~np.isfinite(means) | ~np.isfinite(maxes)

    width = min(16.0, max(5.0, 0.45 * n + 2.0))
    fig = Figure(figsize=(width, 4.5), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    ax.bar(x[good_max], maxes[good_max], width=0.8, color="#9ecae1", label="max |grad|")
    ax.bar(x[good_mean], means[good_mean], width=0.5, color="#08519c", label="mean |grad|")
    positive = np.concatenate([maxes[good_max], means[good_mean]])
    if positive.size:
        ax.set_yscale("log")
        # plain "1e-05" labels and unlabelled minor ticks: mathtext labels were a large part of the drawing time
        ax.yaxis.set_major_locator(LogLocator(base=10.0, numticks=8))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        low, high = float(positive.min()), float(positive.max())
        ax.set_ylim(low / 3.0, high * 3.0)
        if bad.any():
            ax.plot(x[bad], np.full(int(bad.sum()), high * 2.0), "x", color="red", label="NaN/inf")
    ax.set_xticks(x)
    labels = [n if len(n) <= _MAX_LABEL else "…" + n[-(_MAX_LABEL - 1) :] for n in names]
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, n - 0.4 if n else 0.6)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("|grad|")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    if n:
        # above the axes, right of the title: never over a bar
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=7, frameon=False)
    # fixed margins instead of tight_layout (which measures every label, a large part of the drawing time); the
    # bottom margin grows with the longest (rotated, 7 pt) label: about 1% of the figure height per character
    longest = max((len(label) for label in labels), default=1)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=min(0.55, 0.14 + 0.0105 * longest))
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    del canvas, fig
    return image
