"""Pure-PyTorch core of gradguard, laid out by concern, one layer above the other.

- :mod:`~lightning_gradguard.core.measure`: one step's gradient statistics (norms, non-finite flags, sharded norms,
  interval aggregates, per-layer health).
- :mod:`~lightning_gradguard.core.clip`: clippers and their thresholds (fixed, z-score, percentile, AGC).
- :mod:`~lightning_gradguard.core.guard`: what a step's health is and what to do about it (judge, policy,
  divergence and stability rules).
- :mod:`~lightning_gradguard.core.recover`: snapshots, rollbacks, LR cuts, fault tracing, halt reports.
- :mod:`~lightning_gradguard.core.engine`: the one guard engine that runs snapshot -> judge -> decide -> act ->
  record for every adapter (Lightning, plain loops, Fabric) through a small host interface.

A layer imports only the layers listed before it (``measure < clip < guard < recover < engine``); ``_arg_checks``
is shared by all. Nothing here imports lightning (``tests/core/test_imports.py`` checks both rules, and that no
module imports another in a circle). Modules whose names start with ``_`` are plumbing; each sub-package's
``__init__`` exports what a user may import.
"""

from lightning_gradguard.core.measure import GradStats, StepStatsCache, compute_grad_stats, layer_name_of, norms_of

__all__ = ["GradStats", "StepStatsCache", "compute_grad_stats", "layer_name_of", "norms_of"]
