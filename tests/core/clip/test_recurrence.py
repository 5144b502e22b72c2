"""Outliers that recur within the statistics' horizon are a component of the stream, not faults (issue 24).

An imbalanced binary classifier (0.2 % positives, ``pos_weight=neg/pos``, Adam) ended at a validation AUC of 0.50-0.69
under ``default_callbacks()`` against 0.97-0.99 without callbacks, with no event: once it predicted the majority class,
the ~6 % of batches holding a positive had gradient norms 100-10,000x the rest; the z-score clipper cut each to its
threshold and learned it as the threshold, so the statistics followed only the shrinking majority and the cut grew
with them. Now a step above the threshold that is the third or later of a chain, each within the statistics' horizon
(``1 / (1 - ema_decay)`` steps) of the previous with a calm step between, is still clipped at its step but learned as
measured (at most ``fallback_factor`` x the threshold). Isolated spikes and consecutive blow-ups are clipped as before;
NaN/inf and zero norms leave the chain as if they never came.

Streams are fed through ``clip_`` and ``commit`` as the callback does (``feed`` from test_clip_statistics), on both
of the z-score clipper's paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.core.clip import ZScoreClipper
from lightning_gradguard.core.clip._recurrence import RecurringOutliers
from tests.core.clip.test_clip_statistics import feed, noisy


@pytest.fixture(params=["host", "tensor"])
def path(request, monkeypatch):
    monkeypatch.setattr(ZScoreClipper, "host_fast_path", request.param == "host")
    return request.param


def spiked(gaps, n=900, size=100.0, seed=0, sd=0.1):
    """A steady stream (norms ~1, log-normal noise ``sd``) with a value ``size`` x at steps 100, 100 + gaps[0], ..."""
    norms = noisy(n, seed=seed, sd=sd)
    at, step = [], 100
    rng = np.random.default_rng(seed + 1)
    while step < n:
        at.append(step)
        step += int(rng.integers(*gaps))
    norms[at] *= size
    return norms, np.array(at)


def test_outliers_that_recur_are_learned_and_cut_less(path):
    norms, at = spiked((8, 30))  # every 8-29 steps: within the horizon (33 steps at ema_decay 0.97)
    thr, clipped, post = feed(ZScoreClipper(), norms)
    late = at[at > 300]
    # before: every one cut to the threshold (~1.3, a ~75x cut) for the whole run; now the statistics describe them
    assert np.median(norms[late] / post[late]) < 5
    assert np.median(thr[late]) > 10
    # before the first of them the stream is a steady one's, rarely clipped
    assert clipped[10:100].mean() < 0.1


def test_isolated_spikes_and_blow_ups_are_clipped_as_before(path):
    # the same spikes, further apart than the horizon, in a stream with no other step above the threshold: each is
    # cut to a threshold that never moves
    norms, at = spiked((40, 60), sd=0.02)
    thr, clipped, post = feed(ZScoreClipper(), norms)
    assert clipped[at].all()
    assert (norms[at] / post[at] > 50).all()
    assert thr[at].max() < 1.5
    # in a noisier stream the noise's own exceeders may chain with a spike: a spike so learned is still cut at its
    # step, enters at most 10x the threshold, and the threshold stays within an order of magnitude of the stream
    norms, at = spiked((40, 60))
    thr, clipped, post = feed(ZScoreClipper(), norms)
    assert clipped[at].all()
    assert (norms[at] / post[at] > 20).all()
    assert thr[100:].max() < 10 * np.median(thr[100:])
    # consecutive far values (a blow-up): no calm step between them, no chain
    norms = np.concatenate([noisy(100), np.full(60, 1e6)])
    thr, clipped, post = feed(ZScoreClipper(), norms)
    assert clipped[100:].all()
    assert thr[-1] < thr[99] * 1.01**60 * 1.01
    # bursts of far steps, calm between them but further apart than the horizon: no chain (within a chain, a burst's
    # steps after its first are never recurring either: no calm step between them)
    norms = noisy(400)
    for start in (150, 250, 350):  # bursts 100 steps apart: beyond the horizon
        norms[start : start + 5] = 1e4
    thr, clipped, post = feed(ZScoreClipper(), norms)
    assert (post[150:155] < 3).all()
    assert (post[350:355] < 3).all()


def test_host_and_tensor_paths_agree(monkeypatch):
    norms, _ = spiked((8, 30), n=500)
    out = {}
    for host in (True, False):
        monkeypatch.setattr(ZScoreClipper, "host_fast_path", host)
        out[host] = feed(ZScoreClipper(), norms)
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-9)
    np.testing.assert_array_equal(out[True][1], out[False][1])


def test_state_roundtrip_mid_chain_continues_identically(path):
    norms, at = spiked((8, 30), n=600)
    cut = int(at[at > 200][2]) + 3  # inside a chain
    a = ZScoreClipper()
    thr_a, _, _ = feed(a, norms)
    b = ZScoreClipper()
    feed(b, norms[:cut])
    state = b.state_dict()
    assert state["recurrence"]["chain"] >= 2
    c = ZScoreClipper()
    c.load_state_dict(state)
    thr_c, _, _ = feed(c, norms[cut:])
    np.testing.assert_allclose(thr_c, thr_a[cut:], rtol=1e-12)


def test_statistics_restart_forgets_the_chain(path):
    clipper = ZScoreClipper()
    norms, _ = spiked((8, 30), n=400)
    feed(clipper, norms)
    assert clipper.recurrence.chain >= 2
    assert clipper.rebase([1.0, 1.1, 0.9, 1.0])
    assert int(clipper.recurrence.chain) == 0
    assert math.isinf(float(clipper.recurrence.gap))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.booleans(), st.booleans()),
        min_size=1,
        max_size=120,
    ),
    st.floats(min_value=1.0, max_value=50.0),
)
def test_host_and_tensor_chains_agree_on_any_sequence(steps, horizon):
    host, dev = RecurringOutliers(horizon), RecurringOutliers(horizon)
    dev.to_tensor(torch.device("cpu"))
    for over, calm, present in steps:
        assert bool(host.recurring(over)) == bool(dev.recurring(torch.tensor(over)))
        host.update(over, calm and not over, present)
        dev.update(torch.tensor(over), torch.tensor(calm and not over), torch.tensor(present))
        assert float(host.gap) == float(dev.gap)
        assert int(host.chain) == int(dev.chain)
        assert bool(host.calm) == bool(dev.calm)


def test_nan_and_zero_norms_leave_the_chain_as_if_absent(path):
    norms, _ = spiked((8, 30), n=600)
    holed = norms.copy()
    holes = np.arange(150, 600, 7)
    holed[holes[::2]] = 0.0
    holed[holes[1::2]] = np.nan
    thr_holed, _, _ = feed(ZScoreClipper(), holed)
    thr_clean, _, _ = feed(ZScoreClipper(), np.delete(norms, holes))
    kept = np.ones(600, bool)
    kept[holes] = False
    np.testing.assert_allclose(thr_holed[kept], thr_clean, rtol=1e-12)


def test_garbage_state_loads_as_no_chain():
    r = RecurringOutliers(33.0)
    r.load_state_dict({"gap": float("nan"), "chain": -4, "calm": 1})
    assert math.isinf(r.gap)
    assert r.chain == 0
    assert not r.recurring(True)
