"""``Clipper.rebase``: the z-score statistics restart from the norms of a new level that the guard adopted (issue 24).

A class-incremental curriculum (a separable first task: norms fall to ~1e-3; then the whole task: ~7) left the
z-score statistics at the old level; their threshold may rise 1 % a step, so the new task was clipped on every step
for hundreds of steps (300 of 300 in ``tests/callbacks/test_new_gradient_level.py``). When the divergence detector
adopts far norms as the run's new level (they held while the loss did not rise), the guard hands them to the clipper,
which restarts from their median and MAD as its warm-up would have."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_gradguard.core.clip import PercentileClipper, ZScoreClipper
from tests.core.clip.test_zero_norms import feed, healthy, path  # noqa: F401  (path: a fixture)


def test_rebase_restarts_the_statistics_from_the_new_level(path):  # noqa: F811
    clipper = ZScoreClipper()
    feed(clipper, healthy(200, scale=1e-3))
    new = [7.0, 7.4, 6.8]
    before, _, _ = feed(clipper, [7.1])
    assert before[0] < 0.01  # the old level's threshold: the new task is clipped 700x
    assert clipper.rebase(new)
    assert float(clipper.mean) == pytest.approx(7.0)  # the median of the new level
    thresholds, factors, _ = feed(clipper, healthy(50, scale=7.0, seed=1))
    assert thresholds[0] > 7.0  # released at once, not 1 % a step
    assert (factors < 1.0).mean() < 0.25  # ordinary norms of the new level are rarely clipped (before: every one,
    assert factors.mean() > 0.95  # by ~700x at first)
    assert np.all(np.isfinite(thresholds))
    spike, _, _ = feed(clipper, [1e4])
    assert spike[0] < 100.0  # a blow-up from the new level is still clipped


def test_rebase_leaves_the_warm_up_pinned_clippers_and_empty_norms_alone(path):  # noqa: F811
    warming = ZScoreClipper()
    feed(warming, healthy(3))
    assert not warming.rebase([7.0, 7.0, 7.0])  # the warm-up window slides by itself
    pinned = ZScoreClipper()
    feed(pinned, healthy(100))
    assert pinned.pin()
    assert not pinned.rebase([7.0, 7.0, 7.0])  # held at its cap for good
    started = ZScoreClipper()
    feed(started, healthy(100))
    state = started.state_dict()
    assert not started.rebase([0.0, math.nan, math.inf])  # nothing to go by: nothing changes
    assert started.state_dict() == state
    percentile = PercentileClipper()
    feed(percentile, healthy(100))
    assert not percentile.rebase([7.0, 7.0, 7.0])  # its window of unclipped norms follows by itself


def test_host_and_tensor_paths_rebase_alike(monkeypatch):
    runs = []
    for host in (True, False):
        monkeypatch.setattr(ZScoreClipper, "host_fast_path", host)
        clipper = ZScoreClipper()
        feed(clipper, healthy(100, scale=1e-3))
        assert clipper.rebase([7.0, 7.4, 6.8])
        runs.append(feed(clipper, healthy(30, scale=7.0, seed=2))[0])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-9)
