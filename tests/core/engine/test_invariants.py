"""Invariants of the guard's own arithmetic, property-tested on random loss and norm streams (issue 24).

Streams mix zeros, negatives, 1e-30 ... 1e30, NaN/inf, noise, ramps and level steps. The invariants:

- no exception from the guard's own arithmetic, ever (a halt is the guard's decision, not a crash);
- the LR is never cut below ``min_lr_scale`` of the user's LR, and never to 0;
- no rule's reference is a single batch: whatever the first loss (0, tiny, negative, huge), a steady level after it is
  never called divergence and never makes the stability controller act;
- a fault step's own statistics (an inf loss with a huge finite gradient) never mark the run unsettled;
- each optimizer's loss is its own stream: a second objective that starts late, 100x larger, is never a jump.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_gradguard import DivergenceError, GradGuard
from lightning_gradguard.core.guard import GuardPolicy, StepHealth
from lightning_gradguard.core.guard._divergence import DivergenceDetector
from lightning_gradguard.core.guard._stability import StabilityController
from lightning_gradguard.core.recover._rules import cut_scale, recover_lr

SPECIALS = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, math.nan, math.inf, -math.inf, 1e-300, 5e-324]
value = st.one_of(
    st.sampled_from(SPECIALS),
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False),
    st.floats(min_value=1e-6, max_value=1e3),
)


@st.composite
def stream(draw, min_size: int = 1, max_size: int = 300) -> list[float]:
    """Pieces of noise, ramps, level steps and raw values, concatenated."""
    out: list[float] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["raw", "noise", "ramp", "level"]))
        n = draw(st.integers(1, 60))
        base = draw(value)
        if kind == "raw":
            out += draw(st.lists(value, min_size=1, max_size=n))
        elif kind == "noise":
            rng = draw(st.randoms(use_true_random=False))
            out += [base * (1 + 0.5 * rng.gauss(0, 1)) for _ in range(n)]
        elif kind == "ramp":
            out += [base * i / n for i in range(n)]
        else:
            out += [base] * n
    return out[:max_size] if len(out) >= min_size else out + [1.0] * (min_size - len(out))


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    losses=stream(),
    norms=stream(),
    lrs=stream(),
    clips=st.lists(st.booleans(), max_size=300),
    shares=stream(),  # the share of vanished gradients, given while asked for: any float, in [0, 1] or not
)
def test_detectors_never_raise_and_their_state_round_trips(losses, norms, lrs, clips, shares):
    det, ctl = DivergenceDetector(), StabilityController(window=5)
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        flags = det.update(loss, norm)
        assert all(isinstance(f, bool) for f in flags)
        lr = lrs[i % len(lrs)]
        share = shares[i % len(shares)] if ctl.wants_vanished else None
        ctl.update(loss, norm, clipped=bool(clips[i % len(clips)]) if clips else False, lr=lr, vanished=share)
    det2, ctl2 = DivergenceDetector(), StabilityController(window=5)
    det2.load_state_dict(det.state_dict())
    ctl2.load_state_dict(ctl.state_dict())
    assert det2.state_dict() == det.state_dict()
    assert ctl2.state_dict() == ctl.state_dict()


@FAST
@given(
    first=st.one_of(st.sampled_from([0.0, 1e-30, 1e-6, -5.0, 1e30, 3.0]), st.floats(-1e6, 1e6)),
    level=st.one_of(st.sampled_from([0.0, 1e-6, -2.0, 1e12]), st.floats(-1e6, 1e6)),
    noise=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**16),
)
def test_no_rule_takes_a_single_batch_as_its_reference(first, level, noise, seed):
    import random

    rng = random.Random(seed)
    steady = [level * (1 + noise * rng.uniform(-1, 1)) for _ in range(400)]
    det, ctl = DivergenceDetector(), StabilityController()
    flagged = [i for i, loss in enumerate([first, *steady]) if det.update(loss, 1.0)[0]]
    assert flagged == [], (first, level)
    acted = [f for f in (ctl.update(loss, 1.0, False, lr=1e-3) for loss in [first, *steady]) if f and f.act]
    assert acted == [], (first, level, acted)


@FAST
@given(healthy=st.lists(st.floats(0.01, 10.0), min_size=20, max_size=200), huge=st.floats(1e6, 1e300))
def test_a_fault_steps_own_statistics_never_unsettle_the_run(healthy, huge):
    det, clean = DivergenceDetector(), DivergenceDetector()
    for i, loss in enumerate(healthy):
        det.update(loss, 1.0)
        clean.update(loss, 1.0)
        if i % 7 == 3:  # a corrupt label: the loss is inf, the gradient finite and enormous
            assert det.update(math.inf, huge) == (False, False)
            assert det.update(math.nan, huge) == (False, False)
        # the fault steps moved nothing: the same baselines and the same verdict as without them
        assert det.unsettled == clean.unsettled
        assert det.grad_reference == clean.grad_reference


@FAST
@given(
    scale=st.floats(1e-300, 1.0),
    factor=st.floats(1e-6, 1.0, exclude_min=False),
    power=st.integers(-3, 10_000),
    floor=st.floats(0.0, 1.0),
)
def test_cuts_never_reach_zero_nor_go_below_the_floor(scale, factor, power, floor):
    out = cut_scale(scale, factor, power, floor)
    assert 0 < out <= scale
    assert out >= min(floor, scale)
    assert math.isfinite(out)


@FAST
@given(scale=st.floats(1e-300, 1.0), factor=st.floats(1e-6, 1.0))
def test_a_recovered_lr_climbs_back_but_never_above_the_schedule(scale, factor):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=scale)  # the user's LR 1.0, cut to ``scale``
    out = recover_lr([opt], [], scale, factor)
    assert scale <= out <= 1.0
    assert opt.param_groups[0]["lr"] == pytest.approx(out, rel=1e-9)


@FAST
@given(faults=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 400)), max_size=60))
def test_the_policy_never_raises_and_keeps_its_budget_in_bounds(faults):
    policy = GuardPolicy("auto", max_rollbacks=3, refill_steps=200)
    step = 0
    kinds = ["nonfinite_loss", "nonfinite_grad", "nonfinite_params", "loss_divergence", "grad_divergence", "other"]
    for kind, gap in faults:
        for _ in range(gap):
            policy.healthy()
        step += gap
        health = StepHealth(step)
        if kinds[kind] != "other":
            setattr(health, kinds[kind], True)
        else:
            health.other_rank = True
        decision = policy.decide(health, can_roll_back=True)
        assert 0 <= decision.lr_power <= 64
        assert 0 <= policy.rollbacks <= policy.max_rollbacks


def _crafted_loss(p: torch.nn.Parameter, loss: float, norm: float) -> torch.Tensor:
    """A loss whose value is ``loss`` and whose gradient has norm ``norm`` (both may be non-finite)."""
    d = p.numel()
    shaped = (p - p.detach()).sum() * (norm / math.sqrt(d) if math.isfinite(norm) else norm)
    return shaped + torch.tensor(loss, dtype=torch.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(losses=stream(min_size=20, max_size=250), norms=stream(min_size=20, max_size=250))
def test_a_plain_loop_on_any_stream_never_crashes_and_never_cuts_below_the_floor(losses, norms):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4))
    model = torch.nn.Module()
    model.p = p
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.9)
    guard = GradGuard(model, opt, sched, clipping="zscore", min_lr_scale=1e-3, snapshot_every_n_steps=5)
    try:
        for i in range(min(len(losses), len(norms))):
            opt.zero_grad(set_to_none=True)
            _crafted_loss(p, losses[i], abs(norms[i])).backward()
            loss = losses[i]
            if guard.before_step(loss):
                opt.step()
            guard.after_step()
            sched.step()
    except DivergenceError:
        pass  # a halt is a decision, with its message; anything else is a crash
    finally:
        guard.close()
    assert guard.lr_scale >= 1e-3
    lr = opt.param_groups[0]["lr"]
    assert lr > 0
    assert lr >= 1e-3 * 0.1 * 0.9 ** (len(losses) // 50 + 1) * (1 - 1e-9)


def test_stream_generator_makes_every_kind():  # the strategy above really mixes zeros, negatives and non-finites
    seen = {"zero": False, "neg": False, "nonfinite": False, "huge": False}

    @settings(max_examples=200, deadline=None)
    @given(s=stream())
    def probe(s):
        seen["zero"] |= any(v == 0 for v in s)
        seen["neg"] |= any(v < 0 for v in s)
        seen["nonfinite"] |= any(not math.isfinite(v) for v in s)
        seen["huge"] |= any(abs(v) >= 1e29 for v in s if math.isfinite(v))

    probe()
    assert all(seen.values()), seen


pytestmark = pytest.mark.filterwarnings("ignore")
