"""The stability controller's named rules (core/guard/_stability.py) on hand-built window pairs, and its findings."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lightning_gradguard.core.guard import GuardEvent, StabilityFinding
from lightning_gradguard.core.guard._stability import StabilityController, WindowPair

#: a healthy pair: the loss fell from one window to the next, well below the untrained model's
HEALTHY = WindowPair(
    old_loss=1.0,
    new_loss=0.8,
    old_norm=1.0,
    new_norm=1.2,
    clipped_share=0.3,
    start_loss=2.3,
    start_norm=5.0,
    peak=2.5,
    best=1.0,
    steps=200,
    window=25,
)


def _pair(**changes: float) -> WindowPair:
    return dataclasses.replace(HEALTHY, **changes)


# (pair, rule, target, base lr_power); the controller's default thresholds
CASES = {
    "norm_rising": (_pair(old_norm=1.0, new_norm=20.0, old_loss=1.0, new_loss=1.0), "in_place", 1),
    "loss_climbing": (_pair(old_loss=1.5, new_loss=3.5, best=1.0, start_loss=4.0, peak=4.0), "before_climb", 1),
    "loss_above_best": (_pair(old_loss=1.5, new_loss=2.5, best=1.0, start_loss=4.0, peak=4.0), "before_climb", 1),
    "worse_than_untrained": (_pair(start_loss=2.0, old_loss=5.0, new_loss=5.0, best=math.inf), "start", 2),
    "killed_at_start": (
        _pair(start_loss=2.58, start_norm=7.6, old_loss=2.30, new_loss=2.31, new_norm=0.1, peak=9.3, best=math.inf),
        "start",
        2,
    ),
    "sustained_clipping": (
        _pair(start_loss=2.0, start_norm=1.0, old_loss=2.15, new_loss=2.3, clipped_share=0.9, best=math.inf),
        "in_place",
        1,
    ),
}


def test_the_rules_are_named_methods_in_evaluation_order():
    assert tuple(CASES) == StabilityController.RULES
    ctl = StabilityController()
    for name in StabilityController.RULES:
        assert callable(getattr(ctl, name))


def test_every_rule_stays_quiet_on_a_healthy_improving_pair():
    ctl = StabilityController()
    assert HEALTHY.new_loss < HEALTHY.old_loss
    for name in StabilityController.RULES:
        assert getattr(ctl, name)(HEALTHY) is None, name
    assert ctl.assess(HEALTHY) is None


@pytest.mark.parametrize("rule", list(CASES))
def test_each_rule_fires_on_its_pair_with_its_name_target_and_exponent(rule):
    pair, target, power = CASES[rule]
    ctl = StabilityController()
    finding = getattr(ctl, rule)(pair)
    assert finding is not None
    assert (finding.rule, finding.target, finding.lr_power) == (rule, target, power)
    assert finding.reason.startswith("learning rate looks too high: ")
    assert finding.evidence
    assert all(isinstance(v, (int, float)) for v in finding.evidence.values())
    assert finding.worse_than_start == (target == "start")
    assert finding.damaged == (target == "before_climb")
    # the pair was built so that no earlier rule fires: assess() finds the same one
    assert ctl.assess(pair) == finding
    assert ctl.interventions == 0  # the rules and assess() change no state


def test_the_first_rule_in_order_wins():
    # a rising norm on a model worse than untrained: the norm rule is evaluated first
    pair = _pair(start_loss=2.0, old_loss=5.0, new_loss=5.0, old_norm=1.0, new_norm=50.0, best=math.inf)
    ctl = StabilityController()
    assert ctl.worse_than_untrained(pair) is not None
    assert ctl.assess(pair).rule == "norm_rising"


def test_reasons_are_the_plain_words_of_before():
    ctl = StabilityController()
    assert ctl.norm_rising(CASES["norm_rising"][0]).reason == (
        "learning rate looks too high: the gradient norm keeps rising (median 1 -> 20 over 25 steps) while the loss "
        "does not improve"
    )
    assert ctl.loss_above_best(CASES["loss_above_best"][0]).reason == (
        "learning rate looks too high: the loss climbed from its best (window median 1 -> 2.5)"
    )
    assert ctl.worse_than_untrained(CASES["worse_than_untrained"][0]).reason == (
        "learning rate looks too high: after 200 steps the loss is still above the untrained model's (2; medians of "
        "the last two windows 5, 5; the clipper cut 30%)"
    )
    assert ctl.sustained_clipping(CASES["sustained_clipping"][0]).reason == (
        "learning rate looks too high: the clipper cut 90% of the last 25 steps and the loss stopped falling "
        "(median 2.15 -> 2.3)"
    )


def test_thresholds_move_the_rules():
    pair = CASES["norm_rising"][0]
    assert StabilityController(norm_growth=30.0).norm_rising(pair) is None
    climbing = CASES["loss_climbing"][0]
    assert StabilityController(floor=1.0).loss_climbing(climbing) is None  # 3.5 is below 1.0 x the first loss 4.0
    assert StabilityController(rising=2.0).loss_climbing(climbing) is None  # the older window was 1.5x its best
    killed = CASES["killed_at_start"][0]
    assert StabilityController(blowup=4.0).killed_at_start(killed) is None  # no blow-up above 4x the first loss


def test_update_escalates_the_exponent_of_cuts_in_quick_succession():
    ctl = StabilityController(window=10)
    stream = [2.0] + [5.0] * 100  # worse than untrained from the first step
    found = [f for f in (ctl.update(loss, 1.0, clipped=False) for loss in stream) if f]
    assert [f.rule for f in found] == ["worse_than_untrained"] * 5  # every two windows (20 steps)
    assert [f.lr_power for f in found] == [2, 2, 4, 8, 16]  # squared first cut, then 2 ** streak
    assert ctl.interventions == 5
    assert ctl.last_finding == found[-1]


def test_state_dict_keeps_the_old_keys_and_loads_a_checkpoint_written_before_findings():
    ctl = StabilityController(window=10)
    for loss in [2.0] + [5.0] * 25:
        ctl.update(loss, 1.0, clipped=False)
    state = ctl.state_dict()
    assert {"lr_power", "worse_than_start", "damaged"} <= set(state)
    assert (state["lr_power"], state["worse_than_start"], state["damaged"]) == (2, True, False)
    assert state["last_finding"]["rule"] == "worse_than_untrained"
    copy = StabilityController(window=10)
    copy.load_state_dict(state)
    assert copy.state_dict() == state
    assert copy.last_finding == ctl.last_finding
    # an old checkpoint: no last_finding; the rest of the state continues exactly
    old = {k: v for k, v in state.items() if k != "last_finding"}
    legacy = StabilityController(window=10)
    legacy.load_state_dict(old)
    assert legacy.last_finding is None
    assert {
        k: v for k, v in legacy.state_dict().items() if k not in ("last_finding", "lr_power", "worse_than_start")
    } == {k: v for k, v in old.items() if k not in ("lr_power", "worse_than_start")}
    nxt = [(ctl.update(5.0, 1.0, False), legacy.update(5.0, 1.0, False)) for _ in range(30)]
    assert [a for a, _ in nxt] == [b for _, b in nxt]
    assert any(a is not None for a, _ in nxt)


def test_finding_round_trips_as_plain_data_and_names_its_rule_in_the_event():
    finding = StabilityController().norm_rising(CASES["norm_rising"][0])
    assert StabilityFinding.from_dict(finding.to_dict()) == finding
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.lr_power = 4  # type: ignore[misc]
    event = GuardEvent(7, "lower_lr", "lr_too_high", 0.5, reason=finding.reason, rule=finding.rule)
    assert event.to_dict()["rule"] == "norm_rising"
    assert "rule" not in GuardEvent(7, "skip", "nonfinite_loss", 1.0).to_dict()  # other events are unchanged
