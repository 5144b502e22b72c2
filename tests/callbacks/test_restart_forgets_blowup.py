"""A restarted run is not restarted again for the failed attempt's blow-up when it only learns slowly (issue 24).

A helper's slow starter: RMSprop lr 1e-2 on a sine regression; the first updates blow the loss up (353 at step 3),
then the loss sits at the untrained level for ~300 steps before the run learns. The stability controller's
``never_learned`` rule ("a blow-up in the first updates, then no window clearly below the untrained model's") restarted
it from the untrained state with the LR cut, and then again every ~180 steps, five times down to the LR floor, each
event citing the *first* attempt's blow-up (the same numbers): the restarted runs had none. The run ended untrained
(validation MSE 4.51 against 0.65 unguarded). ``never_learned`` now cites only the current attempt's blow-up (after
the last acting finding): one restart, then the run learns. (A restarted run whose units are killed again is
``killed_at_start``'s, which may still cite the first attempt's blow-up: the rescue grid's deep CNN.)"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl

from lightning_gradguard import NaNGuard
from tests.models import make_trainer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from state_faults import SlowStarter  # noqa: E402


def test_a_restarted_run_is_not_restarted_again_for_the_failed_attempts_blow_up(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    model, guard = SlowStarter(0), NaNGuard()
    untrained = model.metric()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [guard], max_steps=1500, logger=False).fit(model)
    restarts = [e for e in guard.events if e["kind"] == "rollback"]
    assert len(restarts) <= 1, guard.events  # before: every ~180 steps, each citing the first attempt's blow-up
    assert guard.lr_scale >= 0.25, guard.events  # before: the floor, 1e-3
    assert model.metric() < 0.5 * untrained, guard.events  # it learned (before: 4.51, the untrained level)
