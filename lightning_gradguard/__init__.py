"""lightning-gradguard: Lightning callbacks that keep long training runs alive.

- :class:`GradientNormMonitor` shows gradient health in TensorBoard.
- :class:`AdaptiveGradientClipping` clips with thresholds learned from running statistics.
- :class:`NaNGuard` skips, rolls back or halts on NaN/inf.
"""

from lightning_gradguard.__about__ import __version__
from lightning_gradguard.callbacks import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard
from lightning_gradguard.errors import DivergenceError

__all__ = ["AdaptiveGradientClipping", "DivergenceError", "GradientNormMonitor", "NaNGuard", "__version__"]
