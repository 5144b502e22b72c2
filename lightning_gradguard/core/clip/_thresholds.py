"""Clipping threshold rules as pure functions, each written once.

The scalar rules take Python floats (the clippers' CPU fast path: no tensor dispatch) or scalar tensors (any device,
no host synchronisation) and return the same kind; :func:`minimum`, :func:`maximum` and :func:`sqrt` below are the
only places that tell the two apart.

- z-score (ZClip, Kumar et al. 2025, arXiv 2504.02507): ``threshold = mean + z * std`` of an EMA of the global norm
  (:func:`zscore_threshold`, :func:`ema_step`), with ``std`` floored at :data:`STD_FLOOR` times the mean so that a
  flat stream does not clip every small rise.
- fallback while statistics warm up: a generous multiple of a reference (a median) capped by an optional fixed norm
  (:func:`fallback_threshold`).
- what may be learned (:func:`informative`): finite norms above :data:`TINY_NORM` and not below :data:`TINY_RATIO`
  of the threshold in force. A zero norm (a masked batch) learned would put the threshold at 0, and a threshold of 0
  scales every later gradient to 0.
- growth limit: the threshold in force may rise by at most :data:`MAX_GROWTH` per step (:func:`limit_growth`).
  A genuine slow drift (x2 over 1000 steps, 0.07 %/step) passes untouched; a blow-up cannot carry the threshold up
  by orders of magnitude within a short window (x1.6 in 50 steps at most, x10 takes 230 steps), and a norm growing
  2-5 %/step ("boiling frog") outruns it and is clipped.
- adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
  Normalization", arXiv 2102.06171): the gradient of each unit (output row) may not exceed ``clipping`` times the
  unit's weight norm, floored at ``eps`` (:func:`unitwise_norm`, :func:`agc_max_norms`).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

#: Floor on the z-score's standard deviation, relative to the mean.
STD_FLOOR = 0.05
#: Largest relative rise of the threshold in force from one step to the next (1 %).
MAX_GROWTH = 0.01
#: A global norm at or below this carries no information about the run's scale: zero gradients (a masked or empty
#: batch, a loss multiplied by 0, a margin loss already satisfied) or gradients in float32's subnormal range.
TINY_NORM = 1e-30
#: A norm below this fraction of the threshold in force carries no information either (a batch whose loss was
#: multiplied by a tiny weight): learning it would drag the statistics towards 0.
TINY_RATIO = 1e-6

#: A Python float or a scalar tensor (the rules return the same kind they get).
S = Any


def minimum(a: S, b: S | float) -> S:
    """Elementwise minimum of a float or tensor ``a`` and a float or tensor ``b``."""
    if isinstance(a, Tensor):
        return torch.minimum(a, b) if isinstance(b, Tensor) else a.clamp_max(b)
    if isinstance(b, Tensor):
        return b.clamp_max(a)
    return a if a <= b else b


def maximum(a: S, b: S | float) -> S:
    """Elementwise maximum of a float or tensor ``a`` and a float or tensor ``b``."""
    if isinstance(a, Tensor):
        return torch.maximum(a, b) if isinstance(b, Tensor) else a.clamp_min(b)
    if isinstance(b, Tensor):
        return b.clamp_min(a)
    return a if a >= b else b


def sqrt(x: S) -> S:
    """Square root of ``max(x, 0)`` (rounding noise below 0 counts as 0)."""
    if isinstance(x, Tensor):
        return x.clamp_min(0.0).sqrt()
    return math.sqrt(x) if x > 0.0 else 0.0


def zscore_std(mean: S, var: S) -> S:
    """The standard deviation the z-score uses: ``sqrt(var)`` floored at ``STD_FLOOR * |mean|`` (and 1e-12)."""
    return maximum(sqrt(var), STD_FLOOR * abs(mean) + 1e-12)


def zscore(value: S, mean: S, var: S) -> S:
    """``(value - mean) / std`` with the floored std of :func:`zscore_threshold`.

    Example:
        >>> zscore(7.0, 3.0, 4.0)
        2.0
    """
    return (value - mean) / zscore_std(mean, var)


def zscore_threshold(mean: S, var: S, z_threshold: float) -> S:
    """The norm whose z-score equals ``z_threshold``: ``mean + z_threshold * std``, std floored relative to the mean.

    Example:
        >>> zscore_threshold(3.0, 4.0, 2.5)
        8.0
        >>> round(zscore_threshold(4.0, 0.0, 2.0), 9)  # a flat stream: std floored at 5 % of the mean
        4.4
        >>> float(zscore_threshold(torch.tensor(3.0), torch.tensor(4.0), 2.5))
        8.0
    """
    return mean + z_threshold * zscore_std(mean, var)


def ema_step(mean: S, var: S, x: S, weight: S) -> tuple[S, S]:
    """One step of the exponentially weighted mean and variance with weight ``weight`` on ``x`` (West 1979)::

        diff = x - mean;  mean += weight * diff;  var = (1 - weight) * (var + weight * diff**2)

    ``var`` never goes negative. With ``weight = 1 / n`` this is Welford's running mean and population variance.

    Example:
        >>> ema_step(1.0, 0.0, 3.0, 0.5)
        (2.0, 1.0)
    """
    diff = x - mean
    return mean + weight * diff, (1.0 - weight) * (var + weight * diff * diff)


def fallback_threshold(reference: S, factor: float, cap: float) -> S:
    """Warm-up threshold: ``min(factor * reference, cap)`` (``cap`` is inf when there is no fixed ceiling).

    Example:
        >>> fallback_threshold(2.0, 10.0, math.inf), fallback_threshold(2.0, 10.0, 5.0)
        (20.0, 5.0)
    """
    return minimum(factor * reference, cap)


def informative(norm: S, threshold: S | float = math.inf) -> S:
    """Whether a norm may be learned from: finite, above :data:`TINY_NORM`, and not below :data:`TINY_RATIO` times
    ``threshold`` (the threshold in force when it was measured; no relative test while that is not finite). A bool,
    or a bool tensor for a tensor ``norm`` (no host synchronisation).

    Zero-norm steps say nothing about how large a healthy gradient is: a statistic that learned them would put the
    threshold at 0, and a threshold of 0 scales every later gradient to 0.

    Example:
        >>> informative(0.0), informative(1e-40), informative(0.5), informative(1e-9, 2.0), informative(math.nan)
        (False, False, True, False, False)
        >>> informative(torch.tensor([0.0, 3.0], dtype=torch.float64), 10.0).tolist()
        [False, True]
    """
    if isinstance(norm, Tensor) or isinstance(threshold, Tensor):
        if not isinstance(norm, Tensor):
            like = cast(Tensor, threshold)
            norm = torch.as_tensor(norm, dtype=like.dtype, device=like.device)
        if isinstance(threshold, Tensor):
            relative_ok = ~torch.isfinite(threshold) | (norm >= TINY_RATIO * threshold)
        else:
            relative_ok = (
                norm >= TINY_RATIO * threshold if math.isfinite(threshold) else torch.ones_like(norm, dtype=torch.bool)
            )
        return torch.isfinite(norm) & (norm > TINY_NORM) & relative_ok
    if not (math.isfinite(norm) and norm > TINY_NORM):
        return False
    return not (math.isfinite(threshold) and norm < TINY_RATIO * threshold)


def limit_growth(candidate: S, previous: S | float, growth: float = MAX_GROWTH) -> S:
    """``candidate``, but at most ``previous * (1 + growth)``: how far the threshold in force may rise in one step.

    Example:
        >>> limit_growth(50.0, 10.0), limit_growth(5.0, 10.0)
        (10.1, 5.0)
    """
    return minimum(candidate, previous * (1.0 + growth))


def unitwise_norm(x: Tensor, stacked: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """L2 norm of each unit: each output row (dim 0, all other dims reduced) for tensors of 2 or more dims, the whole
    tensor for vectors and scalars. The result keeps dims so that it broadcasts against ``x``; computed in ``dtype``
    (default float32, or float64 for float64 input). Complex tensors are measured by their modulus.

    With ``stacked=True``, ``x`` is a stack of same-shape tensors along dim 0 and each ``x[k]`` is measured as above
    (result ``(k, *unitwise_norm(x[k]).shape)``): one set of kernels for many small tensors.

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])).flatten().tolist()
        [5.0, 1.0]
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), stacked=True).tolist()
        [[5.0], [1.0]]
    """
    if dtype is None:
        dtype = torch.float64 if x.dtype in (torch.float64, torch.complex128) else torch.float32
    lead = 1 if stacked else 0
    unit_ndim = x.ndim - lead
    shape = tuple(x.shape)
    if x.is_complex():
        x = torch.view_as_real(x)  # |z|^2 = re^2 + im^2: the trailing pair is part of the unit
    if unit_ndim <= 1:  # vectors and scalars: the whole tensor is one unit
        flat = x.reshape(shape[0], -1) if stacked else x.reshape(-1)
        norms = torch.linalg.vector_norm(flat, 2, dim=-1, dtype=dtype)
        return norms.reshape(shape[:lead] + (1,) * unit_ndim)
    return torch.linalg.vector_norm(x, 2, dim=tuple(range(lead + 1, x.ndim)), dtype=dtype).reshape(
        shape[: lead + 1] + (1,) * (unit_ndim - 1)
    )


def agc_max_norms(param: Tensor, clipping: float, eps: float, stacked: bool = False) -> Tensor:
    """AGC's per-unit bound on the gradient norm: ``clipping * max(unitwise_norm(param), eps)`` (``stacked`` as
    in :func:`unitwise_norm`).

    Example:
        >>> [round(v, 8) for v in agc_max_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 0.01, 1e-3).flatten().tolist()]
        [0.05, 1e-05]
    """
    return unitwise_norm(param.detach(), stacked).clamp_min(eps) * clipping
