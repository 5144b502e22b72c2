"""Argument checks shared by the core classes and the callbacks: one wording for every constructor error.

Wrong types raise ``TypeError``, wrong values ``ValueError``; each message names the argument, the allowed values
and what was received.
"""

from __future__ import annotations

from typing import Any, overload

__all__ = ["check_bool", "check_choice", "check_int", "is_number"]


def is_number(value: Any) -> bool:
    """A real int or float (``bool`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@overload
def check_int(name: str, value: Any, low: int) -> int: ...
@overload
def check_int(name: str, value: Any, low: int, allow_none: bool) -> int | None: ...
def check_int(name: str, value: Any, low: int, allow_none: bool = False) -> int | None:
    """``value`` as an int ``>= low`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    allowed = f"an int >= {low}" + (" or None" if allow_none else "")
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` as one of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__} ({value!r})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (no truthy stand-ins)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value
