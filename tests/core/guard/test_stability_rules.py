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


# (pair, target, base lr_power, acts); the controller's default thresholds. The climbing pairs grew the LR 4x since
# their best window (a ramp: they act); the worse-than-untrained pair saw a sustained blow-up in its first steps.
CASES = {
    "dead_after_learning": (
        _pair(
            best=0.2,
            best_spread=0.05,
            old_loss=2.302,
            new_loss=2.303,
            old_spread=0.002,
            new_spread=0.002,
            start_loss=2.35,
            early_norm=0.34,
            new_norm=0.11,
            vanished=5 / 6,  # every gradient but the output bias's is exactly zero
            peak=2.4,
            peak_step=310,  # long after the start windows: no blow-up at the start killed it
        ),
        "before_climb",
        0,  # the LR kept: nothing says it killed the network
        True,
    ),
    "norm_rising": (_pair(old_norm=1.0, new_norm=20.0, old_loss=1.0, new_loss=1.0), "in_place", 1, False),
    "loss_climbing": (
        _pair(old_loss=1.5, new_loss=3.5, best=1.0, start_loss=4.0, peak=4.0, best_lr=0.1, new_lr=0.4),
        "before_climb",
        1,
        True,
    ),
    "loss_above_best": (
        _pair(old_loss=1.5, new_loss=2.5, best=1.0, start_loss=4.0, peak=4.0, best_lr=0.1, new_lr=0.4),
        "before_climb",
        1,
        True,
    ),
    "worse_than_untrained": (
        _pair(start_loss=2.0, old_loss=5.0, new_loss=5.0, best=math.inf, sustained_peak=80.0),
        "start",
        2,
        True,
    ),
    "killed_at_start": (
        _pair(
            start_loss=2.58,
            start_norm=7.6,
            old_loss=2.30,
            new_loss=2.31,
            new_norm=0.1,
            peak=9.3,
            peak_step=2,
            best=math.inf,
        ),
        "start",
        2,
        True,
    ),
    # the adding-problem LSTM at a 10x too-high Adam LR (rescue grid, seed 1): at chance for 180 steps
    "never_learned": (
        _pair(
            start_loss=0.1859,
            old_loss=0.19,
            new_loss=0.1803,
            best=0.1642,
            peak=27.95,
            peak_step=2,
            steps=180,
            since_action=180,
        ),
        "start",
        2,
        True,
    ),
    "dead_network": (  # the deep plain CNN whose initialisation explodes, unguarded: dead at chance by step ~20
        _pair(
            start_loss=17.7,
            old_loss=2.3021,
            new_loss=2.3026,
            old_spread=0.003,
            new_spread=0.002,
            early_norm=237.0,
            new_norm=0.07,
            best=math.inf,
            vanished=41 / 42,  # every gradient but the output bias's is exactly zero
            peak=17.7,  # its first loss: the blow-up that killed it
            peak_step=1,
        ),
        "start",  # proven dead (vanished gradients) and killed by a blow-up: restart from the untrained state
        2,
        True,
    ),
    "sustained_clipping": (
        _pair(start_loss=2.0, start_norm=1.0, old_loss=2.15, new_loss=2.3, clipped_share=0.9, best=math.inf),
        "in_place",
        1,
        False,
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
    pair, target, power, acts = CASES[rule]
    ctl = StabilityController()
    finding = getattr(ctl, rule)(pair)
    assert finding is not None
    assert (finding.rule, finding.target, finding.lr_power, finding.act) == (rule, target, power, acts)
    # the LR is blamed only where the evidence points at it (an acting finding); other warnings say "unstable"
    prefix = {
        "dead_network": "the network looks dead: ",
        "dead_after_learning": "the network died after learning: ",
    }.get(rule, "learning rate looks too high: " if acts else "the run looks unstable: ")
    assert finding.reason.startswith(prefix)
    assert finding.evidence
    assert all(isinstance(v, (int, float)) for v in finding.evidence.values())
    assert finding.worse_than_start == (target == "start")
    assert finding.damaged == (target == "before_climb")
    # the pair was built so that no earlier rule fires: assess() finds the same one
    assert ctl.assess(pair) == finding
    assert ctl.interventions == 0  # the rules and assess() change no state


NEVER = CASES["never_learned"][0]
DIED = CASES["dead_after_learning"][0]


@pytest.mark.parametrize(
    ("why", "changes"),
    [
        ("the gradients did not vanish (pruned, or a harder task)", {"vanished": 0.1}),
        ("not measured", {"vanished": math.nan}),
        ("the loss still moves", {"old_loss": 2.6, "new_loss": 2.3, "old_spread": 0.2, "new_spread": 0.2}),
        ("never above its best by more than the noise", {"best": 2.25, "best_spread": 0.05}),
        ("no best window yet", {"best": math.inf}),
        ("killed by a blow-up in the start windows: the restart rules' case", {"peak": 40.0, "peak_step": 3}),
        ("the norm is not below its early level", {"new_norm": 0.5}),
    ],
)
def test_dead_after_learning_needs_every_sign(why, changes):
    assert StabilityController().dead_after_learning(dataclasses.replace(DIED, **changes)) is None, why


@pytest.mark.parametrize(
    ("why", "changes"),
    [
        ("it learned: a window median 15% below the untrained loss", {"best": 0.15}),
        ("it learns now", {"new_loss": 0.15}),
        ("no blow-up: fine-tuning, a GAN", {"peak": 0.5}),
        ("the peak came after the first updates", {"peak_step": 30}),
        ("the peak is not 10x today's level", {"peak": 1.5}),
        ("too early: seven windows are needed", {"since_action": 170}),
        ("no untrained loss known", {"start_loss": 0.0}),
    ],
)
def test_never_learned_needs_every_sign(why, changes):
    assert StabilityController().never_learned(dataclasses.replace(NEVER, **changes)) is None, why


def test_never_learned_on_a_stream_restarts_once_the_start_period_passed():
    """A blow-up at step 2, then losses around the untrained level: the finding comes after seven windows (with
    ``confirm`` judgements in a row), targets the untrained state, and states the numbers."""
    import random

    rng = random.Random(0)
    ctl = StabilityController()
    found = []
    for step in range(1, 301):
        loss = 28.0 if step == 2 else 0.18 * (1 + 0.3 * (rng.random() - 0.5))
        f = ctl.update(loss, 1.0, clipped=False, lr=0.3)
        if f is not None:
            found.append((step, f))
    assert [f.rule for _, f in found] == ["never_learned"]
    step, f = found[0]
    assert 175 <= step <= 190
    assert (f.target, f.act, f.lr_power) == ("start", True, 2)
    assert "a blow-up at step 2" in f.reason
    assert "not learned" in f.reason
    assert f.evidence["peak"] == 28.0


def test_a_withdrawn_finding_is_a_warning_and_a_corrected_start_silences_it():
    """The guard refutes a "no better than untrained" finding on the batches themselves: ``withdraw`` counts it as a
    warning (the spacing of later cuts is what it was), and ``correct_start`` averages the measured untrained losses
    into the start level, so the same stream no longer reads as "never learned"."""
    import random

    def stream(ctl, steps, first):
        rng = random.Random(0)
        found = []
        for step in range(1, steps + 1):
            loss = first if step == 1 else (28.0 if step == 2 else 0.18 * (1 + 0.3 * (rng.random() - 0.5)))
            f = ctl.update(loss, 1.0, clipped=False, lr=0.3)
            if f is not None:
                found.append((step, f))
        return found

    ctl = StabilityController()
    [(step, f)] = stream(ctl, 190, first=0.18)
    assert f.rule == "never_learned"
    assert ctl.interventions == 1
    ctl.withdraw()
    assert (ctl.interventions, ctl.warnings) == (0, 1)
    assert ctl.state_dict()["start"] == pytest.approx(0.18)
    ctl.correct_start([2.0, 2.2])  # the untrained model, rerun on two later batches: ~2, not 0.18
    assert ctl.state_dict()["start"] == pytest.approx((0.18 + 2.0 + 2.2) / 3)
    for _ in range(300):  # the run sits at 0.18, far below the corrected untrained level: nothing fires
        assert ctl.update(0.18, 1.0, clipped=False, lr=0.3) is None
    ctl.correct_start([math.nan, math.inf])  # nothing finite measured: unchanged
    assert ctl.state_dict()["start"] == pytest.approx((0.18 + 2.0 + 2.2) / 3)


def _climb_stream(ctl, lrs, start=0, until_act=False):
    """A run that learns to ~0.5 at LR 0.001, then climbs steadily while the LR is what ``lrs`` gives each step."""
    found = []
    for i in range(start, start + len(lrs)):
        loss = 3.0 * 0.97**i + 0.5 + 0.02 * math.sin(2.3 * i) if i < 100 else 0.5 + 0.04 * (i - 100)
        f = ctl.update(loss, 1.0, clipped=False, lr=lrs[i - start])
        if f is not None:
            found.append((i, f))
            if until_act and f.act:
                break
    return found


def test_a_refuted_climb_stays_refuted_until_the_lr_grows_again_or_a_new_best():
    """Found on a time-ordered stream whose label noise grows while Adam warms up: the guard refuted the climb on the
    batches (the state from before it did no better), then retested the same claim at every later window against
    ever newer states from inside the climb, until one noisy pair of batches favoured one: a rollback on a healthy
    run. A refuted claim now only warns while nothing new happened, and says so."""
    lrs = [0.001] * 100 + [0.003] * 200  # a warm-up to 3x the best window's LR, then constant
    ctl = StabilityController()
    found = _climb_stream(ctl, lrs, until_act=True)
    assert found, "no finding"
    assert found[-1][1].act, [f.reason for _, f in found]  # the climb at the higher LR acts (then tested)
    first = found[-1][0]
    ctl.withdraw()  # the guard tested it on the batches and refuted it
    later = _climb_stream(ctl, [0.003] * 200, start=first + 1)
    assert later, "no warning"
    assert not any(f.act for _, f in later), [f.reason for _, f in later]
    assert "tested on the batches" in later[0][1].reason
    assert "warning only" in later[0][1].reason
    copy = StabilityController()
    copy.load_state_dict(ctl.state_dict())  # the refutation rides in the checkpoint
    assert copy._refuted == ctl._refuted
    # an LR above the refuted climb's is a new claim: it acts again
    higher = _climb_stream(copy, [0.01] * 100, start=first + 201)
    assert any(f.act for _, f in higher), [f.reason for _, f in higher]
    # without the refutation the same climb acts again (the memory is what silences it)
    fresh = StabilityController()
    again = _climb_stream(fresh, lrs)
    assert sum(f.act for _, f in again) >= 1


def test_the_first_rule_in_order_wins():
    # a rising norm on a model worse than untrained: the norm rule is evaluated first
    pair = _pair(start_loss=2.0, old_loss=5.0, new_loss=5.0, old_norm=1.0, new_norm=50.0, best=math.inf)
    ctl = StabilityController()
    assert ctl.worse_than_untrained(pair) is not None
    assert ctl.assess(pair).rule == "norm_rising"


def test_reasons_state_the_rule_its_numbers_and_whether_it_acts():
    ctl = StabilityController()
    assert ctl.norm_rising(CASES["norm_rising"][0]).reason == (
        "the run looks unstable: the gradient norm keeps rising (median 1 -> 20 over 25 steps) while the loss "
        "does not improve (warning only)"
    )
    assert ctl.loss_above_best(CASES["loss_above_best"][0]).reason == (
        "learning rate looks too high: the loss climbed from its best (window median 1 -> 1.5 -> 2.5); the learning "
        "rate grew 4x since the best window (0.1 -> 0.4)"
    )
    assert ctl.worse_than_untrained(CASES["worse_than_untrained"][0]).reason == (
        "learning rate looks too high: after 200 steps the loss is still above the untrained model's (2; medians of "
        "the last two windows 5, 5) after a blow-up (three losses in a row around 80, 16x the untrained loss)"
    )
    assert ctl.sustained_clipping(CASES["sustained_clipping"][0]).reason == (
        "the run looks unstable: the clipper cut 90% of the last 25 steps and the loss stopped falling "
        "(median 2.15 -> 2.3; warning only)"
    )


def test_an_lr_back_at_a_level_the_run_trained_at_before_its_best_is_no_evidence():
    ctl = StabilityController()
    climb = CASES["loss_above_best"][0]  # the LR grew 4x since the best window (0.1 -> 0.4)
    assert ctl.loss_above_best(dataclasses.replace(climb, safe_lr=0.2)).act  # 0.4: never trained at before
    # a warm restart (or a cyclic schedule) brought the LR back to 0.4, a peak the run trained at before its best:
    # the climb is the data's (a curriculum's switch, a new loss term), not the LR's
    restart = ctl.loss_above_best(dataclasses.replace(climb, safe_lr=0.4))
    assert restart is not None
    assert not restart.act
    assert restart.reason.startswith("the run looks unstable: ")
    assert "not past 0.4, which the run trained at before its best" in restart.reason
    climbing = ctl.loss_climbing(dataclasses.replace(CASES["loss_climbing"][0], safe_lr=0.5))
    assert climbing is not None
    assert not climbing.act


def test_a_climb_already_coming_down_by_itself_is_no_evidence():
    ctl = StabilityController()
    # above the best in both windows, the LR grew 4x, but the newer window is clearly below the older one
    falling = _pair(
        old_loss=2.8, new_loss=0.8, old_spread=0.3, new_spread=0.2, best=0.002, start_loss=2.3, best_lr=0.1, new_lr=0.4
    )
    assert ctl.loss_above_best(falling) is None  # coming down from a jump: no climb (said when it climbed)
    # within the spread it is not "clearly": the climb still acts
    level = dataclasses.replace(falling, new_loss=2.6)
    assert ctl.loss_above_best(level).act


def test_the_safe_lr_is_the_highest_lr_used_until_the_best_window_and_rides_in_the_checkpoint():
    ctl = StabilityController(window=5)
    lrs = [0.4] * 3 + [0.1] * 30 + [0.8] * 10  # a peak, a decay (the best windows), then a higher LR
    for i, lr in enumerate(lrs):
        ctl.update(2.0 * 0.97**i if i < 33 else 5.0, 1.0, clipped=False, lr=lr)
    assert ctl._safe_lr == 0.4  # the peak before the best; the later 0.8 came after it
    assert ctl._lr_top == 0.8
    copy = StabilityController(window=5)
    copy.load_state_dict(ctl.state_dict())
    assert (copy._safe_lr, copy._lr_top) == (0.4, 0.8)


def test_a_spike_that_begins_inside_the_best_window_is_not_vouched_for_by_it():
    """A x100 LR spike whose first steps fall in the window that becomes the best (the loss has not answered yet)
    was counted as "trained at before its best", so the climb it caused only warned ("a warm restart"). The best
    window vouches for the LR of the steps before it and for its own median, not for its last steps."""
    ctl = StabilityController(window=5)
    findings = []
    for i in range(60):
        lr = 10.0 if i >= 40 else 0.1
        loss = 2.0 * 0.97**i if i < 42 else 50.0 + i  # two spike steps still improve, then the blow-up
        found = ctl.update(loss, 1.0, clipped=False, lr=lr)
        if found is not None:
            findings.append(found)
    assert ctl._safe_lr == 0.1
    assert any(f.act for f in findings), [f.reason for f in findings]


def test_a_spike_of_a_few_batches_inside_the_best_window_does_not_become_its_noise():
    """Found on an uncertainty-weighted multi-task MLP (Adam, an LR set x100 for 20 steps): the spike's first steps
    fell into the window whose median became the best (0.48; the loss had not answered yet), and their losses (12 ...
    1186) made that window's mean deviation 52. Every later climb was measured in that scale: the loss went 0.48 ->
    4.1, flat, the network at chance, and no rule fired. The spread is a robust one now: the climb acts."""
    ctl = StabilityController()  # the defaults: windows of 25 steps
    findings = []
    for i in range(300):
        lr = 0.3 if 150 <= i < 170 else 0.003
        if i < 150:  # learning, then a noisy plateau
            loss = 7.0 * 0.97**i + 0.45 + 0.02 * math.sin(2.3 * i)
        elif i < 156:  # the first step's loss was computed before the x100 update
            loss = (0.4, 12.0, 49.0, 61.0, 1186.0, 11.3)[i - 150]
        else:
            loss = 4.1 + 0.002 * ((i * 3) % 5 - 2)  # where the dead network sits
        found = ctl.update(loss, 1.0, clipped=False, lr=lr)
        if found is not None:
            findings.append((i, found))
    acting = [(i, f) for i, f in findings if f.act]
    assert acting, [f.reason for _, f in findings]
    step, finding = acting[0]
    assert step < 220
    assert finding.rule in ("loss_climbing", "loss_above_best")
    assert finding.target == "before_climb"


def test_a_loss_with_a_high_floor_climbs_when_it_loses_half_of_what_it_learned():
    """A character LSTM trained with truncated BPTT (Adam 3e-3), an LR set x100 for 20 steps: its cross-entropy went
    from 2.29 (best) to 3.9 against 4.49 untrained. It cannot double, so no rule fired and it ended at 3.0 against
    2.2 without the spike. Losing half of what it learned, far beyond its noise, is a climb."""

    def run(ctl):
        found = []
        for i in range(260):
            lr = 0.3 if 150 <= i < 170 else 0.003
            if i < 155:
                loss = 2.2 + 2.3 * 0.96**i + 0.05 * math.sin(2.3 * i)
            else:  # a jump, then a slow descent
                loss = 3.9 - 0.002 * (i - 155) + 0.05 * math.sin(2.3 * i)
            f = ctl.update(loss, 1.0, clipped=False, lr=lr)
            if f is not None:
                found.append(f)
        return found

    found = run(StabilityController())
    acting = [f for f in found if f.act]
    assert acting, [f.reason for f in found]
    assert acting[0].rule == "loss_above_best", [f.reason for f in found]
    # weaker evidence than a doubling: it acts only once the guard tested it on the batches
    assert acting[0].tested_only
    assert "more than half of what the run learned" in acting[0].reason
    assert StabilityFinding.from_dict(acting[0].to_dict()) == acting[0]
    # where the guard cannot test it (several optimizers, reruns off, sharded), it is not acted on: a warning says it
    untestable = StabilityController()
    untestable.testable = False
    climbs = [f for f in run(untestable) if f.rule.startswith("loss_")]
    assert climbs
    assert not [f for f in climbs if f.act], [f.reason for f in climbs]
    # a climb of a third of what was learned is not acted on (only the loss scale or half the progress counts); after
    # an LR that grew 100x it is not silent either (a character GPT lost a third of what it learned to an LR x30 for
    # 20 steps and ended 15-20 % worse with no event): a warning with the share of what was learned
    ctl = StabilityController()
    warned = []
    for i in range(260):
        loss = 2.2 + 2.3 * 0.96**i if i < 155 else 2.95
        f = ctl.update(loss + 0.05 * math.sin(2.3 * i), 1.0, clipped=False, lr=0.3 if 150 <= i < 170 else 0.003)
        assert f is None or not f.act, f.reason
        if f is not None and f.rule.startswith("loss_"):
            warned.append(f.reason)
    assert warned
    assert "% of what the run learned" in warned[0], warned
    assert "learning rate peaked at 100x" in warned[0], warned
    # the same climb at a constant LR says nothing new (a harder task looks the same): no finding of a climb
    ctl = StabilityController()
    for i in range(260):
        loss = 2.2 + 2.3 * 0.96**i if i < 155 else 2.95
        f = ctl.update(loss + 0.05 * math.sin(2.3 * i), 1.0, clipped=False, lr=0.003)
        assert f is None or not f.rule.startswith("loss_"), f.reason


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((1.0, 2.0, 3.0, 4.0, 5.0), 1.0 * math.sqrt(2 / math.pi) / 0.6744897501960817),  # deviations 2 1 0 1 2
        ((1.0, 2.0, 3.0, 4.0, 1e6), 1.0 * math.sqrt(2 / math.pi) / 0.6744897501960817),  # the outlier is one value
        ((0.0, 0.0, 0.0, 0.0, 5.0), 1.0),  # mostly at the median: the mean deviation
        ((), 0.0),
    ],
)
def test_the_spread_is_robust_to_a_few_outliers(values, expected):
    from lightning_gradguard.core.guard._stability import _median, _spread

    center = _median(values) if values else 0.0
    assert _spread(values, center) == pytest.approx(expected)


