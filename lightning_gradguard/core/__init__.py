"""Pure-PyTorch core of gradguard: statistics, thresholds, clipping, snapshots, LR scaling.

Nothing in this package imports lightning (``tests/core/test_imports.py`` checks it).
"""

from lightning_gradguard.core.grad_stats import GradStats, compute_grad_stats, layer_name_of, norms_of
from lightning_gradguard.core.step_cache import StepStatsCache

__all__ = ["GradStats", "StepStatsCache", "compute_grad_stats", "layer_name_of", "norms_of"]
