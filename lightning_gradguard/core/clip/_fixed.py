"""The fixed clippers: global norm, per-parameter norm, element value, and AGC (unit-wise, relative to the weights).

Each scales or clamps the gradients of one step in place through :mod:`lightning_gradguard.core.clip._ops` and keeps
no statistics. Constructors check their arguments (:mod:`lightning_gradguard.core.clip._options`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase
from functools import lru_cache

from torch import Tensor

from lightning_gradguard.core._arg_checks import prefix
from lightning_gradguard.core.clip._base import Clipper, ClipRecord, false_tensor
from lightning_gradguard.core.clip._ops import (
    CLIP_EPS,
    clip_by_agc_,
    clip_by_global_norm_,
    clip_by_param_norm_,
    clip_by_value_,
    foreach_mul_,
)
from lightning_gradguard.core.clip._options import check_clip_option as _opt
from lightning_gradguard.core.measure._grad_stats import GradStats, layer_name_of


class NormClipper(Clipper):
    """Fixed global-norm clipping at ``max_norm`` (``torch.nn.utils.clip_grad_norm_``)."""

    method = "norm"
    options = ("max_norm",)

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = _opt("max_norm", max_norm, type(self).__name__)
        self.norm_type = _opt("norm_type", norm_type, type(self).__name__)

    def clip_(self, stats: GradStats) -> ClipRecord:
        norm = stats.total_norm64
        if norm.device.type == "cpu":  # reading a CPU scalar is no sync: decide in Python, multiply only if needed
            value = norm.item()
            if not (math.isfinite(value) and value + CLIP_EPS > self.max_norm):
                return ClipRecord(stats.total_norm, self.max_norm, False, 1.0)
            coef = self.max_norm / (value + CLIP_EPS)
            foreach_mul_(stats.local_grads, coef)
            return ClipRecord(stats.total_norm, self.max_norm, True, coef)
        coef_t, clipped = clip_by_global_norm_(stats.local_grads, norm, self.max_norm)
        return ClipRecord(stats.total_norm, self.max_norm, clipped, coef_t)


class PerParameterClipper(Clipper):
    """Each parameter's gradient clipped to its own norm bound ``max_norm``."""

    method = "per_parameter"
    options = ("max_norm",)

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = _opt("max_norm", max_norm, type(self).__name__)
        self.norm_type = _opt("norm_type", norm_type, type(self).__name__)

    def clip_(self, stats: GradStats) -> ClipRecord:
        coef, clipped = clip_by_param_norm_(stats.local_grads, stats.param_norms64, self.max_norm)
        return ClipRecord(stats.total_norm, self.max_norm, clipped, coef)


class ValueClipper(Clipper):
    """Every element clamped to ``[-clip_value, clip_value]`` (``torch.nn.utils.clip_grad_value_``), whatever the
    norms; gradients holding NaN/inf are left to the guard."""

    method = "value"
    options = ("clip_value",)

    def __init__(self, clip_value: float = 1.0, norm_type: float = 2.0) -> None:
        self.clip_value = _opt("clip_value", clip_value, type(self).__name__)
        self.norm_type = _opt("norm_type", norm_type, type(self).__name__)

    def check_parameters(self, named_params: Sequence[tuple[str, Tensor]], owner: str | None = None) -> None:
        for name, p in named_params:
            if p.is_complex():
                raise ValueError(
                    f"{prefix(owner)}method='value' cannot clip the complex parameter {name!r} (elements of a complex "
                    "gradient have no order to clamp); use method='norm', 'zscore' or 'agc'"
                )

    def clip_(self, stats: GradStats) -> ClipRecord:
        clipped = clip_by_value_(stats.local_grads, self.clip_value)
        return ClipRecord(stats.total_norm, self.clip_value, clipped)


@lru_cache(maxsize=64)
def _excluded_mask(names: tuple[str, ...], patterns: tuple[str, ...]) -> tuple[bool, ...]:
    def hit(name: str) -> bool:
        layer = layer_name_of(name)
        return any(fnmatchcase(name, p) or fnmatchcase(layer, p) or name.startswith(p + ".") for p in patterns)

    return tuple(hit(n) for n in names)


class AGCClipper(Clipper):
    """Adaptive gradient clipping (Brock et al. 2021): unit-wise bound ``clipping * max(weight_norm, eps)``;
    parameters matching an ``exclude`` pattern (``fnmatch`` on the parameter or layer name, or a module prefix) are
    left alone."""

    method = "agc"
    options = ("clipping", "eps", "exclude")

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ()) -> None:
        o = type(self).__name__
        self.clipping = _opt("clipping", clipping, o)
        self.eps = _opt("eps", eps, o)
        self.exclude: tuple[str, ...] = _opt("exclude", exclude, o)

    def clip_(self, stats: GradStats) -> ClipRecord:
        norm = stats.total_norm64
        params, grads = stats.params, stats.grads
        if self.exclude:
            mask = _excluded_mask(tuple(stats.names), self.exclude)
            params = [p for p, skip in zip(params, mask) if not skip]
            grads = [g for g, skip in zip(grads, mask) if not skip]
        if not grads:
            return ClipRecord(stats.total_norm, None, false_tensor(norm.device))
        clipped_units, _ = clip_by_agc_(params, grads, self.clipping, self.eps)
        return ClipRecord(stats.total_norm, None, clipped_units > 0)