def test_weaker_evidence_warns_instead_of_acting():
    ctl = StabilityController()
    # the same climb at a constant LR (a curriculum, an annealed loss weight, a moving target): a warning
    flat_lr = dataclasses.replace(CASES["loss_above_best"][0], best_lr=0.1, new_lr=0.1)
    finding = ctl.loss_above_best(flat_lr)
    assert finding is not None
    assert not finding.act
    assert "did not grow" in finding.reason
    # above the untrained loss without a sustained blow-up (fine-tuning whose first batch was an easy one): a warning
    noisy_start = dataclasses.replace(CASES["worse_than_untrained"][0], sustained_peak=6.0)
    assert not ctl.worse_than_untrained(noisy_start).act
    # the start rules judge only the first start_windows windows
    late = dataclasses.replace(CASES["killed_at_start"][0], steps=ctl.start_steps + 1)
    assert ctl.killed_at_start(late) is None
    # a blow-up that came after the first window did not kill the network at its start
    later_peak = dataclasses.replace(CASES["killed_at_start"][0], peak_step=26)
    assert ctl.killed_at_start(later_peak) is None


def test_negative_and_zero_losses_have_a_scale():
    ctl = StabilityController()
    # a Gaussian NLL that crosses zero: the best window at -1.0, now -0.9 (noise), the LR grew: no climb
    nll = _pair(start_loss=0.5, best=-1.0, best_spread=0.3, old_loss=-0.95, new_loss=-0.9, best_lr=0.1, new_lr=0.4)
    assert ctl.assess(nll) is None
    # a margin loss whose best window was exactly 0 and whose spread was 0: only the first loss gives the scale
    margin = _pair(start_loss=0.0, best=0.0, best_spread=0.0, old_loss=0.01, new_loss=0.02, best_lr=0.1, new_lr=0.4)
    assert ctl.assess(margin) is None


