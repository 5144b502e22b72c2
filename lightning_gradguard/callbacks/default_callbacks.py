"""The all-in-one entry point: the three gradguard callbacks, configured to work together, in one call."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks.adaptive_gradient_clipping import METHODS, AdaptiveGradientClipping
from lightning_gradguard.callbacks.gradient_norm_monitor import GradientNormMonitor
from lightning_gradguard.callbacks.nan_guard import NaNGuard
from lightning_gradguard.core._arg_checks import check_bool, check_choice, prefix
from lightning_gradguard.core.guard._policy import POLICIES

__all__ = ["default_callbacks"]

_OWNER = "default_callbacks"


def _kwargs(
    name: str, value: Mapping[str, Any] | None, cls: type | None = None, named_by: tuple[str, str] | None = None
) -> dict[str, Any]:
    """``value`` as a dict, checked against ``cls``'s keyword arguments: an unknown key is a ``TypeError`` that lists
    the allowed ones, and the key that ``default_callbacks``' own argument already names (``named_by``: the key and
    that argument, e.g. the guard's ``action`` and ``guard``) a ``ValueError`` (one of the two would silently win)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{prefix(_OWNER)}`{name}` must be a mapping of keyword arguments or None, got {type(value).__name__}"
        )
    out = dict(value)
    if named_by is not None and named_by[0] in out:
        key, arg = named_by
        raise ValueError(
            f"{prefix(_OWNER)}`{name}` sets {key!r}, which `{arg}` already names; pass it as `{arg}=...` instead"
        )
    if cls is not None:
        params = inspect.signature(cls).parameters  # the constructor's, without self
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            allowed = sorted(
                n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL
            )
            if named_by is not None:
                allowed = [n for n in allowed if n != named_by[0]]
            unknown = sorted(k for k in out if k not in allowed)
            if unknown:
                raise TypeError(f"{prefix(_OWNER)}`{name}` has unknown keys {unknown}; allowed: {', '.join(allowed)}")
    return out


def _unused(name: str, value: Mapping[str, Any] | None, arg: str, setting: Any) -> None:
    if value:
        raise ValueError(
            f"{prefix(_OWNER)}`{name}` was given, but `{arg}={setting!r}` leaves that callback out; drop one of them"
        )


def default_callbacks(
    *,
    monitor: bool = True,
    clipping: str | None = "zscore",
    guard: str | None = "auto",
    log_every_n_steps: int | None = None,
    progress_bar: bool = True,
    monitor_kwargs: Mapping[str, Any] | None = None,
    clipping_kwargs: Mapping[str, Any] | None = None,
    guard_kwargs: Mapping[str, Any] | None = None,
) -> list[Callback]:
    """Monitor, adaptive clipping and NaN guard in one list, ready for ``Trainer(callbacks=...)``.

    The three callbacks share one gradient measurement per optimizer step, so using them together costs about what
    one of them costs. Pass ``None``/``False`` to leave one out; per-callback options go in the ``*_kwargs``
    mappings (they win over the shared options).

    Args:
        monitor: add a :class:`~lightning_gradguard.GradientNormMonitor`.
        clipping: the :class:`~lightning_gradguard.AdaptiveGradientClipping` method (``"zscore"``, ``"percentile"``,
            ``"agc"``, ``"norm"``, ``"value"``, ``"per_parameter"``), or None for no clipping.
        guard: the :class:`~lightning_gradguard.NaNGuard` action (``"auto"``, ``"rollback"``, ``"skip"``,
            ``"halt"``), or None for no guard.
        log_every_n_steps: shared log interval (None: the Trainer's ``log_every_n_steps``).
        progress_bar: show the clip rate in the progress bar (the guard always shows its counters there).
        monitor_kwargs: extra keyword arguments of the monitor.
        clipping_kwargs: extra keyword arguments of the clipping callback.
        guard_kwargs: extra keyword arguments of the guard.

    Returns:
        The callbacks, in the order monitor, clipping, guard.

    Raises:
        ValueError: an unknown ``clipping`` method or ``guard`` action, or nothing selected at all.
        TypeError: a ``*_kwargs`` argument that is not a mapping, or a wrong type for a shared option.

    Example:
        >>> cbs = default_callbacks(clipping="percentile", guard="skip")
        >>> [type(cb).__name__ for cb in cbs]
        ['GradientNormMonitor', 'AdaptiveGradientClipping', 'NaNGuard']
    """
    check_bool("`monitor`", monitor, owner=_OWNER)
    check_bool("`progress_bar`", progress_bar, owner=_OWNER)
    if clipping is not None:
        check_choice("`clipping`", clipping, METHODS, owner=_OWNER)
    if guard is not None:
        check_choice("`guard`", guard, POLICIES, owner=_OWNER)
    if not monitor and clipping is None and guard is None:
        raise ValueError(f"{prefix(_OWNER)}needs at least one of `monitor`, `clipping`, `guard`; all were off")
    if not monitor:
        _unused("monitor_kwargs", monitor_kwargs, "monitor", monitor)
    if clipping is None:
        _unused("clipping_kwargs", clipping_kwargs, "clipping", clipping)
    if guard is None:
        _unused("guard_kwargs", guard_kwargs, "guard", guard)
    shared: dict[str, Any] = {"log_every_n_steps": log_every_n_steps}
    callbacks: list[Callback] = []
    if monitor:
        monitor_options = _kwargs("monitor_kwargs", monitor_kwargs, GradientNormMonitor)
        callbacks.append(GradientNormMonitor(**{**shared, **monitor_options}))
    if clipping is not None:
        clip_options = _kwargs("clipping_kwargs", clipping_kwargs, AdaptiveGradientClipping, ("method", "clipping"))
        options = {**shared, "progress_bar": progress_bar, **clip_options}
        callbacks.append(AdaptiveGradientClipping(clipping, **options))  # type: ignore[arg-type]
    if guard is not None:
        # the guard always shows its counters in the progress bar (when the Trainer has one)
        guard_options = _kwargs("guard_kwargs", guard_kwargs, NaNGuard, ("action", "guard"))
        callbacks.append(NaNGuard(**{**shared, "action": guard, **guard_options}))
    return callbacks
