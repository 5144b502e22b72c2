"""The ``gradguard/`` scalar tags every adapter writes, named and derived in one place.

Norm-like values span decades: each of :data:`LOG10_NAMES` also gets a ``<name>_log10`` twin, written in the same call
as the value itself, so the two are always at the same steps: where the value is written, its twin is too. The twin
of a value that has no finite logarithm is the logarithm's limit (``inf`` -> ``inf``, ``0`` -> ``-inf``; NaN and
negative values -> NaN): TensorBoard marks such points at the chart's edge, so an explosion shows on the log10 chart
as well. A threshold of ``inf`` (before the clipper has statistics) is not written at all, nor its twin.

Tags whose value covers the steps since their previous write (:data:`INTERVAL_NAMES`) are ended by their owner's
write; every other tag holds a level (a norm at a step, the LR, a cumulative counter) that may be written again
later at a new step without changing what it means (see
:meth:`~lightning_gradguard.core.engine._timeline.Timeline.held`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from lightning_gradguard.core.measure._grad_stats import norms_of


def tag(name: str, optimizer_idx: int = 0) -> str:
    """The TensorBoard tag ``gradguard/<name>``; optimizers after the first get ``_opt<i>`` appended."""
    return f"gradguard/{name}" if optimizer_idx == 0 else f"gradguard/{name}_opt{optimizer_idx}"


#: scalars whose values span decades: each also gets a ``<name>_log10`` twin
LOG10_NAMES = frozenset(
    {"grad_norm", "grad_norm_max", "grad_norm_mean", "grad_norm_clipped", "clip_threshold", "loss_max"}
)
#: scalars whose value covers the steps since their previous write (a maximum, a mean, a count); each is ended by
#: the write of the callback that keeps it, and never written again with an old value
INTERVAL_NAMES = frozenset(
    {"grad_norm_max", "grad_norm_mean", "clip_fraction", "clipped_steps", "flagged_steps", "loss_max"}
)
_TAG = re.compile(r"gradguard/(?P<name>.+?)(?:_opt(?P<idx>\d+))?$")


def split_tag(key: str) -> tuple[str, int] | None:
    """``(name, optimizer index)`` of a ``gradguard/`` tag; None for any other tag.

    Example:
        >>> split_tag("gradguard/clip_threshold_opt1"), split_tag("gradguard/lr"), split_tag("train_loss")
        (('clip_threshold', 1), ('lr', 0), None)
    """
    m = _TAG.match(key)
    return (m["name"], int(m["idx"] or 0)) if m else None


def log10(value: float) -> float:
    """``log10(value)``, extended to the limits: ``inf`` for ``inf``, ``-inf`` for 0, NaN for NaN and negatives.

    Example:
        >>> log10(100.0), log10(math.inf), log10(0.0), log10(math.nan)
        (2.0, inf, -inf, nan)
    """
    if value > 0:
        return math.log10(value) if value < math.inf else math.inf
    return -math.inf if value == 0 else math.nan


def log10_twins(values: Mapping[str, float]) -> dict[str, float]:
    """``gradguard/<name>_log10`` (``_opt<i>`` kept last) for every value of a :data:`LOG10_NAMES` tag (:func:`log10`:
    a twin for every value written, non-finite ones included).

    Example:
        >>> log10_twins({"gradguard/grad_norm": 100.0, "gradguard/clip_threshold_opt1": 0.01, "gradguard/lr": 0.1})
        {'gradguard/grad_norm_log10': 2.0, 'gradguard/clip_threshold_log10_opt1': -2.0}
        >>> log10_twins({"gradguard/grad_norm_max": math.inf, "gradguard/loss_max": math.nan})
        {'gradguard/grad_norm_max_log10': inf, 'gradguard/loss_max_log10': nan}
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        m = _TAG.match(key)
        if m and m["name"] in LOG10_NAMES:
            out[tag(m["name"] + "_log10", int(m["idx"] or 0))] = log10(value)
    return out


def with_twins(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` as floats, with their log10 twins added (what every adapter writes)."""
    out = {k: float(v) for k, v in values.items()}
    out.update(log10_twins(out))
    return out


def clip_scalars(idx: int, stats: Any, record: Any, per_parameter: bool) -> dict[str, float]:
    """A clipper's scalars at a logging step: ``clip_threshold`` (when finite), ``grad_norm_clipped`` (the norm after
    clipping; measured again where the clip changed each gradient differently) and ``grad_norm_zscore``.

    ``stats`` is the step's :class:`~lightning_gradguard.core.measure.GradStats`, ``record`` the clipper's
    :class:`~lightning_gradguard.core.clip.ClipRecord`; ``per_parameter``: the method scales each gradient alone.
    """
    values: dict[str, float] = {}
    threshold = math.inf if record.threshold is None else float(record.threshold)
    if math.isfinite(threshold):
        values[tag("clip_threshold", idx)] = threshold
    if record.coefficient is not None and record.threshold is not None and not per_parameter:
        post = float(stats.total_norm64 * record.coefficient)
    else:  # value / per_parameter / agc change each gradient differently: measure again (logging steps only)
        norms = norms_of(stats.grads, stats.norm_type, torch.float64)
        post = float(torch.linalg.vector_norm(norms, stats.norm_type)) if norms.numel() else 0.0
    if math.isfinite(post):
        values[tag("grad_norm_clipped", idx)] = post
    z = record.zscore
    if z is not None and math.isfinite(float(z)):
        values[tag("grad_norm_zscore", idx)] = float(z)
    return values