def test_thresholds_move_the_rules():
    pair = CASES["norm_rising"][0]
    assert StabilityController(norm_growth=30.0).norm_rising(pair) is None
    climbing = CASES["loss_climbing"][0]
    assert StabilityController(floor=1.0).loss_climbing(climbing) is None  # 3.5 is below 1.0 x the first loss 4.0
    assert StabilityController(rising=2.0).loss_climbing(climbing) is None  # the older window was 1.5x its best
    killed = CASES["killed_at_start"][0]
    assert StabilityController(blowup=4.0).killed_at_start(killed) is None  # no blow-up above 4x the first loss


#: the first loss (untrained), a sustained blow-up in the first updates, then a model stuck above the untrained loss
BLOWN = [2.0, 80.0, 90.0, 70.0] + [5.0] * 100


def test_update_confirms_before_acting_and_escalates_cuts_in_quick_succession():
    ctl = StabilityController(window=10)
    found = [(i, f) for i, f in enumerate(ctl.update(loss, 1.0, clipped=False) for loss in BLOWN) if f]
    # judged every 2 steps from step 20 on; the finding must hold at two judgements in a row (confirm=2)
    assert [i for i, _ in found] == [21, 43, 65]
    assert [f.rule for _, f in found] == ["worse_than_untrained"] * 3
    assert [f.lr_power for _, f in found] == [2, 2, 4]  # squared first cut, then 2 ** streak
    assert ctl.interventions == 3  # and no more: the start rules judge the first start_windows windows only
    assert ctl.last_finding == found[-1][1]


