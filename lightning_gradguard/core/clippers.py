"""One clipper per method: small objects that take a step's gradient statistics, clip, and return what they did.

Every clipper has ``clip_(stats) -> ClipRecord`` (clip the gradients of a
:class:`~lightning_gradguard.core.grad_stats.GradStats` in place), ``commit(dropped)`` (learn from the step just
clipped, unless the step was dropped), ``state_dict()`` and ``load_state_dict()``. :data:`CLIPPERS` maps each method
name to its class; :attr:`Clipper.options` names the constructor options a method uses.

The adaptive clippers (:class:`ZScoreClipper`, :class:`PercentileClipper`) learn only at :meth:`Clipper.commit`,
called once the fate of the step is known: a step that another party dropped (the NaN guard skipped its update)
never enters the statistics. NaN/inf norms never enter them, and never get clipped (scaling inf makes NaN).
"""

from __future__ import annotations

from typing import Any

from lightning_gradguard.core.adaptive_clippers import PercentileClipper, ZScoreClipper
from lightning_gradguard.core.clipper_base import Clipper, ClipRecord
from lightning_gradguard.core.fixed_clippers import AGCClipper, NormClipper, PerParameterClipper, ValueClipper

__all__ = [
    "CLIPPERS",
    "AGCClipper",
    "ClipRecord",
    "Clipper",
    "NormClipper",
    "PerParameterClipper",
    "PercentileClipper",
    "ValueClipper",
    "ZScoreClipper",
    "methods_using",
    "unused_option",
]

#: method name -> clipper class.
CLIPPERS: dict[str, type[Clipper]] = {
    cls.method: cls
    for cls in (ZScoreClipper, PercentileClipper, AGCClipper, NormClipper, ValueClipper, PerParameterClipper)
}


def methods_using(option: str) -> list[str]:
    """The methods that use ``option`` (``norm_type``: every method but agc, which uses unit L2 norms)."""
    return [m for m, cls in CLIPPERS.items() if option in cls.options or (option == "norm_type" and m != "agc")]


def unused_option(method: str, values: dict[str, Any], defaults: dict[str, Any]) -> str | None:
    """The message for the first option in ``values`` that ``method`` does not use and that differs from its
    default (None when there is none): such a setting would be silently ignored.

    Example:
        >>> unused_option("agc", {"z_threshold": 3.0}, {"z_threshold": 2.5})
        "z_threshold=3.0 is not used by method='agc'; it applies to method 'zscore' only (leave it at its default 2.5)"
    """
    for option, default in defaults.items():
        value = values[option]
        users = methods_using(option)
        if value == default or method in users:
            continue
        which = f"method {users[0]!r} only" if len(users) == 1 else "methods " + ", ".join(map(repr, users))
        return (
            f"{option}={value!r} is not used by method={method!r}; it applies to {which} "
            f"(leave it at its default {default!r})"
        )
    return None
