"""The all-in-one entry point: the three gradguard callbacks, configured to work together, in one call."""

from __future__ import annotations

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


def _kwargs(name: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{prefix(_OWNER)}`{name}` must be a mapping of keyword arguments or None, got {type(value).__name__}"
        )
    return dict(value)


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
    shared: dict[str, Any] = {"log_every_n_steps": log_every_n_steps}
    callbacks: list[Callback] = []
    if monitor:
        callbacks.append(GradientNormMonitor(**{**shared, **_kwargs("monitor_kwargs", monitor_kwargs)}))
    if clipping is not None:
        options = {**shared, "progress_bar": progress_bar, **_kwargs("clipping_kwargs", clipping_kwargs)}
        callbacks.append(AdaptiveGradientClipping(clipping, **options))  # type: ignore[arg-type]
    if guard is not None:
        # the guard always shows its counters in the progress bar (when the Trainer has one)
        callbacks.append(NaNGuard(**{**shared, "action": guard, **_kwargs("guard_kwargs", guard_kwargs)}))
    return callbacks
