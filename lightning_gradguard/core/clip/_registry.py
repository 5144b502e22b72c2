"""One clipper per method: small objects that take a step's gradient statistics, clip, and return what they did.

Every clipper has ``clip_(stats) -> ClipRecord`` (clip the gradients of a
:class:`~lightning_gradguard.core.measure.GradStats` in place), ``commit(dropped)`` (learn from the step just
clipped, unless the step was dropped), ``state_dict()`` and ``load_state_dict()``. :data:`CLIPPERS` maps each method
name to its class; :attr:`Clipper.options` names the constructor options a method uses.

The adaptive clippers (:class:`ZScoreClipper`, :class:`PercentileClipper`) learn only at :meth:`Clipper.commit`,
called once the fate of the step is known: a step that another party dropped (the NaN guard skipped its update)
never enters the statistics. NaN/inf norms never enter them, and never get clipped (scaling inf makes NaN).
"""

from __future__ import annotations

from typing import Any

from lightning_gradguard.core._arg_checks import check_choice, prefix
from lightning_gradguard.core.clip._adaptive import PercentileClipper, ZScoreClipper
from lightning_gradguard.core.clip._base import Clipper
from lightning_gradguard.core.clip._fixed import AGCClipper, NormClipper, PerParameterClipper, ValueClipper
from lightning_gradguard.core.clip._options import CLIP_OPTION_DEFAULTS, check_clip_option

#: method name -> clipper class.
CLIPPERS: dict[str, type[Clipper]] = {
    cls.method: cls
    for cls in (ZScoreClipper, PercentileClipper, AGCClipper, NormClipper, ValueClipper, PerParameterClipper)
}


def methods_using(option: str) -> list[str]:
    """The methods that use ``option`` (``norm_type``: every method but agc, which uses unit L2 norms)."""
    return [m for m, cls in CLIPPERS.items() if option in cls.options or (option == "norm_type" and m != "agc")]


def unused_option(method: str, values: dict[str, Any], defaults: dict[str, Any] | None = None) -> str | None:
    """The message for the first option in ``values`` that ``method`` does not use and that differs from its
    default (None when there is none): such a setting would be silently ignored. ``defaults``: those of
    :data:`~lightning_gradguard.core.clip._options.CLIP_OPTION_DEFAULTS` unless given.

    Example:
        >>> unused_option("agc", {"z_threshold": 3.0}, {"z_threshold": 2.5})
        "z_threshold=3.0 is not used by method='agc'; it applies to method 'zscore' only (leave it at its default 2.5)"
    """
    defaults = CLIP_OPTION_DEFAULTS if defaults is None else defaults
    for option, default in defaults.items():
        if option not in values:
            continue
        value = values[option]
        if option == "exclude" and not value:
            value = None  # an empty pattern list is the default
        users = methods_using(option)
        if value == default or method in users:
            continue
        which = f"method {users[0]!r} only" if len(users) == 1 else "methods " + ", ".join(map(repr, users))
        return (
            f"{option}={value!r} is not used by method={method!r}; it applies to {which} "
            f"(leave it at its default {default!r})"
        )
    return None


def check_clip_options(method: str, *, owner: str | None = None, **options: Any) -> dict[str, Any]:
    """Check ``method`` and every option given (any option of any method may be given at its default: a caller with
    one signature for all methods passes them all); returns the options as the clippers use them.

    Raises:
        TypeError: a wrong type, or a name that is no clipping option (the message names ``owner`` and the option).
        ValueError: a value out of range, or an option ``method`` does not use set to a non-default value.
    """
    method = check_choice("method", method, tuple(CLIPPERS), owner=owner)
    for name in options:
        if name not in CLIP_OPTION_DEFAULTS:
            check_clip_option(name, options[name], owner)  # raises: not an option
    values = {name: check_clip_option(name, options[name], owner) for name in CLIP_OPTION_DEFAULTS if name in options}
    problem = unused_option(method, values)
    if problem is not None:
        raise ValueError(f"{prefix(owner)}{problem}")
    return values


def make_clipper(method: str, *, owner: str | None = None, **options: Any) -> Clipper:
    """A new clipper for ``method`` with ``options`` (the others at their defaults), every option checked first.

    ``owner`` names the class the user called in error messages (``"AdaptiveGradientClipping"``, ``"GradGuard"``).

    Example:
        >>> make_clipper("zscore", z_threshold=3.0).z_threshold
        3.0
        >>> make_clipper("norm", owner="GradGuard", z_threshold=3.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: GradGuard: z_threshold=3.0 is not used by method='norm'; it applies to method 'zscore' only ...
    """
    values = check_clip_options(method, owner=owner, **options)
    cls = CLIPPERS[method]
    kwargs = {name: values[name] for name in cls.options if name in values}
    if "norm_type" in values and method != "agc":
        kwargs["norm_type"] = values["norm_type"]
    return cls(**kwargs)
