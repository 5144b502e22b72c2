"""The clip operations: scale or clamp gradients in place, on the device, with coefficients as tensors.

Every function works on gradients that were already measured (a
:class:`~lightning_gradguard.core.measure.GradStats` gives the global and per-parameter norms), so no norm is
computed twice. Coefficients are computed in float64 (a finite norm near float32's limit still gives a usable factor,
and ``max_norm / norm`` cannot underflow to 0 for any float32 norm) and applied with torch's multi-tensor kernels.
None of them touches a gradient that holds NaN or inf: its coefficient is 1 (scaling inf makes NaN, and NaN/inf are
the NaN guard's business). A finite gradient is always clipped, however large its norm.

Each function returns what the caller needs to know whether anything was clipped (bool or count tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from lightning_gradguard.core.clip._thresholds import agc_max_norms, unitwise_norm
from lightning_gradguard.core.measure._sharded import is_sharded, local_view, unit_norms

#: Added to norms in coefficients, as in ``torch.nn.utils.clip_grad_norm_`` (so the post-clip norm stays <= max).
CLIP_EPS = 1e-6

_FOREACH_ERRORS = (RuntimeError, TypeError, NotImplementedError)


def foreach_mul_(tensors: Sequence[Tensor], factors: float | Tensor | Sequence[Tensor]) -> None:
    """``tensors[i] *= factor`` in place (one Python number or scalar tensor for all, or one tensor per tensor), with
    torch's multi-tensor kernel, and a per-tensor loop where the kernel refuses (several devices, exotic dtypes)."""
    if not tensors:
        return
    per_tensor = isinstance(factors, (list, tuple))
    if not per_tensor and not isinstance(factors, Tensor):
        # a 0-d tensor, not a Python number: torch's CPU multi-tensor kernel is ~5x slower with a Python scalar
        wide = tensors[0].dtype in (torch.float64, torch.complex128)
        factors = torch.tensor(float(cast(float, factors)), dtype=torch.float64 if wide else torch.float32)
    try:
        torch._foreach_mul_(list(tensors), factors)  # type: ignore[arg-type]
        return
    except _FOREACH_ERRORS:
        pass
    for i, t in enumerate(tensors):  # several devices, or a dtype the kernel does not take
        f = factors[i] if per_tensor else factors  # type: ignore[index]
        t.mul_(f.to(t.device) if isinstance(f, Tensor) else cast(float, f))


def clip_coefficient(norm: Tensor, max_norm: Tensor | float, eps: float = CLIP_EPS) -> Tensor:
    """``min(1, max_norm / (norm + eps))`` elementwise in float64, and 1 where ``norm`` or ``max_norm`` is not finite.

    Example:
        >>> clip_coefficient(torch.tensor([10.0, 0.5, float("inf")]), 1.0, eps=0.0).tolist()
        [0.1, 1.0, 1.0]
    """
    max_norm = torch.as_tensor(max_norm, dtype=torch.float64, device=norm.device)
    norm64 = norm.to(torch.float64)
    coef = (max_norm / (norm64 + eps)).clamp(max=1.0)
    ok = torch.isfinite(norm64) & torch.isfinite(max_norm)
    return torch.where(ok, coef, 1.0)


def _factor_for(coef: Tensor, grad: Tensor) -> Tensor:
    # float32 for float32/half gradients (a float64 factor would promote nothing, but keep kernels on one dtype)
    return coef.to(torch.float64 if grad.dtype in (torch.float64, torch.complex128) else torch.float32)


def clip_by_global_norm_(
    grads: Sequence[Tensor], total_norm: Tensor, max_norm: Tensor | float, eps: float = CLIP_EPS
) -> tuple[Tensor, Tensor]:
    """Scale all ``grads`` so that their global norm (``total_norm``, precomputed) is at most ``max_norm``.

    Equivalent to ``torch.nn.utils.clip_grads_with_norm_`` but leaves everything alone when ``total_norm`` or
    ``max_norm`` is not finite (an infinite threshold means "do not clip").

    Returns:
        ``(coefficient, clipped)``: the float64 scalar every gradient was multiplied by (post-clip norm =
        ``total_norm * coefficient``) and a bool scalar tensor, ``coefficient < 1``.
    """
    coef = clip_coefficient(total_norm, max_norm, eps)
    if grads:
        foreach_mul_(grads, _factor_for(coef, grads[0]))
    return coef, coef < 1.0


def clip_by_param_norm_(
    grads: Sequence[Tensor], param_norms: Tensor, max_norm: Tensor | float, eps: float = CLIP_EPS
) -> tuple[Tensor, Tensor]:
    """Scale each gradient so that its own norm (``param_norms[i]``, precomputed) is at most ``max_norm``.

    Returns:
        ``(coefficients, clipped)``: the per-parameter float64 factors and a bool scalar, any factor < 1.
    """
    coef = clip_coefficient(param_norms, max_norm, eps)
    if grads:
        foreach_mul_(grads, [_factor_for(c, g) for c, g in zip(coef.unbind(0), grads)])
    return coef, (coef < 1.0).any() if coef.numel() else torch.zeros((), dtype=torch.bool)