def test_state_dict_keeps_the_old_keys_and_loads_a_checkpoint_written_before_findings():
    ctl = StabilityController(window=10)
    for loss in BLOWN[:26]:
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


# ---------------------------------------------------------------- dead network: a plateau is not a death
#: a deep plain CNN (He init, no blow-up: first loss 2.58) sitting at chance before it learns: flat at 2.30, the
#: global norm ~10x below its early level, gradients reaching every layer (the rescue grid's stable init_cnn, seed 1)
PLATEAU = _pair(
    start_loss=2.58,
    start_norm=7.6,
    old_loss=2.3021,
    new_loss=2.3026,
    old_spread=0.003,
    new_spread=0.002,
    early_norm=1.1,
    new_norm=0.1,
    best=math.inf,
    peak=2.58,
    peak_step=1,
)


def test_a_plateau_at_chance_with_gradients_everywhere_is_not_called_dead():
    ctl = StabilityController()
    assert ctl._dead_signs(PLATEAU)  # the flat loss and the collapsed norm alone would say dead
    assert ctl.dead_network(PLATEAU) is None  # not measured yet: no confirmation, no blow-up
    assert ctl.dead_network(dataclasses.replace(PLATEAU, vanished=0.0)) is None  # every layer still gets gradient
    assert ctl.assess(dataclasses.replace(PLATEAU, vanished=0.0)) is None


