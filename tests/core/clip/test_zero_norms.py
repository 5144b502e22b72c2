"""Zero (and tiny) gradient norms never make a threshold of 0 stand (issue 24).

A masked or empty batch, a loss multiplied by 0, a margin loss already satisfied: the gradient norm is exactly 0. It
says nothing about how large a healthy gradient is. A warm-up of such steps used to give a median of 0, a threshold of
0 and, through the growth limit (1 % above 0 is 0), a threshold of 0 for ever: every later gradient scaled to 0.

Streams are fed one step at a time through ``clip_`` and ``commit`` as the callback does; the z-score clipper runs on
both of its paths (Python floats, scalar tensors), which must agree.
"""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradguard.core.clip import PercentileClipper, ZScoreClipper
from lightning_gradguard.core.clip._thresholds import TINY_NORM
from lightning_gradguard.core.clip._warmup import WarmupReference
from lightning_gradguard.core.measure._grad_stats import compute_grad_stats


@pytest.fixture(params=["host", "tensor"])
def path(request, monkeypatch):
    monkeypatch.setattr(ZScoreClipper, "host_fast_path", request.param == "host")
    return request.param


def feed(clipper, norms):
    """Thresholds in force, scale factors applied (post / pre), and warm-up flags, one per value of ``norms``."""
    thresholds, factors, warm = [], [], []
    for v in norms:
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        p.grad = torch.tensor([float(v)], dtype=torch.float64)
        rec = clipper.clip_(compute_grad_stats([p]))
        thresholds.append(float(rec.threshold))
        factors.append(abs(float(p.grad)) / v if v > 0 and math.isfinite(v) else 1.0)
        warm.append(bool(rec.warmup))
        clipper.commit()
    return np.array(thresholds), np.array(factors), np.array(warm)


def healthy(n, scale=5.0, seed=0):
    return scale * np.exp(np.random.default_rng(seed).normal(0.0, 0.2, n))


CLIPPERS = {
    "zscore": ZScoreClipper,
    "percentile-window": lambda: PercentileClipper(),
    "percentile-histogram": lambda: PercentileClipper(percentile_estimator="histogram"),
}


@pytest.mark.parametrize("name", list(CLIPPERS))
@pytest.mark.parametrize("zero", [0.0, 1e-40, 1e-35])  # zero, float32-subnormal scale, near it
def test_a_warm_up_of_zero_norms_never_sets_a_threshold_of_zero(path, name, zero):
    norms = np.concatenate([np.full(15, zero), healthy(200)])
    thr, factors, warm = feed(CLIPPERS[name](), norms)
    assert (thr > 0).all()
    after = ~warm
    assert after[15:].sum() >= 180  # the warm-up took 10 real norms, not 15 zeros
    assert not warm[-1]
    assert (factors[after] >= 0.1).all()  # after the warm-up no step is scaled by more than 10x
    assert (factors[after] == 1.0).mean() > 0.8 if name == "zscore" else True
    assert 3.0 < thr[-1] < 20.0  # the run's own scale (healthy norms ~5)


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_zero_norm_steps_after_the_warm_up_are_not_learned(path, name):
    """Every third batch masked: the zeros neither drag the statistics down nor count as steps of the warm-up."""
    norms = healthy(300)
    masked = norms.copy()
    masked[::3] = 0.0
    thr, factors, warm = feed(CLIPPERS[name](), masked)
    assert (thr > 0).all()
    assert (factors[~warm] >= 0.1).all()
    clean_thr, _, _ = feed(CLIPPERS[name](), np.delete(norms, np.s_[::3]))
    if name == "zscore":  # the threshold sequence is the clean stream's, repeated at each zero step
        kept = np.ones(300, bool)
        kept[::3] = False
        np.testing.assert_allclose(thr[kept], clean_thr, rtol=1e-12)


def test_host_and_tensor_paths_agree_on_zeros(monkeypatch):
    norms = np.concatenate([np.zeros(12), healthy(30), [0.0, 0.0], healthy(30, seed=1), [1e-40], healthy(10, seed=2)])
    runs = []
    for host in (True, False):
        monkeypatch.setattr(ZScoreClipper, "host_fast_path", host)
        runs.append(feed(ZScoreClipper(), norms))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)  # (the two paths may differ in the last bit)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-9)
    np.testing.assert_array_equal(runs[0][2], runs[1][2])  # the warm-up ends at the same step


def test_a_relatively_tiny_norm_is_not_learned(path):
    """A loss multiplied by 1e-9 for a stretch, after the statistics settled: those norms are not learned."""
    norms = healthy(200)
    tiny = norms.copy()
    tiny[60:120] *= 1e-9
    thr, factors, warm = feed(ZScoreClipper(), tiny)
    ref, _, _ = feed(ZScoreClipper(), np.delete(norms, np.s_[60:120]))
    np.testing.assert_allclose(thr[120:], ref[60:], rtol=1e-12)
    assert (factors[~warm] >= 0.1).all()


