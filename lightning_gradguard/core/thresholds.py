"""Clipping threshold rules as pure functions of running statistics (tensors in, tensors out, no host sync).

- z-score (ZClip, Kumar et al. 2025, arXiv 2504.02507): ``threshold = mean + z * std`` of an EMA of the global norm;
  a norm above it is clipped either to the threshold or to the running mean (:func:`zscore_clip_target`).
- percentile (AutoClip, Seetharaman et al., MLSP 2020): ``threshold = q-th percentile`` of recent global norms
  (:func:`percentile_threshold` over a window; the histogram estimator lives in
  :mod:`lightning_gradguard.core.running_stats`).
- fallback while statistics warm up: a generous multiple of a reference (running mean or median) capped by an
  optional fixed norm (:func:`fallback_threshold`).
- adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization", arXiv 2102.06171): the gradient of each unit (output row) may not exceed ``clipping`` times the
  unit's weight norm, floored at ``eps`` (:func:`unitwise_norm`, :func:`agc_max_norms`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "agc_max_norms",
    "fallback_threshold",
    "percentile_threshold",
    "unitwise_norm",
    "zscore",
    "zscore_clip_target",
    "zscore_threshold",
]

ClipTo = Literal["threshold", "mean"]


def zscore(value: Tensor, mean: Tensor, var: Tensor, rel_floor: float = 1e-6, abs_floor: float = 1e-12) -> Tensor:
    """``(value - mean) / std``, with ``std`` floored at ``rel_floor * |mean| + abs_floor`` (a flat stream is not 0/0).

    Example:
        >>> float(zscore(torch.tensor(7.0), torch.tensor(3.0), torch.tensor(4.0)))
        2.0
    """
    std = var.clamp_min(0.0).sqrt()
    return (value - mean) / torch.maximum(std, rel_floor * mean.abs() + abs_floor)


def zscore_threshold(mean: Tensor, var: Tensor, z_threshold: float) -> Tensor:
    """The norm whose z-score equals ``z_threshold``: ``mean + z_threshold * sqrt(var)``.

    Example:
        >>> float(zscore_threshold(torch.tensor(3.0), torch.tensor(4.0), 2.5))
        8.0
    """
    return mean + z_threshold * var.clamp_min(0.0).sqrt()


def zscore_clip_target(mean: Tensor, var: Tensor, z_threshold: float, clip_to: ClipTo = "threshold") -> Tensor:
    """The norm an outlier is scaled down to: the threshold itself (``"threshold"``) or the running mean (``"mean"``).

    Raises:
        ValueError: ``clip_to`` is neither ``"threshold"`` nor ``"mean"``.
    """
    if clip_to == "threshold":
        return zscore_threshold(mean, var, z_threshold)
    if clip_to == "mean":
        return mean.clone()
    raise ValueError(f"clip_to must be 'threshold' or 'mean', got {clip_to!r}")


def percentile_threshold(values: Tensor, percentile: float) -> Tensor:
    """The ``percentile``-th percentile (0-100, linear interpolation) of the finite entries of ``values``.

    NaN entries are ignored (they mark unused slots of a window); NaN when there is no finite entry.

    Example:
        >>> float(percentile_threshold(torch.tensor([4.0, 1.0, float("nan"), 3.0, 2.0]), 25.0))
        1.75
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    v = values.to(torch.float64)
    v = torch.where(torch.isfinite(v), v, math.nan)
    return torch.nanquantile(v, percentile / 100.0)


def fallback_threshold(reference: Tensor, has_reference: Tensor, factor: float, max_norm: float | None) -> Tensor:
    """Warm-up threshold: ``min(factor * reference, max_norm)``; ``max_norm`` (inf when None) with no reference yet.

    Args:
        reference: a typical norm seen so far (running mean or median).
        has_reference: bool scalar tensor: has any finite norm been seen.
        factor: how generous the multiple is (> 0).
        max_norm: optional fixed ceiling that also protects the very first step.

    Example:
        >>> float(fallback_threshold(torch.tensor(2.0), torch.tensor(True), 10.0, None))
        20.0
        >>> float(fallback_threshold(torch.tensor(0.0), torch.tensor(False), 10.0, None))
        inf
    """
    cap = math.inf if max_norm is None else float(max_norm)
    multiple = (factor * reference.to(torch.float64)).clamp_max(cap)
    return torch.where(has_reference, multiple, cap)


def unitwise_norm(x: Tensor, stacked: bool = False) -> Tensor:
    """L2 norm of each unit: each output row (dim 0, all other dims reduced) for tensors of 2 or more dims, the whole
    tensor for vectors and scalars. The result keeps dims so that it broadcasts against ``x``; computed in float32
    (or float64 for float64 input).

    With ``stacked=True``, ``x`` is a stack of same-shape tensors along dim 0 and each ``x[k]`` is measured as above
    (result ``(k, *unitwise_norm(x[k]).shape)``): one set of kernels for many small tensors.

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])).flatten().tolist()
        [5.0, 1.0]
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), stacked=True).tolist()
        [[5.0], [1.0]]
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = 1 if stacked else 0
    unit_ndim = x.ndim - lead
    if unit_ndim <= 1:  # vectors and scalars: the whole tensor is one unit
        flat = x.reshape(x.shape[0], -1) if stacked else x.reshape(-1)
        norms = torch.linalg.vector_norm(flat, 2, dim=-1, dtype=acc)
        return norms.reshape(tuple(x.shape[:lead]) + (1,) * unit_ndim)
    return torch.linalg.vector_norm(x, 2, dim=tuple(range(lead + 1, x.ndim)), keepdim=True, dtype=acc)


def agc_max_norms(param: Tensor, clipping: float, eps: float, stacked: bool = False) -> Tensor:
    """AGC's per-unit bound on the gradient norm: ``clipping * max(unitwise_norm(param), eps)`` (``stacked`` as
    in :func:`unitwise_norm`).

    Example:
        >>> [round(v, 8) for v in agc_max_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 0.01, 1e-3).flatten().tolist()]
        [0.05, 1e-05]
    """
    return unitwise_norm(param.detach(), stacked).clamp_min(eps) * clipping