def test_dead_network_needs_vanished_gradients_or_a_blow_up_at_the_start_and_says_which():
    ctl = StabilityController()
    dead = ctl.dead_network(dataclasses.replace(PLATEAU, vanished=41 / 42))
    assert dead is not None
    assert not dead.act
    assert "the gradient vanished in 98% of the parameter tensors" in dead.reason
    assert dead.evidence["vanished_share"] == pytest.approx(41 / 42)
    # an exploding initialisation: the first loss 17.7 is 7.7x the level the run is stuck at
    blown = ctl.dead_network(dataclasses.replace(PLATEAU, start_loss=17.7, peak=17.7, peak_step=1))
    assert blown is not None
    assert "a blow-up at step 1 (loss 17.7, 7.69x today's level)" in blown.reason
    assert "vanished_share" not in blown.evidence  # not measured: not claimed
    # measured alive: no gradient tensor vanished, so nothing is dead (a flow's NLL falls flat from a huge first
    # loss and was called dead while it learned); a few vanished tensors leave the warning standing
    alive = dataclasses.replace(PLATEAU, start_loss=17.7, peak=17.7, peak_step=1, vanished=0.0)
    assert ctl.dead_network(alive) is None
    assert ctl.dead_network(dataclasses.replace(alive, vanished=0.1)) is not None
    # the blow-up must come in the first steps: a late spike did not kill units at the start
    late = dataclasses.replace(PLATEAU, start_loss=17.7, peak=17.7, peak_step=ctl.blowup_steps + 1)
    assert ctl.dead_network(late) is None
    assert StabilityController(dead_share=0.99).dead_network(dataclasses.replace(PLATEAU, vanished=0.9)) is None


def _flat_run(ctl, steps, vanished, first=(2.58, 8.0), norm=0.05):
    """Feed a run that starts at ``first`` (loss, norm), then sits flat at chance with a collapsed norm; the share
    of vanished gradients is given only while the controller asks for it. Returns the findings."""
    found = []
    for i in range(steps):
        loss, g = first if i == 0 else (2.3026 + 0.001 * ((i * 7919) % 5 - 2), norm if i > 3 else 2.0)
        f = ctl.update(loss, g, clipped=False, lr=0.01, vanished=vanished if ctl.wants_vanished else None)
        found.append(f)
    return [f for f in found if f is not None]


def test_the_controller_asks_for_the_vanished_share_only_while_the_run_looks_dead():
    ctl = StabilityController(window=10)
    assert ctl.wants_vanished  # the first window: which tensors' gradients flow at all
    assert _flat_run(ctl, 12, vanished=0.0) == []
    assert not ctl.wants_vanished  # the first window is over, no judgement yet
    assert _flat_run(ctl, 10, vanished=0.0) == []
    assert ctl.wants_vanished  # the judgement at step 22 saw the dead signs: measure from now on
    quiet = StabilityController(window=10)
    assert _flat_run(quiet, 120, vanished=0.0) == []  # a plateau whose gradients reach every layer: silent
    dead = StabilityController(window=10)
    findings = _flat_run(dead, 120, vanished=0.95)
    assert [f.rule for f in findings][:1] == ["dead_network"]
    assert findings[0].evidence["vanished_share"] == pytest.approx(0.95)
    # the measured shares ride in the checkpoint
    copy = StabilityController(window=10)
    copy.load_state_dict(dead.state_dict())
    assert copy.state_dict() == dead.state_dict()
    assert copy.wants_vanished


def test_a_healthy_improving_run_is_never_asked_for_the_vanished_share():
    ctl = StabilityController(window=10)
    for i in range(200):
        ctl.update(2.3 * 0.99**i, 1.0, clipped=False, lr=0.01)
        assert ctl.wants_vanished == (i < 9)  # only during its first window (which tensors live)


