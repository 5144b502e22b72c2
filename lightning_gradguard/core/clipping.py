"""Apply gradient clips on the device, with coefficients as tensors (no host synchronisation).

Every function works on gradients that were already measured (a
:class:`~lightning_gradguard.core.grad_stats.GradStats` gives the global and per-parameter norms), so no norm is
computed twice. Multiplications go through ``torch._foreach_mul_`` (one launch per device/dtype group, a per-tensor
loop where the multi-tensor kernel is unavailable). None of them touches a non-finite gradient: a non-finite norm
gives a coefficient of 1 (clipping inf makes NaN, and NaN/inf are the NaN guard's business).

Each function returns a bool scalar tensor telling whether anything was clipped, plus what the caller needs to log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from lightning_gradguard.core.thresholds import agc_max_norms, unitwise_norm

__all__ = [
    "CLIP_EPS",
    "clip_by_agc_",
    "clip_by_global_norm_",
    "clip_by_param_norm_",
    "clip_by_value_",
    "clip_coefficient",
    "scale_",
]

#: Added to norms in coefficients, as in ``torch.nn.utils.clip_grad_norm_`` (so the post-clip norm stays <= max).
CLIP_EPS = 1e-6


def clip_coefficient(norm: Tensor, max_norm: Tensor | float, eps: float = CLIP_EPS) -> Tensor:
    """``min(1, max_norm / (norm + eps))`` elementwise, and 1 where ``norm`` or ``max_norm`` is not finite.

    Example:
        >>> clip_coefficient(torch.tensor([10.0, 0.5, float("inf")]), 1.0, eps=0.0).tolist()
        [0.10000000149011612, 1.0, 1.0]
    """
    max_norm = torch.as_tensor(max_norm, dtype=torch.float32, device=norm.device)
    norm32 = norm.to(torch.float32)
    coef = (max_norm / (norm32 + eps)).clamp(max=1.0)
    ok = torch.isfinite(norm32) & torch.isfinite(max_norm)
    return torch.where(ok, coef, torch.ones_like(coef))


def _by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


def scale_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply ``grads`` in place: by the scalar ``coef``, or by ``coef[i]`` each when ``coef`` is a vector."""
    if not grads:
        return
    per_tensor = coef.ndim > 0
    for device, idx in _by_device(grads).items():
        group = [grads[i] for i in idx]
        c = coef.to(device)
        factors: Tensor | list[Tensor] = [c[i] for i in idx] if per_tensor else c
        try:
            torch._foreach_mul_(group, factors)
        except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover - exotic dtypes/devices
            for j, g in enumerate(group):
                g.mul_(factors[j] if isinstance(factors, list) else factors)


def clip_by_global_norm_(
    grads: Sequence[Tensor], total_norm: Tensor, max_norm: Tensor | float, eps: float = CLIP_EPS
) -> tuple[Tensor, Tensor]:
    """Scale all ``grads`` so that their global norm (``total_norm``, precomputed) is at most ``max_norm``.

    Equivalent to ``torch.nn.utils.clip_grads_with_norm_`` but leaves everything alone when ``total_norm`` or
    ``max_norm`` is not finite (an infinite threshold means "do not clip").

    Returns:
        ``(coefficient, clipped)``: the float32 scalar every gradient was multiplied by (post-clip norm =
        ``total_norm * coefficient``) and a bool scalar tensor, ``coefficient < 1``.
    """
    coef = clip_coefficient(total_norm, max_norm, eps)
    scale_(grads, coef)
    return coef, coef < 1.0


def clip_by_param_norm_(
    grads: Sequence[Tensor], param_norms: Tensor, max_norm: Tensor | float, eps: float = CLIP_EPS
) -> tuple[Tensor, Tensor]:
    """Scale each gradient so that its own norm (``param_norms[i]``, precomputed) is at most ``max_norm``.

    Returns:
        ``(coefficients, clipped)``: the per-parameter float32 factors and a bool scalar, any factor < 1.
    """
    coef = clip_coefficient(param_norms, max_norm, eps)
    scale_(grads, coef)
    return coef, (coef < 1.0).any() if coef.numel() else torch.zeros((), dtype=torch.bool)


def _max_abs(g: Tensor) -> Tensor:
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    lo, hi = torch.aminmax(g)
    return torch.maximum(-lo, hi).to(torch.float32)


