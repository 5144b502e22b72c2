"""Measurement: one optimizer step's gradient statistics, measured once and read by every consumer.

Holds the foreach measurement with float64 combination (``_grad_stats``), DTensor local shards plus one collective
(``_sharded``), the per-(step, optimizer) cache (``_step_cache``), the single host read (``_host_read``), on-device
interval aggregates (``_interval_stats``) and the vanishing/exploding layer detectors (``_layer_health``).

May import: torch and :mod:`lightning_gradguard.core._arg_checks` only.
"""

from lightning_gradguard.core.measure._grad_stats import GradStats, compute_grad_stats, layer_name_of, norms_of
from lightning_gradguard.core.measure._step_cache import StepStatsCache

__all__ = ["GradStats", "StepStatsCache", "compute_grad_stats", "layer_name_of", "norms_of"]
