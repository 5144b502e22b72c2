"""lightning-gradguard: Lightning callbacks that keep long training runs alive.

- :class:`GradientNormMonitor` shows gradient health in TensorBoard.
- :class:`AdaptiveGradientClipping` clips with thresholds learned from running statistics.
- :class:`NaNGuard` skips, rolls back or halts on NaN/inf.
- :func:`default_callbacks` returns the three, configured to work together.
- :class:`KeySuggestingParser`: ``LightningCLI(..., parser_class=KeySuggestingParser)`` names the closest valid key
  for a misspelled one in the config ("did you mean 'z_threshold'?").
- :class:`FaultDrill` injects faults (NaN batch, inf loss, spike, NaN weight, transient, bad batches, loss-scale
  collapse) into your own run at chosen steps and reports what the guard did and whether training recovered.
- :class:`GradGuard` does the clipping and recovery in a plain PyTorch loop (no Lightning needed);
  :class:`FabricGradGuard` in a Lightning Fabric loop.
- What the guards report: :class:`GuardEvent` (one per action), :class:`GuardCause` (why),
  :class:`GuardDecision` (the outcome of the last step), :class:`DivergenceError` (a halt).
- The clippers for a plain loop or a custom setup: :func:`make_clipper`, :class:`ZScoreClipper`,
  :class:`PercentileClipper`, :class:`AGCClipper`, :class:`NormClipper`, :class:`ValueClipper`,
  :class:`PerParameterClipper` (all with ``clip_(stats)``, ``state_dict``), :data:`CLIPPERS` (the method names).

The public names are loaded on first access (PEP 562), so ``import lightning_gradguard`` stays light: it does not
import lightning (whose torchmetrics dependency pulls in matplotlib when it is installed) until a callback is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_gradguard.__about__ import __version__
from lightning_gradguard.errors import DivergenceError

if TYPE_CHECKING:  # pragma: no cover
    from lightning_gradguard.callbacks.adaptive_gradient_clipping import AdaptiveGradientClipping
    from lightning_gradguard.callbacks.default_callbacks import default_callbacks
    from lightning_gradguard.callbacks.gradient_norm_monitor import GradientNormMonitor
    from lightning_gradguard.callbacks.nan_guard import NaNGuard
    from lightning_gradguard.core.clip import (
        CLIPPERS,
        AGCClipper,
        NormClipper,
        PercentileClipper,
        PerParameterClipper,
        ValueClipper,
        ZScoreClipper,
        make_clipper,
    )
    from lightning_gradguard.core.guard import GuardCause, GuardDecision, GuardEvent
    from lightning_gradguard.drill import FaultDrill
    from lightning_gradguard.fabric.fabric_grad_guard import FabricGradGuard
    from lightning_gradguard.key_suggesting_parser import KeySuggestingParser
    from lightning_gradguard.plain.grad_guard import GradGuard

_LAZY = {
    "AdaptiveGradientClipping": "lightning_gradguard.callbacks.adaptive_gradient_clipping",
    "default_callbacks": "lightning_gradguard.callbacks.default_callbacks",
    "GradientNormMonitor": "lightning_gradguard.callbacks.gradient_norm_monitor",
    "NaNGuard": "lightning_gradguard.callbacks.nan_guard",
    "FaultDrill": "lightning_gradguard.drill",
    "GradGuard": "lightning_gradguard.plain.grad_guard",
    "FabricGradGuard": "lightning_gradguard.fabric.fabric_grad_guard",
    "KeySuggestingParser": "lightning_gradguard.key_suggesting_parser",
    **{name: "lightning_gradguard.core.guard" for name in ("GuardCause", "GuardDecision", "GuardEvent")},
    **{
        name: "lightning_gradguard.core.clip"
        for name in (
            "CLIPPERS",
            "AGCClipper",
            "NormClipper",
            "PerParameterClipper",
            "PercentileClipper",
            "ValueClipper",
            "ZScoreClipper",
            "make_clipper",
        )
    },
}

__all__ = [
    "AGCClipper",
    "AdaptiveGradientClipping",
    "CLIPPERS",
    "DivergenceError",
    "FabricGradGuard",
    "FaultDrill",
    "GradGuard",
    "GradientNormMonitor",
    "GuardCause",
    "GuardDecision",
    "GuardEvent",
    "KeySuggestingParser",
    "NaNGuard",
    "NormClipper",
    "PerParameterClipper",
    "PercentileClipper",
    "ValueClipper",
    "ZScoreClipper",
    "__version__",
    "default_callbacks",
    "make_clipper",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
