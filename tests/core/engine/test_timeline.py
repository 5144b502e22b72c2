"""The bounded timeline of written scalars and the log10 twins written with every value (issue 26)."""

from __future__ import annotations

import math
import random

import pytest

from lightning_gradguard.core.engine._scalars import INTERVAL_NAMES, log10, log10_twins, with_twins
from lightning_gradguard.core.engine._timeline import Timeline, merge_rule


def test_every_value_gets_its_twin_in_the_same_call():
    values = {
        "gradguard/grad_norm": 100.0,
        "gradguard/grad_norm_max": math.inf,
        "gradguard/grad_norm_mean": math.nan,
        "gradguard/loss_max": 0.0,
        "gradguard/clip_threshold_opt1": 0.01,
        "gradguard/lr": 0.1,
    }
    twins = log10_twins(values)
    assert set(twins) == {
        "gradguard/grad_norm_log10",
        "gradguard/grad_norm_max_log10",
        "gradguard/grad_norm_mean_log10",
        "gradguard/loss_max_log10",
        "gradguard/clip_threshold_log10_opt1",
    }
    assert twins["gradguard/grad_norm_log10"] == 2.0
    assert twins["gradguard/grad_norm_max_log10"] == math.inf  # the explosion shows on the log10 chart too
    assert math.isnan(twins["gradguard/grad_norm_mean_log10"])
    assert twins["gradguard/loss_max_log10"] == -math.inf
    assert twins["gradguard/clip_threshold_log10_opt1"] == pytest.approx(-2.0)
    assert set(with_twins(values)) == set(values) | set(twins)


@pytest.mark.parametrize("value", [1e-30, 0.5, 1.0, 3.0, 1e30, 3.4e38])
def test_log10_of_finite_positive_values_is_math_log10(value):
    assert log10(value) == pytest.approx(math.log10(value))
    assert math.isnan(log10(-1.0))


def test_memory_stays_bounded_and_no_spike_is_thinned_away():
    t = Timeline(capacity=64)
    rng = random.Random(0)
    spikes = {1234: 347.0, 77_777: math.inf, 99_001: math.nan}
    for step in range(100_000):
        norm = spikes.get(step, 1.0 + rng.random())
        t.update({"gradguard/grad_norm_max": norm, "gradguard/lr": 0.1 * 0.5 ** (step // 25_000)}, step)
    norms = t.series("gradguard/grad_norm_max")
    assert len(norms) <= 64
    assert len(t) <= 2 * 64
    values = [v for _, v in norms]
    assert any(v == 347.0 for v in values)  # an old spike survives every halving (the larger value wins)
    assert any(v == math.inf for v in values)
    assert any(math.isnan(v) for v in values)
    assert [s for s, _ in norms] == sorted(s for s, _ in norms)
    steps = [s for s, _ in norms]
    assert steps[-1] == 99_999
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert max(gaps) == min(gaps[:-1])  # one resolution over the whole run (each point: as many writes)
    assert 347.0 in [v for s, v in norms if s - gaps[0] < 1234 <= s]  # the spike sits in its own bucket
    lrs = t.series("gradguard/lr")
    assert lrs[-1] == (99_999, 0.1 * 0.5**3)  # a level keeps its latest value


def test_merge_rules_follow_what_a_tag_means():
    assert merge_rule("gradguard/grad_norm")(1.0, 5.0) == 5.0
    assert math.isnan(merge_rule("gradguard/loss_max")(math.nan, 5.0))  # non-finite first
    assert merge_rule("gradguard/clipped_steps")(2.0, 3.0) == 5.0
    assert merge_rule("gradguard/flagged_steps_opt1")(1.0, 0.0) == 1.0
    assert merge_rule("gradguard/clip_fraction")(1.0, 0.0) == 0.5
    assert merge_rule("gradguard/lr")(0.1, 0.05) == 0.05
    assert merge_rule("gradguard/skipped_steps")(1.0, 2.0) == 2.0  # a cumulative counter: the later value


def test_held_repeats_levels_never_intervals():
    t = Timeline()
    values = {f"gradguard/{name}": 1.0 for name in INTERVAL_NAMES}
    values |= {"gradguard/grad_norm": 2.0, "gradguard/lr": 0.1, "gradguard/rollbacks": 0.0}
    t.update(values, 0)
    t.update({"gradguard/rollbacks": 1.0}, 30)
    assert t.held(30) == {"gradguard/grad_norm": 2.0, "gradguard/lr": 0.1}
    assert t.held(30, fresh={"gradguard/lr": 0.05, "gradguard/clip_threshold": 9.0}) == {
        "gradguard/grad_norm": 2.0,
        "gradguard/lr": 0.05,  # a fresh value replaces the held one; an unwritten tag is not added
    }
    assert t.held(0) == {}
    assert t.last_step("gradguard/rollbacks") == 30
    assert t.last_step("gradguard/missing") is None


def test_twins_are_not_kept_and_a_second_write_at_one_step_merges():
    t = Timeline()
    t.update({"gradguard/grad_norm": 2.0, "gradguard/grad_norm_log10": 0.3}, 5)
    t.update({"gradguard/grad_norm": 7.0, "gradguard/clipped_steps": 2.0}, 5)
    t.update({"gradguard/clipped_steps": 1.0}, 5)
    assert t.tags() == ["gradguard/clipped_steps", "gradguard/grad_norm"]
    assert t.series("gradguard/grad_norm") == [(5, 7.0)]
    assert t.series("gradguard/clipped_steps") == [(5, 3.0)]


@pytest.mark.parametrize(("capacity", "error"), [(4, ValueError), (8.0, TypeError), (True, TypeError)])
def test_bad_capacity(capacity, error):
    with pytest.raises(error, match="capacity"):
        Timeline(capacity=capacity)


def test_a_value_an_event_changed_after_its_write_at_the_same_step_is_written_again() -> None:
    """A rollback on a logging step: the LR was written at step 90 before the cut; the cut LR goes in at 90 too
    (the chart and the overview showed the drop one logging interval late)."""
    t = Timeline()
    t.update({"gradguard/lr": 0.01, "gradguard/grad_norm_max": 3.0}, 90)
    assert t.held(90, fresh={"gradguard/lr": 0.005}, at_event=True) == {"gradguard/lr": 0.005}
    assert t.held(90, fresh={"gradguard/lr": 0.01}, at_event=True) == {}  # unchanged: nothing to write again
    assert t.held(90, fresh={"gradguard/lr": 0.005}) == {}  # not an event's step (the end of the fit): as before
