"""Argument checks shared by the core classes and the callbacks: one wording for every constructor error.

Wrong types raise ``TypeError``, wrong values ``ValueError``; each message names the argument, the allowed values
and what was received, and, when the caller passes ``owner`` (the class name), the class too:
``"AdaptiveGradientClipping: z_threshold must be a number, finite and > 0, got str ('2')"``.

Numbers: Python ``int``/``float`` and numpy's scalar types (``np.float32(2.5)``, ``np.int64(3)``, ...) are accepted
alike (sweeps pass numpy scalars) and returned as Python numbers; ``bool`` (and ``np.bool_``) is never a number.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, cast, overload


def prefix(owner: str | None) -> str:
    """``"Owner: "`` (or nothing): the start of every message, naming the class whose argument is wrong."""
    return f"{owner}: " if owner else ""


def _is_bool(value: Any) -> bool:
    # numpy's bool (``bool_``, named ``bool`` in numpy 2) without importing numpy
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def is_number(value: Any) -> bool:
    """A real number: ``int``, ``float`` or a numpy integer/floating scalar (``bool`` is not a number here).

    Example:
        >>> import numpy as np
        >>> [is_number(v) for v in (1, 2.5, np.float32(2.5), np.int64(3), True, "1", None, 1j)]
        [True, True, True, True, False, False, False, False]
    """
    return isinstance(value, numbers.Real) and not _is_bool(value)


def is_integer(value: Any) -> bool:
    """An integer: ``int`` or a numpy integer scalar (``bool`` is not one)."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _type_error(name: str, allowed: str, value: Any, owner: str | None) -> TypeError:
    return TypeError(f"{prefix(owner)}{name} must be {allowed}, got {type(value).__name__} ({value!r})")


@overload
def check_int(name: str, value: Any, low: int, *, high: int | None = ..., owner: str | None = ...) -> int: ...
@overload
def check_int(
    name: str, value: Any, low: int, allow_none: bool, *, high: int | None = ..., owner: str | None = ...
) -> int | None: ...
def check_int(
    name: str, value: Any, low: int, allow_none: bool = False, *, high: int | None = None, owner: str | None = None
) -> int | None:
    """``value`` as an int in ``[low, high]`` (``high`` None: no upper bound), or None when ``allow_none``.

    Example:
        >>> import numpy as np
        >>> check_int("window", np.int64(3), 2)
        3
    """
    if value is None and allow_none:
        return None
    allowed = f"an int >= {low}" + (f" and <= {high}" if high is not None else "") + (" or None" if allow_none else "")
    if not is_integer(value):
        raise _type_error(name, allowed, value, owner)
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{prefix(owner)}{name} must be {allowed}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    owner: str | None = None,
    describe: str | None = None,
) -> float | None:
    """``value`` as a float in the interval given by ``low``/``high`` (open ends with ``low_open``/``high_open``).

    NaN is always refused. ``describe`` replaces the generated wording of the range in messages.

    Example:
        >>> check_number("z_threshold", 2, low=0.0, low_open=True, high_open=True)
        2.0
        >>> check_number("ema_decay", 1.0, low=0.0, high=1.0, low_open=True, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: ema_decay must be in (0.0, 1.0), got 1.0
    """
    if value is None and allow_none:
        return None
    if describe is None:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        describe = f"in {lo}{low}, {high}{hi}"
    allowed_type = "a number" + (" or None" if allow_none else "")
    if not is_number(value):
        raise _type_error(name, f"{allowed_type}, {describe}", value, owner)
    v = float(value)
    below = v < low or (low_open and v == low)
    above = v > high or (high_open and v == high)
    if math.isnan(v) or below or above:
        raise ValueError(
            f"{prefix(owner)}{name} must be {describe}" + (" or None" if allow_none else "") + f", got {value!r}"
        )
    return v


def check_positive(name: str, value: Any, *, allow_inf: bool = False, owner: str | None = None) -> float:
    """``value`` as a float ``> 0``, finite unless ``allow_inf``."""
    describe = "> 0 (inf allowed)" if allow_inf else "finite and > 0"
    result = check_number(name, value, low=0.0, low_open=True, high_open=not allow_inf, owner=owner, describe=describe)
    return cast(float, result)


def check_unit_interval(name: str, value: Any, *, closed: bool = False, owner: str | None = None) -> float:
    """``value`` as a float in the open interval (0, 1), or in [0, 1] with ``closed``."""
    describe = "in [0, 1]" if closed else "in the open interval (0, 1)"
    result = check_number(
        name, value, low=0.0, high=1.0, low_open=not closed, high_open=not closed, owner=owner, describe=describe
    )
    return cast(float, result)


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, owner: str | None = None) -> str:
    """``value`` as one of the strings ``choices``."""
    if not isinstance(value, str):
        raise _type_error(name, f"a str, one of {choices}", value, owner)
    if value not in choices:
        raise ValueError(f"{prefix(owner)}{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value: Any, *, owner: str | None = None) -> bool:
    """``value`` as a bool (no truthy stand-ins; numpy's ``bool_`` is accepted)."""
    if not _is_bool(value):
        raise _type_error(name, "a bool", value, owner)
    return bool(value)


def check_norm_type(
    name: str, value: Any, *, low: float = 0.0, high: float = math.inf, owner: str | None = None
) -> float:
    """``value`` as the p of a p-norm: a number in ``[low, high]`` (``low`` 0: any p > 0), or ``inf`` whatever
    ``high`` is (the max-norm).

    Example:
        >>> check_norm_type("norm_type", 2), check_norm_type("norm_type", math.inf, low=1.0, high=100.0)
        (2.0, inf)
        >>> check_norm_type("norm_type", 1e3, low=1.0, high=100.0)
        Traceback (most recent call last):
        ...
        ValueError: norm_type must be in [1, 100] or inf, got 1000.0
    """
    any_p = low == 0.0 and high == math.inf
    describe = "a positive number or inf" if any_p else f"in [{low:g}, {high:g}] or inf"
    p = cast(float, check_number(name, value, low=low, low_open=low == 0.0, owner=owner, describe=describe))
    if p != math.inf and p > high:
        raise ValueError(f"{prefix(owner)}{name} must be {describe}, got {value!r}")
    return p


def check_patterns(name: str, value: Any, *, owner: str | None = None) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty str patterns (a list or tuple of them; None gives an empty tuple)."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _type_error(name, "a list or tuple of str", value, owner)
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"{prefix(owner)}{name} must hold non-empty str patterns, got {pattern!r} in {value!r}")
    if not all(value):
        raise ValueError(f"{prefix(owner)}{name} must hold non-empty str patterns, got an empty one in {value!r}")
    return tuple(value)