def clip_by_value_(grads: Sequence[Tensor], clip_value: float, finite: Tensor | None = None) -> Tensor:
    """Clamp every element to ``[-clip_value, clip_value]``, in place, sparing gradients that are not finite.

    Args:
        grads: the gradients.
        clip_value: the bound (> 0).
        finite: bool vector, is each gradient finite (``GradStats.finite``); computed when None.

    Returns:
        A bool scalar tensor: did any finite gradient hold an element beyond the bound.
    """
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    if finite is None:
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=finite.device)
    bound = torch.where(finite, torch.tensor(float(clip_value), device=finite.device), inf)
    # the largest |element| of each gradient, before clamping, to report whether anything was clipped. One aminmax
    # read per tensor: torch's CPU inf-norm (``_foreach_norm(..., inf)``) is ~12x slower on large tensors.
    maxabs = torch.stack([_max_abs(g).to(finite.device) for g in grads])
    clipped = (finite & (maxabs > clip_value)).any()
    for device, idx in _by_device(grads).items():
        group = [grads[i] for i in idx]
        b = bound.to(device)
        upper = [b[i].to(grads[i].dtype) for i in idx]
        lower = [-u for u in upper]
        try:
            torch._foreach_clamp_max_(group, upper)
            torch._foreach_clamp_min_(group, lower)
        except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover
            for g, lo, hi in zip(group, lower, upper):
                g.clamp_(min=lo, max=hi)
    return clipped


def clip_by_agc_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    clipping: float,
    eps: float = 1e-3,
    grad_eps: float = CLIP_EPS,
) -> tuple[Tensor, Tensor]:
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise, in place.

    For every unit (output row of a weight of 2+ dims; the whole tensor for biases and scalars) with gradient
    norm ``g`` and weight norm ``w``: if ``g > clipping * max(w, eps)`` the unit's gradient is scaled by
    ``clipping * max(w, eps) / max(g, grad_eps)``. Units whose gradient is not finite are left alone.

    Args:
        params: the parameters (their values give the weight norms).
        grads: their gradients, same order.
        clipping: the ratio bound lambda (> 0), e.g. 0.01.
        eps: floor on the weight norm (so zero-initialised units can still move).
        grad_eps: floor on the gradient norm in the divisor.

    Returns:
        ``(clipped_units, total_units)``: long scalar tensors counting units clipped and units seen.
    """
    dev = grads[0].device if grads else torch.device("cpu")
    clipped = torch.zeros((), dtype=torch.long, device=dev)
    total = sum(max(1, g.shape[0]) if g.ndim > 1 else 1 for g in grads)
    factors: list[Tensor | None] = [None] * len(grads)
    # Small tensors of one shape are handled together on their stack (one set of kernels per shape instead of a dozen
    # per tensor: models with many small layers spend their AGC time in kernel launches otherwise); large tensors
    # and lone shapes one by one, without the copy.
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.numel() <= _AGC_STACK_MAX_NUMEL:
            groups.setdefault((tuple(g.shape), g.dtype, g.device, p.dtype, p.device), []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        p_stack = torch.stack([params[i].detach() for i in idx])
        factor, n_over = _agc_factor(p_stack, torch.stack([grads[i] for i in idx]), clipping, eps, grad_eps, True)
        clipped = clipped + n_over.to(dev)
        for i, f in zip(idx, factor.unbind(0)):
            factors[i] = f
    for i, (p, g) in enumerate(zip(params, grads)):
        if factors[i] is None:
            factors[i], n_over = _agc_factor(p, g, clipping, eps, grad_eps, False)
            clipped = clipped + n_over.to(dev)
    for idx in _by_device(grads).values():
        group = [grads[i] for i in idx]
        fs = [cast(Tensor, factors[i]) for i in idx]
        try:
            torch._foreach_mul_(group, fs)
        except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover
            for g, f in zip(group, fs):
                g.mul_(f)
    return clipped, torch.tensor(total, dtype=torch.long, device=dev)


#: Tensors up to this many elements are stacked by shape in :func:`clip_by_agc_`. The stack is a copy: for 256x256
#: weights (65k elements) it cost more than the kernel launches it saved; 4096 is a cautious bound below that.
_AGC_STACK_MAX_NUMEL = 1 << 12


def _agc_factor(
    param: Tensor, grad: Tensor, clipping: float, eps: float, grad_eps: float, stacked: bool
) -> tuple[Tensor, Tensor]:
    """AGC's per-unit factor for one tensor (or a stack of same-shape tensors) and how many units are over."""
    max_norm = agc_max_norms(param, clipping, eps, stacked)
    gnorm = unitwise_norm(grad, stacked)
    over = torch.isfinite(gnorm) & (gnorm > max_norm)
    return torch.where(over, max_norm / gnorm.clamp_min(grad_eps), 1.0).to(grad.dtype), over.sum()