def test_norm_rising_stays_quiet_near_zero_where_converged_runs_grow_their_norm():
    # Adam on a nearly fitted training set (the rescue grid's stable init_cnn_adam, seed 0, step 445): the loss
    # moves between 0.005 and 0.04 (the untrained loss was 2.3) while the median norm grows 12x
    converged = _pair(start_loss=2.3, old_loss=0.005, new_loss=0.04, old_norm=0.25, new_norm=2.97, best=0.005)
    ctl = StabilityController()
    assert ctl.norm_rising(converged) is None
    assert ctl.norm_rising(dataclasses.replace(converged, old_loss=0.5, new_loss=0.6)) is not None  # above the band


def test_norm_rising_needs_an_older_window_with_gradients():
    # the zoo's masked start: the first 15 of the older window's 25 steps had zero gradients (median norm 0)
    masked = _pair(old_norm=0.0, new_norm=3.0, old_loss=1.0, new_loss=1.0)
    assert StabilityController().norm_rising(masked) is None


def test_worse_than_untrained_warns_only_beyond_the_first_batchs_uncertainty():
    # batch size 1 or a noisy fine-tuning: the windows sit above the (easy) first batch by less than their spread
    ctl = StabilityController()
    noisy = _pair(start_loss=1.0, old_loss=1.3, new_loss=1.25, old_spread=0.5, new_spread=0.4, best=math.inf)
    assert ctl.worse_than_untrained(noisy) is None
    clear = dataclasses.replace(noisy, old_spread=0.1, new_spread=0.1)  # the same medians, a steady level
    finding = ctl.worse_than_untrained(clear)
    assert finding is not None
    assert not finding.act
    # after a sustained blow-up the spread is no excuse: the rule acts (restart from the untrained state)
    blown = dataclasses.replace(noisy, sustained_peak=80.0)
    assert ctl.worse_than_untrained(blown).act


def test_a_network_whose_every_gradient_is_zero_is_named_dead():
    # all units dead and no output bias: the loss is flat, the norm exactly zero, every tensor vanished
    ctl = StabilityController()
    dead = ctl.dead_network(dataclasses.replace(PLATEAU, new_norm=0.0, vanished=1.0))
    assert dead is not None
    assert "the gradient norm collapsed to zero (early level 1.1)" in dead.reason
    assert "the gradient vanished in 100% of the parameter tensors" in dead.reason


def _bouncing_run(ctl, steps, masks, norm=0.05):
    """A run that starts at (2.58, 8.0), then sits near chance with a loss that moves ~5% from batch to batch (not
    flat: an output bias still learning at a high LR moves it) and a collapsed norm; ``masks(i)`` is step i's
    per-tensor vanished mask, given only while the controller asks. Returns the findings."""
    found = []
    for i in range(steps):
        loss, g = (2.58, 8.0) if i == 0 else (2.40 + 0.12 * ((i * 7919) % 5 - 2) / 2, norm if i > 3 else 2.0)
        f = ctl.update(loss, g, clipped=False, lr=0.01, vanished=masks(i) if ctl.wants_vanished else None)
        found.append(f)
    return [f for f in found if f is not None]


def test_tensors_vanished_at_every_step_name_a_dead_network_whose_loss_is_not_flat():
    dead_mask = (True, True, True, True, True, False)  # both hidden layers and the head's weight; the bias learns

    def masks(i: int) -> tuple[bool, ...]:  # every gradient flows for the first 3 steps, then the units die
        return (False,) * 6 if i < 3 else dead_mask

    flat_only = StabilityController(window=10)
    findings = _bouncing_run(flat_only, 150, lambda i: 5 / 6)  # a share alone: no proof without a flat loss
    assert [f.rule for f in findings if f.rule == "dead_network"] == []
    ctl = StabilityController(window=10)
    findings = [f for f in _bouncing_run(ctl, 150, masks) if f.rule == "dead_network"]
    assert findings, "the dead network went unreported"
    dead = findings[0]
    assert not dead.act
    assert dead.evidence["still_vanished_share"] == pytest.approx(5 / 6)
    assert "vanished at every one of the last" in dead.reason
    assert dead.evidence["spread"] > ctl.flat * dead.evidence["new_loss"]  # indeed not flat
    copy = StabilityController(window=10)
    copy.load_state_dict(ctl.state_dict())
    assert copy.state_dict() == ctl.state_dict()


def test_heads_that_take_turns_are_not_a_dead_network():
    # six heads (weight and bias each) on a shared trunk of two tensors; one head per batch: at every step 10 of the
    # 14 gradient tensors are zero (a median share of 71%), but every head learns within a few steps
    def turns(i: int) -> tuple[bool, ...]:
        head = i % 6
        return (False, False, *(h != head for h in range(6) for _ in range(2)))

    ctl = StabilityController(window=10)
    findings = _bouncing_run(ctl, 300, turns)
    assert [f for f in findings if f.rule == "dead_network"] == []
    assert ctl.wants_vanished  # it did look (the other signs held), and found every tensor trained in the window


def test_tensors_that_never_had_a_gradient_are_not_dead_units():
    """A network whose first layers never get a gradient by design (a ``sign()`` without a straight-through estimator:
    4 of 6 tensors at zero from the first step) learns with what is left; its loss bounces and the norm is low, as
    for a dead network. The first window's masks show those tensors never lived: counted out, nothing is dead. The
    same network whose head then dies too (all but the output bias) is named dead."""
    cut_off = (True, True, True, True, False, False)

    quiet = StabilityController(window=10)
    assert [f for f in _bouncing_run(quiet, 150, lambda i: cut_off) if f.rule == "dead_network"] == []
    assert quiet._alive == [False, False, False, False, True, True]

    def dies(i: int) -> tuple[bool, ...]:
        return cut_off if i < 40 else (True, True, True, True, True, False)

    ctl = StabilityController(window=10)
    dead = [f for f in _bouncing_run(ctl, 150, dies) if f.rule == "dead_network"]
    assert dead
    assert dead[0].evidence["still_vanished_share"] == pytest.approx(0.5)  # 1 of the 2 tensors that lived


