"""A policy gradient's first successes are no gradient divergence (issue 24).

The zoo's ``sparse_reward_chain``: REINFORCE on a 10-state chain whose only reward (100) waits at the far end. Until
the first success the gradient is the entropy bonus's (norms ~0.01); the first successes bring norms of 19, 39, 60,
three in a row and climbing, while the loss falls from ~-0.03 to -23. The gradient rule read that as a blow-up and
rolled seed 0 back at step 10 with the LR halved (``NaNGuard()``; twice under the defaults). A far run of norms is
now a divergence only where the loss confirms it (it rose above its recent level, or left the start by a jump)."""

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

from zoo_shapes import SparseRewardChain  # noqa: E402

ACTIONS = ("skip", "rollback", "halt", "lower_lr", "restart")


@pytest.mark.parametrize("config", ["nanguard", "defaults"])
def test_first_successes_of_reinforce_are_not_rolled_back(tmp_path: Path, config: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = SparseRewardChain(0, 200)
    callbacks = [NaNGuard()] if config == "nanguard" else default_callbacks()
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks, max_steps=200, logger=False).fit(model)
    assert not [e for e in guard.events if e["kind"] in ACTIONS], guard.events
    assert guard.lr_scale == 1.0
