"""DivergenceDetector and StabilityController on synthetic streams: quiet on healthy runs, firing on blow-ups."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_gradguard.core.guard._divergence import DivergenceDetector
from lightning_gradguard.core.guard._stability import StabilityController
from lightning_gradguard.core.recover._fault_trace import first_nonfinite_module, nonfinite_in


def healthy_losses(n: int, seed: int = 0, noise: float = 0.5) -> list[float]:
    """A decaying loss with multiplicative batch noise (log-normal, sigma ``noise``)."""
    rng = random.Random(seed)
    return [(2.0 * math.exp(-i / 300) + 0.05) * math.exp(rng.gauss(0, noise)) for i in range(n)]


def run(det: DivergenceDetector, losses, norms) -> list[int]:
    return [i for i, (loss, norm) in enumerate(zip(losses, norms)) if any(det.update(loss, norm))]


@pytest.mark.parametrize("seed", range(5))
def test_no_divergence_on_noisy_healthy_streams(seed):
    rng = random.Random(seed + 100)
    losses = healthy_losses(1500, seed)
    norms = [abs(rng.gauss(1.0, 0.3)) * (1 + i / 500) for i in range(1500)]  # a norm that drifts up 4x
    assert run(DivergenceDetector(), losses, norms) == []


def test_a_single_spike_is_not_divergence_but_a_loss_that_stays_up_is():
    losses = healthy_losses(100, noise=0.1)
    spiked = [*losses[:50], losses[50] * 1e4, *losses[51:]]
    assert run(DivergenceDetector(), spiked, [1.0] * 100) == []
    diverged = [*losses[:50], *[1e6 * 3**i for i in range(10)]]  # blown up and climbing
    assert run(DivergenceDetector(persist=3), diverged, [1.0] * 60) == list(range(52, 60))  # from the 3rd step up
    # a far level that holds steady (a curriculum step to a harder, larger task) is a new level, not divergence
    new_level = [*losses[:50], *[1e6 * (1 + 0.1 * (i % 3)) for i in range(30)]]
    assert run(DivergenceDetector(persist=3), new_level, [1.0] * 80) == []


def test_blow_up_at_the_second_step_is_caught_once_the_evidence_outweighs_a_one_batch_reference():
    # a too-high Adam LR: the loss leaves its start by 11 orders of magnitude at step 1 and swings over two more
    # (issue 18's MLP, the rescue grid's trace). The reference is one batch, so the jump must last min_samples - 1
    # steps longer than persist and be erratic: flagged from step 7
    losses = [11.1, 1.6e12, 1.01e13, 5.38e11, 3.81e12, 3.27e12, 5.18e11, 6.37e10, 1.99e12, 1.87e12]
    assert run(DivergenceDetector(), losses, [1.0] * 10) == [7, 8, 9]
    # with five healthy losses known, persist (3) steps are enough
    assert run(DivergenceDetector(), [10.0, 9.0, 9.5, 8.0, 8.5, *losses[1:]], [1.0] * 14) == list(range(7, 14))
    # an easy first batch (a fine-tuned model that fits it to 1e-6), then a steady level: the level is the reference
    det = DivergenceDetector()
    steady = [1e-6] + [0.05, 0.04, 0.06, 0.05] * 5
    assert run(det, steady, [1.0] * len(steady)) == []
    assert det.loss_reference == pytest.approx(0.05)


def test_zero_and_tiny_references_are_not_a_scale():
    # a fully masked first batch (loss exactly 0), a margin loss already satisfied, a loss weight ramped from 0
    masked = [0.0, 1.0, 1.1, 0.9, 1.0, 1.2, 0.95] * 3
    assert run(DivergenceDetector(), masked, [1.0] * len(masked)) == []
    ramp = [1.0 * min(1.0, i / 50) for i in range(120)]
    assert run(DivergenceDetector(), ramp, [1.0] * 120) == []
    satisfied = [0.0] * 40 + [0.2, 0.1, 0.3, 0.2] * 10
    assert run(DivergenceDetector(), satisfied, [1.0] * len(satisfied)) == []
    # negative losses that cross zero (a Gaussian NLL) keep their spread as the scale
    rng = random.Random(0)
    nll = [-1.0 + 0.6 * rng.gauss(0, 1) for _ in range(300)]
    assert run(DivergenceDetector(), nll, [1.0] * 300) == []


def test_a_fault_steps_own_statistics_never_unsettle_the_run():
    det = DivergenceDetector()
    for _ in range(20):
        det.update(1.0, 1.0)
    det.update(math.inf, 1e30)  # a corrupt label: inf loss, a huge finite gradient
    assert not det.unsettled
    assert det.grad_reference == 1.0


def test_a_slow_climb_is_not_divergence():
    # +1 %/step (a curriculum that hardens, an annealed loss weight): a moving median follows it, and a climb alone
    # is never divergence here (the stability controller judges climbs, with the LR as corroboration)
    losses = [1.0] * 64 + [1.0 * 1.01**i for i in range(400)]
    assert run(DivergenceDetector(window=32), losses, [1.0] * len(losses)) == []


def blown_losses(norms: list[float], far: float = 1e3) -> list[float]:
    """The loss of a model that takes its gradients: 1.0 while the norms are healthy, 5.0 on the step after a far
    norm (an update with such a gradient moved the weights far)."""
    return [5.0 if i and norms[i - 1] > far else 1.0 for i in range(len(norms))]


def test_gradient_norm_far_beyond_its_baseline_for_several_steps():
    climbing = [5e3 * 1.5**i for i in range(5)]  # a blow-up keeps climbing
    norms = [1.0] * 40 + [5e3] * 2 + [1.0] * 10 + climbing
    flagged = run(DivergenceDetector(persist=3), blown_losses(norms), norms)
    assert flagged == [54, 55, 56]  # the two-step burst passes; the sustained one is flagged from its 3rd step
    erratic = [1.0] * 40 + [5e3, 2e5, 8e3, 1e6]  # or swings over an order of magnitude
    assert run(DivergenceDetector(persist=3), blown_losses(erratic), erratic) == [42, 43]


@pytest.mark.parametrize("loss_after", ["flat", "falling", "negative"])
def test_far_climbing_norms_whose_loss_does_not_rise_are_a_new_level(loss_after):
    """The first successes of a sparse-reward policy gradient: norms ~0.01 (an entropy bonus alone), then 19, 39, 60
    and climbing while the REINFORCE loss falls to -23. Nothing says the model blew up: its loss did not rise. The far
    norms become the reference (before, a rollback and an LR cut at step 10); a blow-up from there, whose loss does
    rise, is still flagged."""
    rng = random.Random(3)
    quiet = [0.01 * (1 + 0.2 * rng.random()) for _ in range(10)]
    successes = [19.0, 39.0, 60.0, 80.0, 120.0, 100.0, 90.0, 110.0]
    after = {
        "flat": [1.0] * 8,
        "falling": [1.0, 0.8, 0.6, 0.5, 0.4, 0.35, 0.3, 0.28],
        "negative": [-5.0, -23.0, -13.0, -18.0, -20.0, -17.0, -21.0, -19.0],
    }
    losses = [1.0] * 10 + after[loss_after]
    det = DivergenceDetector(persist=3)
    handed = []
    for x, n in zip(losses, quiet + successes):
        assert det.update(x, n) == (False, False)
        handed.append(det.new_grad_level)
    assert det.grad_reference is not None
    assert det.grad_reference > 10.0
    # a climb adopted for want of the loss's confirmation is not handed to the clipper (a blow-up under a clipper
    # climbs while the clipped steps keep its loss down: released, it would blow up)
    assert handed == [None] * len(handed)
    base = losses[-1]
    blown = [1e5, 3e5, 1e6]  # from the new level, a blow-up whose loss rises is flagged from its 3rd step
    blown_loss = [base, abs(base) * 50 + 10, abs(base) * 500 + 100]
    assert [det.update(x, n)[1] for x, n in zip(blown_loss, blown)] == [False, False, True]


def test_a_far_gradient_level_that_holds_or_falls_is_a_new_level():
    """A class-incremental curriculum: the first task is separable, so cross-entropy drives the norm to ~1e-3; on the
    whole task it is ~7 (5000x) and falls as the model learns. That is the task's gradient scale, not a blown-up model
    (a rollback restored a state that met the same jump on the next batches, three times, then halted): the far norms
    become the reference, as a far loss level that holds does, and only a further blow-up from there is flagged."""
    rng = random.Random(1)
    converged = [1e-3 * (1 + 0.3 * rng.random()) for _ in range(200)]
    new_task = [7.0 * (1 + 0.15 * rng.random()) * 0.995**i for i in range(200)]
    det = DivergenceDetector()
    handed = []
    for n in converged + new_task:
        assert not det.update(0.01, n)[1]
        handed.append(det.new_grad_level)
    assert det.grad_reference is not None
    assert det.grad_reference > 1.0  # the new level is the reference
    levels = [h for h in handed if h is not None]
    assert len(levels) == 1  # handed to the clipper once, at the adoption: the new task's first three norms
    assert levels[0] == new_task[:3]
    # a blow-up from it still is (its loss rises)
    assert [det.update(x, n)[1] for x, n in ((0.01, 2e4), (5.0, 6e4), (50.0, 2e5))] == [False, False, True]
    again = DivergenceDetector()  # a far run in progress survives a checkpoint
    det = DivergenceDetector()
    for n in [*converged, 7.0]:
        det.update(0.01, n)
    again.load_state_dict(det.state_dict())
    assert again.state_dict() == det.state_dict()
    assert [again.update(0.01, n)[1] for n in (7.5, 7.2)] == [det.update(0.01, n)[1] for n in (7.5, 7.2)] == [False] * 2


def test_nonfinite_values_are_neither_judged_nor_learned_and_state_round_trips():
    det = DivergenceDetector()
    for v in [1.0, math.nan, math.inf, 1.1, 0.9]:
        assert det.update(v, v) == (False, False)
    state = det.state_dict()
    assert all(math.isfinite(x) for x in state["losses"] + state["norms"])
    other = DivergenceDetector()
    other.load_state_dict(state)
    assert other.state_dict() == state


@pytest.mark.parametrize("seed", range(3))
def test_stability_quiet_on_healthy_runs_even_with_frequent_clipping(seed):
    rng = random.Random(seed)
    ctl = StabilityController(window=100)
    losses = healthy_losses(2000, seed)
    reasons = [ctl.update(loss, 1.0 + rng.random(), clipped=rng.random() < 0.3) for loss in losses]
    assert [r for r in reasons if r] == []


def test_stability_fires_on_sustained_clipping_without_progress_and_says_why():
    ctl = StabilityController(window=50)
    rng = random.Random(0)
    # a loss stuck near its first value (5.0) with the clipper cutting 95% of the steps: a plateau, no signal yet
    reasons = [ctl.update(5.0, 100.0, clipped=False)]
    reasons += [ctl.update(5.0 + 0.4 * rng.random(), 100.0, clipped=rng.random() < 0.95) for _ in range(99)]
    assert [r for r in reasons if r] == []
    # the clipper cuts every step and the loss drifts above 1.1x its first value without improving
    reasons = [ctl.update(5.8 + 0.4 * rng.random(), 100.0, clipped=True) for _ in range(50)]
    fired = [r for r in reasons if r]
    assert len(fired) == 1  # a warning, repeated only after repeat_windows windows
    assert fired[0].reason.startswith("the run looks unstable: the clipper cut")
    assert (fired[0].rule, fired[0].target, fired[0].act) == ("sustained_clipping", "in_place", False)
    assert (ctl.interventions, ctl.warnings) == (0, 1)
    assert ctl.last_finding is None  # warnings are not cuts


def test_stability_fires_on_a_climbing_loss():
    ctl = StabilityController(window=20)
    falling = [4.0 * 0.97**i for i in range(60)]  # a healthy start, down to ~0.65
    reasons = [ctl.update(loss, 1.0, clipped=False) for loss in falling]
    assert [r for r in reasons if r] == []
    reasons = [ctl.update(falling[-1] * 1.05**i, 1.0, clipped=False) for i in range(60)]  # x2.65 per window
    fired = [r for r in reasons if r]
    assert fired
    assert "the loss keeps climbing" in fired[0].reason
    assert (fired[0].rule, fired[0].target) == ("loss_climbing", "before_climb")
    state = ctl.state_dict()
    other = StabilityController(window=20)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_fault_trace_names_the_first_module_and_restores_the_rng():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1), torch.nn.Tanh())
    with torch.no_grad():
        net[2].weight[0, 0] = math.inf
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    assert first_nonfinite_module(net, lambda: net(torch.ones(2, 3))) == "2"
    assert torch.equal(torch.rand(3), expected_next)  # the replay consumed no randomness of the run
    with torch.no_grad():
        net[2].weight[0, 0] = 0.0
    assert first_nonfinite_module(net, lambda: net(torch.ones(2, 3))) is None
    assert first_nonfinite_module(net, lambda: net(torch.full((2, 3), math.nan))) == "0"
    assert nonfinite_in([{"x": torch.tensor([math.inf])}])
    assert not nonfinite_in((torch.ones(2), torch.tensor([1, 2]), "text"))


def test_divergence_detector_says_when_the_run_was_unsettled_before_a_fault():
    det = DivergenceDetector(recent=5)
    for _ in range(10):
        det.update(1.0, 1.0)
    assert not det.unsettled
    det.update(1.5, 5.0)  # within the loss (3x) and norm (10x) factors
    assert not det.unsettled
    det.update(4.0, 1.0)  # a loss 4x its median
    assert det.unsettled
    for _ in range(4):
        det.update(1.0, 1.0)
    assert det.unsettled  # still among the last 5 judged steps
    det.update(1.0, 1.0)
    assert not det.unsettled
    det.update(1.0, 20.0)  # a norm 20x its median
    assert det.unsettled
    state = det.state_dict()
    other = DivergenceDetector(recent=5)
    other.load_state_dict(state)
    assert other.unsettled
    other.restart_runs()  # after a rollback the restored state is not unsettled
    assert not other.unsettled


def test_stability_restarts_a_model_worse_than_untrained_and_cuts_harder_each_time():
    ctl = StabilityController(window=10)
    # the first loss is the untrained model's; a too-high LR blows it up for several steps and leaves every later
    # loss above it
    stream = [2.0, 60.0, 80.0, 70.0] + [5.0 + 0.1 * (i % 3) for i in range(19)]
    reasons = [ctl.update(loss, 1.0, clipped=False) for loss in stream]
    fired = [r for r in reasons if r]
    assert len(fired) == 1
    assert "still above the untrained model's" in fired[0].reason
    assert (fired[0].rule, fired[0].target, fired[0].act) == ("worse_than_untrained", "start", True)
    assert fired[0].worse_than_start
    assert fired[0].lr_power == 2  # worse than untrained: an LR far off, the first cut is squared
    # the next cuts within repeat_windows windows double the exponent
    again = [f for f in (ctl.update(5.0, 1.0, clipped=False) for _ in range(44)) if f]
    assert [f.lr_power for f in again] == [2, 4]
    other = StabilityController(window=10)
    other.load_state_dict(ctl.state_dict())
    assert other.last_finding == again[-1]
    assert (other.state_dict()["lr_power"], other.state_dict()["worse_than_start"]) == (4, True)


def test_stability_ignores_sustained_clipping_while_the_loss_is_below_its_start():
    # a threshold that lags a norm growing as the model learns clips nearly every step of a healthy run (the LSTM
    # example at its stable LR): a plateau below the untrained loss is no reason to cut the LR
    ctl = StabilityController(window=25)
    rng = random.Random(0)
    first = ctl.update(0.19, 0.01, clipped=False)
    reasons = [first] + [ctl.update(0.16 + 0.02 * rng.random(), 0.2, clipped=True) for _ in range(200)]
    assert [r for r in reasons if r] == []


def test_a_loss_near_zero_that_jumps_is_not_divergence():
    # late in a classification run the loss is ~0.005; a hard batch at 0.8 is 160x the median but far below the
    # untrained model's 2.3: the floor (0.1 x the first loss) keeps it from counting as a jump
    det = DivergenceDetector(persist=3)
    for _ in range(5):  # the untrained model's losses set the floor
        det.update(2.3, 1.0)
    for _ in range(40):
        det.update(0.005, 1.0)
    assert [det.update(0.8, 1.0)[0] for _ in range(5)] == [False] * 5
    assert [det.update(500.0 * 3**i, 1.0)[0] for i in range(3)][-1] is True  # blown up and climbing


def test_stability_restarts_a_network_killed_in_its_first_steps_but_not_a_slow_warm_up():
    # dead units: the loss sits at the untrained level (chance) and the gradient collapses far below its first value
    ctl = StabilityController(window=10)
    rng = random.Random(1)
    reasons = [ctl.update(2.58, 7.6, clipped=False), ctl.update(9.3, 127.0, clipped=False)]  # the killing blow-up
    reasons += [ctl.update(2.30 + 0.01 * rng.random(), 0.1, clipped=False) for _ in range(20)]
    fired = [r for r in reasons if r]
    assert len(fired) == 1
    assert "has not moved from the untrained model's" in fired[0].reason
    assert (fired[0].rule, fired[0].target, fired[0].lr_power) == ("killed_at_start", "start", 2)
    # a slow start at a sane LR (the deep-CNN example, stable LR, seed 1): the same plateau and gradient, no blow-up
    ctl = StabilityController(window=10)
    reasons = [ctl.update(2.58, 7.6, clipped=False), ctl.update(2.32, 0.63, clipped=False)]
    reasons += [ctl.update(2.30 + 0.01 * rng.random(), 0.15, clipped=False) for _ in range(40)]
    assert [r for r in reasons if r] == []
    # a warm-up from a tiny LR: the loss has not moved either, but the gradient has not collapsed
    ctl = StabilityController(window=10)
    reasons = [ctl.update(2.30 + 0.01 * rng.random(), 1.0 + 0.1 * rng.random(), clipped=False) for _ in range(100)]
    assert [r for r in reasons if r] == []


def test_a_thin_verdict_is_marked_and_the_adopted_level_becomes_the_reference():
    """The guard tests a verdict made against a thin reference on the batch itself; when the restored state does no
    better there, the jumped losses are the run's level (``adopt_level``) and the same losses are then no jump."""
    det = DivergenceDetector()
    first, ordinary = 0.003, [3.7, 20.7, 0.67, 4.3, 19.0, 9.4, 0.32]  # a fitted first sample, then ordinary ones
    verdicts = [det.update(loss, 1.0)[0] for loss in [first, *ordinary]]
    assert verdicts[-1]  # one batch's reference: the ordinary losses read as a jump
    assert det.thin_verdict
    assert not det.beyond(0.32, 4.0)  # the restored state's loss on the same batch: no better
    det.adopt_level()
    assert not det.thin_verdict
    assert [det.update(loss, 1.0)[0] for loss in ordinary * 3] == [False] * 21
    assert not det.update(12.0, 1.0)[0]
    mature = DivergenceDetector()
    for loss in [1.0, 0.9, 1.1, 0.8, 1.0, 0.95]:
        mature.update(loss, 1.0)
    assert [mature.update(loss, 1.0)[0] for loss in (500.0, 5000.0, 50000.0)] == [False, False, True]
    assert not mature.thin_verdict  # a full reference's verdict is not a thin one