def test_a_mask_of_another_length_starts_the_count_again():
    ctl = StabilityController(window=2)
    ctl.wants_vanished = ctl._wants_dead = True
    ctl._steps = 10  # past the first window
    ctl._add_vanished((True, True, False))
    ctl._add_vanished((True, False, False))
    assert ctl._still == [2, 0, 0]  # per tensor: the measured steps in a row its gradient vanished
    ctl._add_vanished((False, True, True))  # a revival (one live input) restarts that tensor's count only
    assert ctl._still == [0, 1, 1]
    ctl._add_vanished((True, True))  # another parameter set (a param group added): what was seen says nothing
    assert ctl._still == [1, 1]
    ctl._add_vanished(())  # nothing measured: nothing learned
    assert ctl._still == [1, 1]
    ctl._add_vanished(0.5)  # a share (older callers): a share, and the counts stay
    assert ctl._still == [1, 1]
    ctl._add_vanished((True, False))
    assert ctl._still == [2, 0]


def test_a_dead_network_far_below_an_exploding_first_loss_is_confirmed_by_its_vanished_gradients_only():
    ctl = StabilityController()
    exploded = dataclasses.replace(PLATEAU, start_loss=176.0, peak=3.1e5, peak_step=20)  # 76x above chance at step 0
    assert ctl.dead_network(exploded) is None  # not measured: "far below the start" is no proof either way
    dead = ctl.dead_network(dataclasses.replace(exploded, vanished=0.97))
    assert dead is not None
    assert (dead.act, dead.target) == (True, "start")  # proven dead, killed by a blow-up in its start windows
    assert "its highest loss came at step 20 (3.1e+05" in dead.reason
    assert dead.reason.endswith("units killed by that blow-up: restart from the untrained state")
    late = dataclasses.replace(exploded, vanished=0.97, peak_step=ctl.start_steps + 1)  # a blow-up after the start
    assert not ctl.dead_network(late).act  # windows: named, not restarted (the start is far behind)
    assert ctl.dead_network(dataclasses.replace(exploded, vanished=0.0)) is None  # gradients everywhere: resting
    # the blow-up alone never confirms a death far below the first loss (a run that trained from an exploding start
    # and converged to a flat loss looks the same)
    assert ctl.dead_network(dataclasses.replace(exploded, peak=176.0, peak_step=1)) is None


def test_rank_z_is_zero_for_one_distribution_and_about_six_for_separated_windows():
    from lightning_gradguard.core.guard._stability import _rank_z

    low, high = tuple(float(i) for i in range(25)), tuple(100.0 + i for i in range(25))
    assert _rank_z(low, high) == pytest.approx(625 / 2 / math.sqrt(25 * 25 * 51 / 12))  # every pair: ~6.06
    assert _rank_z(high, low) == pytest.approx(-_rank_z(low, high))
    assert _rank_z(low, low) == pytest.approx(0.0)  # ties count half
    assert math.isnan(_rank_z((), low))
    # one spike is one value: it moves the statistic by one rank, not by its size
    assert _rank_z(low, (*low[:-1], 1e30)) < 0.5


def _bimodal(rng, n: int, share_mixed: float) -> list[float]:
    """Mixup-like losses: a clean batch ~0.1, a mixed one ~0.8 (per-batch mixing weight near 0/1 or near 1/2)."""
    return [(0.8 if rng.random() < share_mixed else 0.1) * (1 + 0.1 * (rng.random() - 0.5)) for _ in range(n)]


def test_a_bimodal_loss_whose_median_jumps_between_its_modes_is_no_climb():
    """Mixup with a Beta(0.4, 0.4) weight per batch: about half the batches are clean, half mixed, so a window's
    median lands on one mode or the other and doubles or halves from one window to the next. The windows' losses
    are of one distribution: the rank test says so, and the window-to-window climbing rule stays quiet. A real climb
    of the same size (every loss of the newer window higher) is still found."""
    import random

    rng = random.Random(0)
    ctl = StabilityController(confirm=1)
    found = []
    for step in range(3000):
        loss = 2.3 if step == 0 else _bimodal(rng, 1, 0.5)[0]  # the untrained loss, then the bimodal level
        f = ctl.update(loss, 1.0, clipped=False, lr=0.1)
        if f is not None:
            found.append(f.rule)
    assert "loss_climbing" not in found
    # the medians alone would have called climbs: check one pair of windows whose medians jumped
    old = tuple(sorted(_bimodal(random.Random(1), 25, 0.3)))
    new = tuple(sorted(_bimodal(random.Random(2), 25, 0.7)))
    pair = _pair(old_loss=old[12], new_loss=new[12], best=old[12] / 1.5, best_spread=0.0, start_loss=0.5)
    assert ctl.loss_climbing(pair) is not None  # no rank test known (NaN): the medians decide
    from lightning_gradguard.core.guard._stability import _rank_z

    z = _rank_z(old, new)
    assert z < 3.0
    assert ctl.loss_climbing(dataclasses.replace(pair, climb_z=z)) is None
    # a real climb: from step 200 every loss 5% above the one before (each window ~3.4x the last)
    ctl2 = StabilityController(confirm=1)
    rng = random.Random(3)
    found = []
    for step in range(400):
        loss = 1.0 * (1 + 0.1 * (rng.random() - 0.5)) * (1.0 if step < 200 else 1.05 ** (step - 200))
        f = ctl2.update(loss, 1.0, clipped=False, lr=0.1)
        if f is not None:
            found.append(f)
    assert found
    assert found[0].rule == "loss_climbing"
    assert found[0].evidence["rank_z"] > 6.0  # every loss of the newer window above every loss of the older


