"""Clipping: the clippers, their learned thresholds and the in-place operations.

Holds the ``Clipper`` interface and its ``ClipRecord`` (``_base``), the fixed methods norm/value/per_parameter/agc
(``_fixed``), the learned ones zscore/percentile (``_adaptive``), the warm-up reference (``_warmup``), the threshold
rules (``_thresholds``), running statistics (``_running_stats``), the in-place operations (``_ops``), and the one
place every clipping option is checked plus the registry and :func:`make_clipper` (``_options``, ``_registry``).

May import: :mod:`~lightning_gradguard.core.measure` and ``_arg_checks``.
"""

from lightning_gradguard.core.clip._adaptive import PercentileClipper, ZScoreClipper
from lightning_gradguard.core.clip._base import Clipper, ClipRecord
from lightning_gradguard.core.clip._fixed import AGCClipper, NormClipper, PerParameterClipper, ValueClipper
from lightning_gradguard.core.clip._registry import CLIPPERS, check_clip_options, make_clipper

__all__ = [
    "AGCClipper",
    "CLIPPERS",
    "ClipRecord",
    "Clipper",
    "NormClipper",
    "PerParameterClipper",
    "PercentileClipper",
    "ValueClipper",
    "ZScoreClipper",
    "check_clip_options",
    "make_clipper",
]
