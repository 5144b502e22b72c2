"""The adaptive clippers' warm-up ends only when its reference is settled (issue 24: explosion at initialisation).

A deep plain network whose initialisation explodes starts with gradient norms of 100s that fall by orders of magnitude
within a few dozen steps as the capped updates tame it. A warm-up that learned its reference from those first steps
started the statistics ~100x above where the run settles, and its threshold never clipped the run's later norms.
The warm-up's window now slides until the medians of its older and newer halves agree (within sqrt(10): less than an
order of magnitude across the window), or for at most ``MAX_WARMUP_FACTOR`` x ``warmup_steps`` steps; and during
those steps, after the start, a fall of the window's level (its halves an order of magnitude apart: a transient as
flat as a steady run while it lasts, then ending) resumes the warm-up. A steady stream ends it after exactly
``warmup_steps`` steps, as before.

Streams are fed one step at a time through ``clip_`` and ``commit`` as the callback does; the z-score clipper runs on
both of its paths (Python floats, scalar tensors), which must agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_gradguard.core.clip import PercentileClipper, ZScoreClipper
from lightning_gradguard.core.clip._warmup import MAX_WARMUP_FACTOR, WarmupReference
from lightning_gradguard.core.measure._grad_stats import compute_grad_stats


@pytest.fixture(params=["host", "tensor"])
def path(request, monkeypatch):
    monkeypatch.setattr(ZScoreClipper, "host_fast_path", request.param == "host")
    return request.param


def feed(clipper, norms):
    """Thresholds in force, post-clip norms and warm-up flags, one per value of ``norms``."""
    thresholds, post, warm = [], [], []
    for v in norms:
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        p.grad = torch.tensor([float(v)], dtype=torch.float64)
        rec = clipper.clip_(compute_grad_stats([p]))
        thresholds.append(float(rec.threshold))
        post.append(abs(float(p.grad)))
        warm.append(bool(rec.warmup))
        clipper.commit()
    return np.array(thresholds), np.array(post), np.array(warm)


def noisy(n, seed=0, sd=0.1):
    return np.exp(np.random.default_rng(seed).normal(0.0, sd, n))


STEADY = 150


def flat_transient():
    """100x the steady level for the first 10 steps (exactly one warm-up window), then steady around 1."""
    return np.concatenate([100.0 * noisy(10, seed=1), noisy(STEADY)])


def falling_transient():
    """From 100x the steady level down to it over 15 steps (exploding initial norms being tamed), then steady."""
    return np.concatenate([100.0 ** np.linspace(1.0, 0.0, 15, endpoint=False) * noisy(15, seed=1), noisy(STEADY)])


CLIPPERS = {
    "zscore": ZScoreClipper,
    "zscore-uncapped": lambda: ZScoreClipper(fallback_max_norm=None),
    "percentile": lambda: PercentileClipper(),
}


@pytest.mark.parametrize("name", list(CLIPPERS))
@pytest.mark.parametrize("stream", [flat_transient, falling_transient])
def test_a_transient_of_exploding_norms_is_not_the_reference(path, name, stream):
    norms = stream()
    thr, post, warm = feed(CLIPPERS[name](), norms)
    steady = slice(len(norms) - STEADY + 30, None)  # 30 steps into the steady stretch
    assert not warm[steady].any()
    assert 0.8 < np.median(thr[steady]) < 2.0  # near the steady level (~1), not the transient's (~100)
    if name != "zscore-uncapped":
        assert (post[:10] <= 1.0 + 1e-9).all()  # the fallback cap clipped the transient throughout
    if name.startswith("zscore"):
        later = noisy(STEADY, seed=5)
        later[40] = 10.0  # a 10x spike in the steady stretch is clipped (it was not, from a reference of ~100)
        thr2, post2, _ = feed_after(CLIPPERS[name](), norms, later)
        assert post2[40] < 2.0


def feed_after(clipper, first, then):
    feed(clipper, first)
    return feed(clipper, then)


@pytest.mark.parametrize("warmup_steps", [6, 10, 25])
@pytest.mark.parametrize("cls", [ZScoreClipper, PercentileClipper])
@pytest.mark.parametrize(("scale", "sd"), [(1.0, 0.1), (50.0, 0.3)])
def test_a_steady_stream_ends_the_warm_up_after_exactly_warmup_steps(path, warmup_steps, cls, scale, sd):
    _, _, warm = feed(cls(warmup_steps=warmup_steps), scale * noisy(20 * warmup_steps, sd=sd))
    assert warm[:warmup_steps].all()
    assert not warm[warmup_steps:].any()  # and no later restart: the level never fell


def test_a_flat_transient_starts_then_resumes_the_warm_up(path):
    """A plateau as long as the window looks steady while it lasts: the statistics start from it, and the fall of
    the window's level that follows resumes the warm-up until the window settles at the new level."""
    thr, _, warm = feed(ZScoreClipper(), flat_transient())
    assert warm[:10].all()
    assert not warm[10]  # the plateau looked steady ...
    assert thr[10] > 50.0
    assert warm[11:25].any()  # ... until the fall: the fallback (capped at 1.0) is back in force
    assert (thr[warm] <= 1.0).all()
    assert not warm[30:].any()