def test_a_norm_back_from_a_collapse_is_no_divergence_but_a_real_one_still_is():
    """The gradient-divergence reference is the recent median or the run's long-run level (every 10th healthy norm
    of the last ~1000 steps), whichever is higher: a norm that collapsed (saturated units) and comes back to where
    the run used to be is no 1000x divergence; a norm that leaves both behind is."""
    rng = random.Random(0)
    healthy = [0.5 * (1 + 0.2 * rng.random()) for _ in range(300)]
    collapsed = [1e-5 * (1 + 0.2 * rng.random()) for _ in range(250)]
    back = [30.0 * (1 + 0.2 * rng.random()) for _ in range(50)]
    det = DivergenceDetector()
    flags = [det.update(1.0, n)[1] for n in healthy + collapsed + back]
    assert not any(flags)
    assert det.grad_reference is not None
    assert det.grad_reference > 0.4  # the long-run level, not the collapsed one
    # from a steady level, a real blow-up is still caught (3 steps in a row far above both levels, its loss rising)
    det = DivergenceDetector()
    losses = [1.0] * len(healthy) + [1.0, 5.0, 50.0]
    flags = [det.update(x, n)[1] for x, n in zip(losses, [*healthy, 2e3, 5e3, 9e3])]
    assert flags[-3:] == [False, False, True]
    # the long-run level survives a checkpoint
    again = DivergenceDetector()
    again.load_state_dict(det.state_dict())
    assert again.state_dict() == det.state_dict()


