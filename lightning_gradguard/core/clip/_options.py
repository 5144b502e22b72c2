"""The options of the clippers: their defaults, allowed values and size bounds, checked in one place.

Every way of building a clipper runs these checks: ``AdaptiveGradientClipping(...)``, ``GradGuard(clipping=...,
clipping_options=...)``, :func:`~lightning_gradguard.core.clip.make_clipper`, and the clipper classes themselves
when constructed directly. So a bad value is refused with the same words whatever the entry point; only the class
named at the start of the message (``owner``) differs. Which method uses which option is the registry's business
(:mod:`lightning_gradguard.core.clip._registry`), not this module's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning_gradguard.core._arg_checks import (
    check_choice,
    check_int,
    check_norm_type,
    check_number,
    check_patterns,
    check_positive,
    check_unit_interval,
    prefix,
)

#: Largest ``window`` (the exact estimator allocates ``window`` float64 slots: 8 MB at this bound).
MAX_WINDOW = 1_000_000
#: Largest ``warmup_steps`` (the warm-up keeps that many norms).
MAX_WARMUP = 100_000
#: Largest finite ``norm_type`` (p-norms for larger p equal the max-norm to float precision: use inf).
MAX_NORM_TYPE = 100.0

#: Every clipping option and its default, in the order options are checked (the callback's signature order).
CLIP_OPTION_DEFAULTS: dict[str, Any] = dict(
    z_threshold=2.5, clip_to="threshold", ema_decay=0.97, percentile=10.0, window=1000, percentile_estimator="window",
    clipping=0.01, eps=1e-3, exclude=None, max_norm=1.0, clip_value=1.0, norm_type=2.0, warmup_steps=10,
    fallback_factor=10.0, fallback_max_norm=1.0,
)  # fmt: skip


_CHECKS: dict[str, Callable[[Any, str | None], Any]] = {
    "z_threshold": lambda v, o: check_positive("z_threshold", v, owner=o),
    "clip_to": lambda v, o: check_choice("clip_to", v, ("threshold", "mean"), owner=o),
    "ema_decay": lambda v, o: check_unit_interval("ema_decay", v, owner=o),
    "percentile": lambda v, o: check_number("percentile", v, low=0.0, high=100.0, low_open=True, owner=o),
    "window": lambda v, o: check_int("window", v, 2, high=MAX_WINDOW, owner=o),
    "percentile_estimator": lambda v, o: check_choice("percentile_estimator", v, ("window", "histogram"), owner=o),
    "clipping": lambda v, o: check_positive("clipping", v, owner=o),
    "eps": lambda v, o: check_positive("eps", v, owner=o),
    "exclude": lambda v, o: check_patterns("exclude", v, owner=o),
    "max_norm": lambda v, o: check_positive("max_norm", v, owner=o),
    "clip_value": lambda v, o: check_positive("clip_value", v, owner=o),
    "norm_type": lambda v, o: check_norm_type("norm_type", v, low=1.0, high=MAX_NORM_TYPE, owner=o),
    "warmup_steps": lambda v, o: check_int("warmup_steps", v, 0, high=MAX_WARMUP, owner=o),
    "fallback_factor": lambda v, o: check_number(
        "fallback_factor", v, low=1.0, high=math.inf, high_open=True, owner=o, describe="finite and >= 1"
    ),
    "fallback_max_norm": lambda v, o: None if v is None else check_positive("fallback_max_norm", v, owner=o),
}


def check_clip_option(name: str, value: Any, owner: str | None = None) -> Any:
    """``value`` of the clipping option ``name`` as the clippers use it (Python numbers, ``exclude`` as a tuple).

    Raises:
        TypeError: ``name`` is no clipping option, or ``value`` has the wrong type.
        ValueError: ``value`` is out of range.

    Example:
        >>> check_clip_option("window", 50)
        50
        >>> check_clip_option("ema_decay", 1.0, owner="ZScoreClipper")
        Traceback (most recent call last):
        ...
        ValueError: ZScoreClipper: ema_decay must be in the open interval (0, 1), got 1.0
    """
    check = _CHECKS.get(name)
    if check is None:
        raise TypeError(
            f"{prefix(owner)}{name!r} is not a clipping option; the options are {', '.join(CLIP_OPTION_DEFAULTS)}"
        )
    return check(value, owner)
