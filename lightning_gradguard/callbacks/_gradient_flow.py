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

from lightning_gradguard.core.measure._grad_stats import norms_of

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


#: the image's width in pixels: about what TensorBoard's image card shows without scaling, so the labels stay legible
CARD_WIDTH_PX = 350


def render_gradient_flow(
    layer_names: Sequence[str],
    mean_abs: Sequence[float] | Tensor,
    max_abs: Sequence[float] | Tensor,
    title: str | None = None,
    dpi: int = 80,
) -> np.ndarray | None:
    """Draw the gradient-flow bar chart and return it as an ``(H, W, 3)`` uint8 RGB array.

    One row per layer, input at the top and output at the bottom, names written horizontally (legible for deep
    nets: the image is :data:`CARD_WIDTH_PX` wide, about a TensorBoard card, and grows in height with the layers).
    Each layer gets a light bar for its max ``|grad|`` and a dark bar for its mean ``|grad|`` on a logarithmic axis,
    so layers whose gradients are orders of magnitude smaller than the rest (vanishing) stand out. Zero and
    non-finite values have no bar (a log axis cannot show them); non-finite ones are marked with a red "x".

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

    labels = [n if len(n) <= _MAX_LABEL else "…" + n[-(_MAX_LABEL - 1) :] for n in names]
    height_in = 1.6 + 0.26 * max(n, 2)
    fig = Figure(figsize=(CARD_WIDTH_PX / dpi, height_in), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    ax.barh(y[good_max], maxes[good_max], height=0.8, color="#9ecae1", label="max |grad|")
    ax.barh(y[good_mean], means[good_mean], height=0.45, color="#08519c", label="mean |grad|")
    positive = np.concatenate([maxes[good_max], means[good_mean]])
    if positive.size:
        ax.set_xscale("log")
        # plain "1e-05" labels and unlabelled minor ticks: mathtext labels were a large part of the drawing time
        ax.xaxis.set_major_locator(LogLocator(base=10.0, numticks=5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = float(positive.min()), float(positive.max())
        ax.set_xlim(low / 3.0, high * 3.0)
        if bad.any():
            ax.plot(np.full(int(bad.sum()), high * 2.0), y[bad], "x", color="red", label="NaN/inf")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    ax.set_ylim(n - 0.4 if n else 0.6, -0.6)  # input at the top
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("|grad| (log scale)", fontsize=9)
    ax.grid(True, axis="x", which="major", alpha=0.3)
    if title:
        fig.suptitle(title + "\ninput at the top, output at the bottom", fontsize=9, x=0.02, ha="left")
    if n:
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False, borderaxespad=0.2)
    # fixed margins instead of tight_layout (which measures every label, a large part of the drawing time): the left
    # margin grows with the longest label (9 pt ~ 5.5 px per character), the top and bottom ones are fixed in inches
    longest = max((len(label) for label in labels), default=1)
    left = min(0.55, (12 + 5.6 * longest) / CARD_WIDTH_PX)
    fig.subplots_adjust(left=left, right=0.97, top=1 - 0.85 / height_in, bottom=0.5 / height_in)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    del canvas, fig
    return image