def test_the_best_windows_losses_ride_in_the_checkpoint():
    import random

    rng = random.Random(0)
    ctl = StabilityController()
    for step in range(120):
        ctl.update(1.0 / (1 + step) + 0.01 * rng.random(), 1.0, clipped=False, lr=0.1)
    state = ctl.state_dict()
    assert len(state["best_losses"]) == ctl.window
    other = StabilityController()
    other.load_state_dict(state)
    assert other._pair() == ctl._pair()
    assert other._pair().best_z == ctl._pair().best_z
    older = {k: v for k, v in state.items() if k != "best_losses"}  # a checkpoint from before: no rank test
    third = StabilityController()
    third.load_state_dict(older)
    assert math.isnan(third._pair().best_z)


def test_a_slow_climb_over_the_best_window_needs_a_shift_of_the_losses():
    """loss_above_best against a best window that was a lucky draw of a bimodal loss: the medians say "climbed", the
    rank test says the losses overlap. Against a best window whose losses all sit lower, it fires."""
    import random

    from lightning_gradguard.core.guard._stability import _rank_z

    ctl = StabilityController()
    pair = _pair(old_loss=1.5, new_loss=2.5, best=1.0, start_loss=4.0, peak=4.0, best_lr=0.1, new_lr=0.1)
    assert ctl.loss_above_best(pair) is not None  # the medians alone
    lucky = tuple(sorted(_bimodal(random.Random(5), 25, 0.35)))
    typical = tuple(sorted(_bimodal(random.Random(6), 25, 0.6)))
    assert typical[12] > 2 * lucky[12]  # the medians jumped between the modes
    assert ctl.loss_above_best(dataclasses.replace(pair, best_z=_rank_z(lucky, typical))) is None
    assert ctl.loss_above_best(dataclasses.replace(pair, best_z=5.0)) is not None


def test_windows_too_small_for_the_significance_need_complete_separation():
    """Windows of 4 steps cannot reach z 3 (every pair: 2.31), so the rank test asks for every loss of the newer
    window above every loss of the older: a real climb still fires, an overlapping pair does not."""
    from lightning_gradguard.core.guard._stability import _rank_z, _separated_z

    assert _separated_z(4, 4) == pytest.approx(_rank_z((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)))
    assert _separated_z(4, 4) < 3.0 < _separated_z(7, 7)
    ctl = StabilityController(window=4)
    pair = _pair(old_loss=1.5, new_loss=3.5, best=1.0, start_loss=4.0, peak=4.0, best_lr=0.1, new_lr=0.4, window=4)
    separated = _rank_z((1.4, 1.5, 1.5, 1.6), (3.4, 3.5, 3.5, 3.6))
    overlapping = _rank_z((1.4, 1.5, 1.5, 4.0), (1.45, 3.5, 3.5, 3.6))
    assert ctl.loss_climbing(dataclasses.replace(pair, climb_z=separated)) is not None
    assert ctl.loss_climbing(dataclasses.replace(pair, climb_z=overlapping)) is None


def test_a_classifier_converged_at_its_floor_is_not_dead_by_a_blow_up_at_its_start():
    """A digits classifier with label smoothing (a helper's run): it learned for 600 steps from 2.3 to its floor of
    0.51, where its loss is flat to 0.5 % and its norm 10x below the early level; its first loss is its highest. The
    blow-up cause read that as "killed at the start" and warned "the network looks dead" on a model at 98 %
    accuracy. A death a start blow-up caused shows from the first windows on: a loss that came clearly below the
    level of the run's first judged window came down by learning."""
    ctl = StabilityController()
    found = []
    for i in range(900):
        loss = 0.51 + 1.8 * math.exp(-i / 120) + 0.002 * math.sin(2.3 * i)
        norm = 0.06 + 0.6 * math.exp(-i / 150)
        f = ctl.update(loss, norm, clipped=False, lr=1e-3)
        if f is not None:
            found.append(f)
    assert not [f for f in found if f.rule == "dead_network"], [f.reason for f in found]
    # the same floor reached within the first windows, after a blow-up of the first steps, is still a dead network
    ctl = StabilityController()
    found = []
    for i in range(200):
        loss = (17.7, 9.0, 6.0)[i] if i < 3 else 2.302 + 0.002 * math.sin(2.3 * i)
        norm = 5.0 if i < 10 else 0.19
        f = ctl.update(loss, norm, clipped=False, lr=1e-3)
        if f is not None:
            found.append(f)
    dead = [f for f in found if f.rule == "dead_network"]
    assert dead, [f.reason for f in found]
    assert "a blow-up at step" in dead[0].reason


def _norm_findings(norms: list[float], losses: list[float]) -> list[str]:
    ctl = StabilityController()
    rules = []
    for loss, norm in zip(losses, norms, strict=True):
        finding = ctl.update(loss, norm, clipped=False, lr=1e-3)
        if finding is not None:
            rules.append(finding.rule)
    return rules


def test_norm_rising_needs_the_whole_window_to_rise_not_a_median_that_flips():
    # two tasks in turn (the zoo's alternating_tasks): norms ~0.5 and ~27, losses ~0.3 and ~5. A window of 25 holds 13
    # of one task and 12 of the other, so the windows' medians flip between the levels; the norms did not rise.
    steps = 400
    norms = [0.5 + 0.01 * (i % 7) if i % 2 == 0 else 27.0 + 0.1 * (i % 5) for i in range(steps)]
    losses = [0.3 + 0.01 * (i % 3) if i % 2 == 0 else 5.0 + 0.1 * (i % 4) for i in range(steps)]
    medians_flip = [sorted(norms[a : a + 25])[12] for a in range(0, steps, 25)]
    assert min(medians_flip) < 1.0 < 20.0 < max(medians_flip)  # what the median alone saw
    assert "norm_rising" not in _norm_findings(norms, losses)
    # a real rise (every norm of the newer windows above the older ones', the loss not improving) still warns
    risen = [0.5 + 0.01 * (i % 7) if i < 200 else 27.0 + 0.1 * (i % 5) for i in range(steps)]
    flat = [2.0 + 0.01 * (i % 3) for i in range(steps)]
    assert "norm_rising" in _norm_findings(risen, flat)
