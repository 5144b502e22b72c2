"""A pinned clipper holds its warm-up cap for good (issue 24: explosion at initialisation beyond the CNN).

When a network dies after the clipping statistics released the warm-up cap (they learned the norms of an exploding
start), the guard restarts it and pins the clippers: :meth:`Clipper.pin` keeps the warm-up's threshold
``min(fallback_factor * median, cap)`` of the sliding window for the rest of the run, what a fixed clip at
``fallback_max_norm`` does while the norms are far above it. These tests feed norm streams one step at a time (as
the callback does) on both z-score paths and on the percentile clipper, and check the threshold against the cap and
the window median computed here; the state round-trips; fixed methods and an uncapped clipper have nothing to pin.
"""

from __future__ import annotations

import numpy as np
import pytest

from lightning_gradguard.core.clip import PercentileClipper, ZScoreClipper, make_clipper
from tests.core.clip.test_settled_warmup import feed, noisy, path  # noqa: F401 - path: the fixture of both paths


@pytest.mark.parametrize("cls", [ZScoreClipper, PercentileClipper])
def test_a_pinned_clipper_keeps_the_cap_while_the_norms_stay_far_above_it(path, cls):  # noqa: F811
    clipper = cls()
    assert clipper.pin()
    assert not clipper.pin()  # already pinned: nothing changes
    norms = 1000.0 * noisy(300, seed=3)  # an exploding start whose norms never come down: a steady 1000
    thr, post, warm = feed(clipper, norms)
    assert warm.all()  # the statistics never take over
    assert np.allclose(thr, 1.0)  # the cap (fallback_max_norm=1.0), every step
    assert (post <= 1.0 + 1e-9).all()
    free = cls()  # the same stream unpinned: the statistics learn ~1000 after the warm-up and clip nothing
    thr_free, _, warm_free = feed(free, norms)
    assert not warm_free[20:].any()
    assert np.median(thr_free[50:]) > 500


def test_a_pinned_clipper_below_the_cap_follows_its_window(path):  # noqa: F811
    clipper = ZScoreClipper(warmup_steps=10, fallback_factor=10.0)
    clipper.pin()
    norms = 0.01 * noisy(60, seed=4)  # far below the cap: the window's fallback binds, not the cap
    thr, _, _ = feed(clipper, norms)
    window = sorted(norms[-11:-1])  # the ten norms before the last step
    assert thr[-1] == pytest.approx(10.0 * window[(len(window) - 1) // 2], rel=1e-9)  # 10x the lower median


def test_pinning_a_started_clipper_drops_its_statistics_and_the_state_round_trips(path):  # noqa: F811
    clipper = ZScoreClipper()
    feed(clipper, noisy(40, seed=6))
    assert not clipper.warming_up
    assert clipper.pin()
    assert clipper.warming_up
    state = clipper.state_dict()
    assert state["pinned"] is True
    again = ZScoreClipper()
    again.load_state_dict(state)
    assert again.pinned
    assert again.warming_up
    older = dict(state)
    del older["pinned"]  # a checkpoint of an older version
    legacy = ZScoreClipper()
    legacy.load_state_dict(older)
    assert not legacy.pinned


def test_nothing_to_pin_without_a_learned_threshold_or_a_cap():
    assert not ZScoreClipper(fallback_max_norm=None).pin()  # no cap to hold
    assert not make_clipper("norm", max_norm=1.0).pin()  # a fixed clip is pinned by nature
    probation = ZScoreClipper()
    assert not probation.in_probation  # warming up: not yet on probation


def test_the_probation_is_the_first_max_warmup_factor_windows_after_the_start(path):  # noqa: F811
    clipper = ZScoreClipper(warmup_steps=10)
    feed(clipper, noisy(12, seed=7))
    assert not clipper.warming_up
    assert clipper.in_probation  # the statistics took over two steps ago
    feed(clipper, noisy(100, seed=8))
    assert not clipper.in_probation  # 10 x warmup_steps later: settled for good
    assert not ZScoreClipper(fallback_max_norm=None).in_probation  # (no cap: nothing a divergence could pin)


@pytest.mark.parametrize("cls", [ZScoreClipper, PercentileClipper])
def test_a_start_the_probation_undid_still_counts_as_recent_until_the_probation_ends(path, cls):  # noqa: F811
    """The statistics take over from a steady window of exploding norms (1000), which they then let through; the
    network dies and its norms fall 1000x: the probation undoes the start and the cap is back in force. A divergence
    judged now is still the released statistics' doing (:attr:`in_probation` True, so the guard holds the cap rather
    than cut the LR) until the probation period (``MAX_WARMUP_FACTOR`` x ``warmup_steps`` steps) is over."""
    clipper = cls(warmup_steps=10)
    _, _, warm = feed(clipper, 1000.0 * noisy(12, seed=9))
    assert not warm[-1]
    assert clipper.in_probation  # took over from the cap two steps ago
    undone = []
    for v in noisy(12, seed=10):  # the fall: the start is undone, the warm-up (and its cap) back for a while
        _, _, warm = feed(clipper, [v])
        assert clipper.in_probation  # before: False while warming up again (a warm-up was never "recent")
        if warm[-1] and not undone:
            undone.append(True)
            again = cls(warmup_steps=10)
            again.load_state_dict(clipper.state_dict())  # the state round-trips
            assert again.in_probation
    assert undone
    feed(clipper, noisy(100, seed=11))
    assert not clipper.in_probation  # the probation period is over
    pinned = cls(warmup_steps=10)
    feed(pinned, 1000.0 * noisy(12, seed=9))
    feed(pinned, noisy(7, seed=10))
    assert pinned.warming_up
    assert pinned.in_probation
    assert pinned.pin()
    assert not pinned.in_probation  # pinned: nothing left to hold