def test_nan_steps_still_count_as_warm_up_steps_and_zeros_do_not():
    w = WarmupReference(size=3, factor=10.0)
    for v in (0.0, math.nan, 2.0, 0.0, 1e-35):
        w.add(v)
    assert (w.filled(), w.count(), w.median()) == (2, 1, 2.0)
    w.add(4.0)
    assert (w.filled(), w.count(), w.median()) == (3, 2, 2.0)
    w.add(8.0)  # the window slides (it keeps the last 3 slots): the empty NaN slot leaves it
    assert (w.filled(), w.count(), w.median()) == (3, 3, 4.0)
    t = WarmupReference(size=3, factor=10.0)
    for v in (0.0, math.nan, 2.0, 0.0, 1e-35, 4.0, 8.0):
        t.add(torch.tensor(v, dtype=torch.float64))
    assert (t.filled(), int(t.count()), float(t.median())) == (3, 3, 4.0)
    assert t.state_dict() == w.state_dict() == {"values": [2.0, 4.0, 8.0], "pos": 4, "empty": []}


def test_resume_inside_a_warm_up_that_waits_for_real_norms(path):
    norms = np.concatenate([np.zeros(14), healthy(60)])
    for cut in (5, 12, 16, 20):
        a = ZScoreClipper()
        feed(a, norms[:cut])
        b = ZScoreClipper()
        b.load_state_dict(a.state_dict())
        ta, fa, wa = feed(a, norms[cut:])
        tb, fb, wb = feed(b, norms[cut:])
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(wa, wb)


def test_statistics_of_zeros_from_an_older_version_warm_up_again():
    """A checkpoint written before this fix by a run whose warm-up saw only zeros: mean 0, limit 0."""
    old = {
        "method": "zscore",
        "seen": 40,
        "limit": 0.0,
        "warmup": {"values": [0.0] * 10, "pos": 10},
        "mean": 0.0,
        "var": 0.0,
        "count": 40,
    }
    z = ZScoreClipper()
    z.load_state_dict(old)
    thr, factors, warm = feed(z, healthy(40))
    assert warm[:10].all()
    assert not warm[10:].any()
    assert (thr > 0.5).all()
    assert (factors[10:] >= 0.1).all()
    p = PercentileClipper()
    p.load_state_dict({"method": "percentile", "seen": 40, "limit": 0.0, "warmup": {"values": [0.0] * 10, "pos": 10}})
    thr, _, _ = feed(p, healthy(5))
    assert (thr > 0).all()  # nothing learned yet: the fallback, not 0


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.sampled_from([0.0, 1e-45, 1e-38, 1e-30, 1e-12, 1e30, math.nan, math.inf]),
            st.floats(1e-3, 1e3),
        ),
        min_size=1,
        max_size=80,
    ),
    name=st.sampled_from(list(CLIPPERS)),
    host=st.booleans(),
)
def test_no_threshold_in_force_is_ever_zero_or_nan(values, name, host):
    ZScoreClipper.host_fast_path = host
    try:
        thr, factors, _ = feed(CLIPPERS[name](), np.array(values))
    finally:
        ZScoreClipper.host_fast_path = True
    assert not np.isnan(thr).any()
    assert (thr > TINY_NORM).all()
    assert np.isfinite(factors).all()
    assert (factors > 0).all()  # nothing is ever scaled to 0


# ---------------------------------------------------------------------------------------------- through a Trainer


class MaskedRegression:
    """Built lazily (Lightning imports are slow): a linear regression whose loss is multiplied by 0 for the first
    ``masked`` batches (zero gradients), trained to its noise floor."""

    @staticmethod
    def make(masked: int, optimizer: str):
        import lightning.pytorch as pl

        from tests.models import loader

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Linear(8, 1)

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = nn.functional.mse_loss(self.net(x), y)
                return loss * 0.0 if self.global_step < masked else loss

            def configure_optimizers(self):
                if optimizer == "adam":
                    return torch.optim.Adam(self.parameters(), lr=0.05)
                return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

            def train_dataloader(self):
                return loader(n=64, batch_size=8)

        return Module()


def _fit(callbacks, optimizer: str) -> float:
    from tests.models import loader, make_trainer

    torch.manual_seed(0)
    model = MaskedRegression.make(15, optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        make_trainer(tmp, callbacks, max_steps=400, logger=False).fit(model)
    x, y = (torch.cat(t) for t in zip(*loader(n=64, batch_size=8)))
    with torch.no_grad():
        return float(nn.functional.mse_loss(model.net(x), y))


@pytest.mark.parametrize("method", ["zscore", "percentile"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_fit_whose_first_15_batches_are_masked_learns_as_without_clipping(method, optimizer):
    from lightning.pytorch import Callback

    from lightning_gradguard import AdaptiveGradientClipping

    class Factors(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[float, float, bool]] = []

        def on_before_optimizer_step(self, trainer, pl_module, opt):
            rec = clip.last[0]
            self.rows.append((float(rec.grad_norm), float(rec.coefficient), bool(rec.warmup)))

    clip = AdaptiveGradientClipping(method)
    probe = Factors()
    guarded = _fit([clip, probe], optimizer)
    plain = _fit([], optimizer)
    assert guarded <= plain * 1.02
    after = [(n, c) for n, c, w in probe.rows if not w]
    assert len(after) >= 370
    assert all(c >= 0.1 for n, c in after if n > 0)  # no step scaled by more than 10x after the warm-up
