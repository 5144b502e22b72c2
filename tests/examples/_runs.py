"""A short real run with the three gradguard callbacks (shared by the report and CLI tests)."""

from __future__ import annotations

from pathlib import Path

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard
from tests.models import TinyRegression, make_trainer


def guarded_run(root: Path, max_steps: int = 40) -> Path:
    """TinyRegression with a NaN batch at step 20 and 100x loss spikes at 25 and 30; returns the log root."""
    model = TinyRegression(nan_at_steps=[20], loss_scale_at={25: 100.0, 30: 100.0})
    callbacks = [
        GradientNormMonitor(),
        AdaptiveGradientClipping("zscore", warmup_steps=5),
        NaNGuard(action="rollback", snapshot_every_n_steps=5, snapshot_confirm_steps=2),
    ]
    trainer = make_trainer(root, callbacks, max_steps=max_steps, log_every_n_steps=1)
    trainer.fit(model)
    return root
