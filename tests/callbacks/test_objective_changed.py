"""A loss weight raised at once is an objective that changed, not a model that blew up (issue 24).

The zoo's ``loss_weight_step``: a digits MLP under Adam whose whole loss is weighted 1e-4 for 300 steps, then 1. The
loss and every gradient jump 1e4x; Adam's update barely changes (it divides by the gradient's own scale), and the run
goes on learning. The far values climbed and swung, so the divergence rules rolled the run back three times and
halted it (``DivergenceError`` at step 311, every seed, under ``NaNGuard()`` and ``default_callbacks()``). Now a
divergence is tested once more before it is acted on: the trusted state's weights rerun the last ordinary batch at
this step. That state is as far from the run's level as the current one (the objective changed, for every state),
and the current state is not clearly worse than it on that batch: the far values become the run's level and a
warning says so. A real blow-up still acts: the trusted state is at the run's level on an ordinary batch, or the
blown-up model clearly worse than it there."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_gradguard import NaNGuard, default_callbacks
from tests.models import make_trainer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from zoo_shapes import LossWeightStep  # noqa: E402

ACTIONS = ("skip", "rollback", "halt", "lower_lr", "restart")
STEPS = 420


def _fit(tmp_path: Path, callbacks: list[pl.Callback]) -> LossWeightStep:
    pl.seed_everything(0, verbose=False)
    model = LossWeightStep(0, STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks, max_steps=STEPS, logger=False).fit(model)
    return model


@pytest.mark.parametrize("config", ["nanguard", "defaults"])
def test_a_loss_weight_raised_at_once_is_a_new_level_not_a_divergence(tmp_path: Path, config: str) -> None:
    reference = _fit(tmp_path / "none", []).metric()
    callbacks = [NaNGuard()] if config == "nanguard" else default_callbacks()
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    model = _fit(tmp_path / config, callbacks)
    assert not [e for e in guard.events if e["kind"] in ACTIONS], guard.events  # before: 3 rollbacks, a halt
    assert guard.lr_scale == 1.0
    assert model.metric() >= 0.98 * reference
    said = [e for e in guard.events if e.get("rule") == "objective_changed"]
    assert said, guard.events  # never silent: the adoption is a warning with its numbers
    assert said[0]["step"] >= 300
    assert "the objective changed, not the model" in said[0]["reason"]
    assert "trusted state of step" in said[0]["reason"]