def test_the_warm_up_ends_at_the_bound_however_the_norm_trends(path):
    """A norm that falls by 10x every 4 steps never settles: the warm-up ends after MAX_WARMUP_FACTOR x
    warmup_steps steps regardless, and no probation follows."""
    norms = np.concatenate([1e14 * 10.0 ** (-np.arange(110) / 4.0), 1e-13 * noisy(60)])
    bound = MAX_WARMUP_FACTOR * 10
    for clipper in (ZScoreClipper(fallback_max_norm=None), PercentileClipper(fallback_max_norm=None)):
        _, _, warm = feed(clipper, norms)
        assert warm[:bound].all()
        assert not warm[bound:].any()


@pytest.mark.parametrize("stream", [flat_transient, falling_transient])
def test_host_and_tensor_paths_agree(monkeypatch, stream):
    norms = stream()
    norms[[3, 40]] = [math.nan, math.inf]
    norms[[5, 12, 60]] = 0.0
    runs = []
    for host in (True, False):
        monkeypatch.setattr(ZScoreClipper, "host_fast_path", host)
        runs.append(feed(ZScoreClipper(), norms))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-9)
    np.testing.assert_array_equal(runs[0][2], runs[1][2])  # the warm-up ends (and resumes) at the same steps


@pytest.mark.parametrize("stream", [flat_transient, falling_transient])
@pytest.mark.parametrize("resume_on", ["host", "tensor"])
def test_resume_inside_the_settling_and_the_probation(monkeypatch, stream, resume_on):
    """A checkpoint at any step (window still unsettled, just started, in probation, after it) resumes exactly,
    also from the host path onto the tensor path."""
    norms = stream()
    monkeypatch.setattr(ZScoreClipper, "host_fast_path", True)
    whole = feed(ZScoreClipper(), norms)
    for cut in (5, 11, 14, 18, 24, 60, 120):
        monkeypatch.setattr(ZScoreClipper, "host_fast_path", True)
        for cls in (ZScoreClipper, PercentileClipper):
            a = cls()
            feed(a, norms[:cut])
            b = cls()
            b.load_state_dict(a.state_dict())
            monkeypatch.setattr(ZScoreClipper, "host_fast_path", resume_on == "host")
            ta, _, wa = feed(a, norms[cut:])
            tb, _, wb = feed(b, norms[cut:])
            np.testing.assert_allclose(tb, ta, rtol=1e-12)
            np.testing.assert_array_equal(wb, wa)
            if cls is ZScoreClipper:
                np.testing.assert_allclose(tb, whole[0][cut:], rtol=1e-12)
            monkeypatch.setattr(ZScoreClipper, "host_fast_path", True)


def test_older_checkpoints_load():
    """States written before the sliding window: the first values of the run, no ``empty`` and no ``probation``."""
    started = {
        "method": "zscore",
        "seen": 400,
        "started": True,
        "limit": 1.3,
        "warmup": {"values": [100.0] * 9, "pos": 10},  # one NaN step among the first ten
        "mean": 1.0,
        "var": 0.01,
        "count": 399,
    }
    z = ZScoreClipper()
    z.load_state_dict(started)
    thr, _, warm = feed(z, noisy(50))
    assert not warm.any()  # a run started by the older rule is not second-guessed after a resume
    assert (thr < 1.5).all()
    inside = {"method": "zscore", "seen": 4, "limit": 1000.0, "warmup": {"values": [100.0] * 4, "pos": 4}}
    for cls in (ZScoreClipper, PercentileClipper):
        c = cls()
        c.load_state_dict({**inside, "method": cls.method})
        thr, _, warm = feed(c, noisy(60))
        assert warm[:6].all()  # the window, of 100s and then 1s, has to settle first
        assert not warm[30:].any()
        assert (thr[30:] < 2.0).all()


def test_window_round_trip_keeps_the_empty_slots_in_place():
    w = WarmupReference(size=6, factor=10.0)
    for v in (5.0, math.nan, 4.0, 0.0, 6.0, math.inf, 5.5, 4.5):
        w.add(v)
    state = w.state_dict()
    assert state == {"values": [4.0, 6.0, 5.5, 4.5], "pos": 7, "empty": [0, 3]}  # the last 6 slots, oldest first
    assert state["pos"] == 7  # the zero took no slot
    t = WarmupReference(size=6, factor=10.0)
    t.load_state_dict(state)
    t.to_tensor(torch.device("cpu"))
    for v in (5.0, 4.8):
        w.add(v)
        t.add(torch.tensor(v, dtype=torch.float64))
    assert t.state_dict() == w.state_dict()
    assert t.progress() == w.progress() == (9, True, False)
    assert float(t.median()) == w.median()