def test_a_held_far_level_is_reported_for_the_batch_test_only_where_the_guard_can_run_it():
    """A far loss level that holds steady (a blown-up model's, losses 500-1800 where the run sat at 0.04; or a new
    task's) is adopted at once where nothing can test it, as before; with ``test_held`` (set by the judge where a
    rerun can run) it is a verdict marked ``held_verdict``, and ``adopt_level`` then makes it the reference."""
    healthy = [2.3] * 5 + [0.04 + 0.001 * (i % 7) for i in range(40)]
    held = [1155.0, 1227.0, 503.0, 1847.0, 676.0, 1227.0, 930.0]
    untested = DivergenceDetector()
    for loss in healthy:
        untested.update(loss, 0.5)
    assert [untested.update(x, 40.0)[0] for x in held] == [False] * 7  # adopted on the third far step
    assert untested.loss_reference is not None
    assert untested.loss_reference > 100
    det = DivergenceDetector()
    det.test_held = True
    for loss in healthy:
        det.update(loss, 0.5)
    verdicts = [det.update(x, 40.0)[0] for x in held[:3]]
    assert verdicts == [False, False, True]
    assert det.held_verdict
    assert not det.thin_verdict
    assert det.beyond(held[2], 0.05)  # the restored state's loss on that batch: the model blew up, not the data
    det.adopt_level()  # (a new task's batch, as far for the restored state: the guard adopts it)
    assert not det.held_verdict
    assert [det.update(x, 40.0)[0] for x in held[3:]] == [False] * 4
    # an erratic far run is a divergence either way, never a held level
    erratic = DivergenceDetector()
    erratic.test_held = True
    for loss in healthy:
        erratic.update(loss, 0.5)
    assert [erratic.update(x, 40.0)[0] for x in (50.0, 5000.0, 600.0)] == [False, False, True]
    assert not erratic.held_verdict


