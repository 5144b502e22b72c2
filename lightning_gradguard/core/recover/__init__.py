"""Recovery: snapshots of model, optimizer and scheduler state, rollbacks, scheduler-safe LR cuts, halt reports.

Holds the snapshot store and its trust rule (``_snapshot``), the rollback / restart / stability-cut rules
(``_rules``), LR scaling that survives schedulers (``_lr_scaling``), the halt report (``_report``) and the replay
that names the first module with a non-finite output (``_fault_trace``).

May import: :mod:`~lightning_gradguard.core.measure`, :mod:`~lightning_gradguard.core.guard` and ``_arg_checks``.
"""

from lightning_gradguard.core.recover._snapshot import Snapshot, SnapshotStore

__all__ = ["Snapshot", "SnapshotStore"]