def max_abs(g: Tensor) -> Tensor:
    """The largest ``|element|`` of ``g`` as a float64 scalar tensor (NaN if any element is NaN, 0 when empty)."""
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=g.device)
    lo, hi = torch.aminmax(g)
    return torch.maximum(-lo, hi).to(torch.float64)


def clip_by_value_(grads: Sequence[Tensor], clip_value: float) -> Tensor:
    """Clamp every element to ``[-clip_value, clip_value]``, in place, sparing gradients that hold NaN or inf.

    Needs no norm at all: a finite gradient is clamped whatever its norm (even one that overflows float32).
    Real gradients only (complex ones are refused by the clipper at setup).

    Returns:
        A bool scalar tensor: did any finite gradient hold an element beyond the bound.
    """
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    dev = grads[0].device
    # the largest |element| of each gradient: tells both whether it is finite and whether anything is clipped. One
    # aminmax read per tensor: torch's CPU inf-norm (``_foreach_norm(..., inf)``) is ~12x slower on large tensors.
    top = torch.stack([max_abs(g).to(dev) for g in grads])
    finite = torch.isfinite(top)
    clipped = (finite & (top > clip_value)).any()
    bound = torch.where(finite, clip_value, torch.inf)
    upper = [b.to(g.dtype) if g.dtype.is_floating_point else b for b, g in zip(bound.unbind(0), grads)]
    try:
        torch._foreach_clamp_max_(list(grads), upper)
        torch._foreach_clamp_min_(list(grads), [-u for u in upper])
    except _FOREACH_ERRORS:  # several devices, or a dtype the kernel does not take
        for g, u in zip(grads, upper):
            u = u.to(g.device)
            g.clamp_(min=-u, max=u)
    return clipped


def clip_by_agc_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    clipping: float,
    eps: float = 1e-3,
    grad_eps: float = CLIP_EPS,
) -> tuple[Tensor, Tensor]:
    """Adaptive gradient clipping (Brock et al. 2021, arXiv 2102.06171), unit-wise, in place.

    For every unit (output row of a weight of 2+ dims; the whole tensor for biases and scalars) with gradient
    norm ``g`` and weight norm ``w``: if ``g > clipping * max(w, eps)`` the unit's gradient is scaled by
    ``clipping * max(w, eps) / max(g, grad_eps)``. Units whose gradient is not finite are left alone. Unit norms
    are accumulated in float64, so a finite gradient is clipped however large it is; complex parameters are
    measured by their modulus.

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
        if is_sharded(g) or is_sharded(p):  # rows spread over ranks: core.sharded sums their pieces
            max_norm = unit_norms(p).to(torch.float64).clamp_min(eps) * clipping
            factors[i], n_over = _factor_from(unit_norms(g).to(torch.float64), max_norm, g, grad_eps)
            clipped = clipped + n_over.to(dev)
        elif g.numel() <= _AGC_STACK_MAX_NUMEL:
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
    foreach_mul_([local_view(g) for g in grads], [f for f in factors if f is not None])
    return clipped, torch.tensor(total, dtype=torch.long, device=dev)


#: Tensors up to this many elements are stacked by shape in :func:`clip_by_agc_`. The stack is a copy: for 256x256
#: weights (65k elements) it cost more than the kernel launches it saved; 4096 is a cautious bound below that.
_AGC_STACK_MAX_NUMEL = 1 << 12


def _agc_factor(
    param: Tensor, grad: Tensor, clipping: float, eps: float, grad_eps: float, stacked: bool
) -> tuple[Tensor, Tensor]:
    """AGC's per-unit factor for one tensor (or a stack of same-shape tensors) and how many units are over."""
    max_norm = agc_max_norms(param, clipping, eps, stacked).to(torch.float64)
    return _factor_from(_unit_norms64(grad, stacked), max_norm, grad, grad_eps)


def _unit_norms64(grad: Tensor, stacked: bool) -> Tensor:
    """Unit norms that stay finite for finite gradients. On the CPU: measured in the gradient's own precision and
    measured again in float64 only where that overflowed (a host check costs nothing there; a float64 copy of every
    gradient would cost more than AGC itself). Elsewhere: accumulated in float64 (no host check, no sync)."""
    if grad.device.type != "cpu":
        return unitwise_norm(grad, stacked, dtype=torch.float64)
    norms = unitwise_norm(grad, stacked)
    if bool(torch.isinf(norms).any()):
        return unitwise_norm(grad, stacked, dtype=torch.float64)
    return norms.to(torch.float64)


def _factor_from(gnorm: Tensor, max_norm: Tensor, grad: Tensor, grad_eps: float) -> tuple[Tensor, Tensor]:
    over = torch.isfinite(gnorm) & (gnorm > max_norm)
    factor = torch.where(over, max_norm / gnorm.clamp_min(grad_eps), 1.0)
    real = torch.float64 if grad.dtype in (torch.float64, torch.complex128) else torch.float32
    return factor.to(real), over.sum()