def test_unsettled_before_is_the_state_of_the_run_before_its_far_values_began():
    """``unsettled_before``: the run had fewer than ``recent`` calm judged steps when the current far run began
    (the run's first steps, a restart after a rollback, or far values just before). A sudden jump out of a calm
    stretch is not; the far steps themselves never make it so."""
    det = DivergenceDetector()
    for _ in range(30):
        det.update(1.0, 1.0)
    assert [det.update(x, 1.0)[0] for x in (500.0, 5000.0, 50000.0)] == [False, False, True]
    assert det.unsettled
    assert not det.unsettled_before
    det.restart_runs()  # a rollback: the restored run is young again
    for _ in range(3):
        det.update(1.0, 1.0)
    det.update(500.0, 1.0)
    assert det.unsettled_before
    wobbly = DivergenceDetector()
    for i in range(30):
        wobbly.update(1.0 if i % 5 else 4.0, 1.0)  # a loss 4x its scale every 5th step: never 10 calm in a row
    wobbly.update(500.0, 1.0)
    assert wobbly.unsettled_before
    young = DivergenceDetector()
    for _ in range(6):
        young.update(1.0, 1.0)
    young.update(500.0, 1.0)
    assert young.unsettled_before  # the run's first steps: no calm stretch to speak of
    state = det.state_dict()
    again = DivergenceDetector()
    again.load_state_dict(state)
    assert again.unsettled_before == det.unsettled_before
    assert again.state_dict() == state
