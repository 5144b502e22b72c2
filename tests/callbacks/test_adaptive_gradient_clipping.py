"""AdaptiveGradientClipping in real fits: thresholds against independent references, spikes, NaN, resume, several
optimizers, manual optimization, accumulation, TensorBoard tags read back, validation."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from torch import nn

from lightning_gradguard import AdaptiveGradientClipping
from tests.models import TinyRegression, loader, make_trainer

# ------------------------------------------------------------------------------------------------------- helpers


class Recorder(pl.Callback):
    """Placed after the clipper: records what it did at each step, and the gradients after clipping."""

    def __init__(self, clipper: AdaptiveGradientClipping) -> None:
        self.clipper = clipper
        self.rows: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from lightning_gradguard.callbacks._step_context import optimizer_index

        idx = optimizer_index(trainer, optimizer)
        rec = self.clipper.last[idx]
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        post = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.rows.append(
            {
                "opt": idx,
                "global_step": trainer.global_step,
                "step": rec.step,
                "warmup": rec.warmup,
                "norm": float(rec.grad_norm),
                "threshold": None if rec.threshold is None else float(rec.threshold),
                "clipped": bool(rec.clipped),
                "post": float(post),
                "z": None if rec.zscore is None else float(rec.zscore),
                "mean": None if rec.stat_mean is None else float(rec.stat_mean),
                "grads": [p.grad.detach().clone() for p in params],
            }
        )


class GradSnapshot(pl.Callback):
    """Placed before the clipper: the gradients as the clipper receives them."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])


class SkipNonFinite(pl.Callback):
    """A minimal stand-in for NaNGuard's skip (set every grad to None) so that the run goes on after a NaN."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not all(bool(torch.isfinite(p.grad).all()) for p in params):
            for p in params:
                p.grad = None


def seeded(cls=TinyRegression, **kw):
    """A model whose initial weights do not depend on what ran before (runs to compare start identical)."""
    torch.manual_seed(0)
    return cls(**kw)


def fit(tmp_path, clipper, model=None, max_steps=20, before=(), after=(), **kw):
    """Fit with ``before`` callbacks, the clipper, a Recorder, then ``after`` callbacks (in that hook order)."""
    rec = Recorder(clipper)
    trainer = make_trainer(tmp_path, [*before, clipper, rec, *after], max_steps=max_steps, **kw)
    trainer.fit(model or seeded())
    return trainer, rec.rows


def zscore_reference(norms, z=2.5, decay=0.97, warmup=10, factor=10.0, cap=1.0):
    """Thresholds of the zscore method, recomputed from the pre-clip norms with plain Python floats (the records
    hold float32 norms, the clipper decides on float64 ones: compare at rel=1e-6).

    Warm-up: threshold ``min(factor * lower median, cap)`` of the norms so far (``cap`` alone before any); what the
    warm-up learns ignores the cap: a norm above ``factor * median`` is counted as that median, any other as itself,
    and the growth limit follows ``factor * median``. Then an EMA started from their median and MAD, weight
    ``max(1 - decay, 1 / n)``, std floored at 5 % of the mean, at most 1 % above the last threshold.
    """
    warm, out = [], []
    mean = var = 0.0
    n, limit = 0, math.inf
    size = max(1, warmup)
    for step, g in enumerate(norms):
        med = ref = None
        if step < size:
            kept = sorted(warm)
            med = kept[(len(kept) - 1) // 2] if kept else None
            ref = factor * med if med is not None else math.inf
            thr = min(ref, cap)
        elif n == 0:
            thr = cap
        else:
            std = max(math.sqrt(max(var, 0.0)), 0.05 * abs(mean) + 1e-12)
            thr = min(mean + z * std, limit * 1.01)
        out.append(thr)
        x = min(g, thr) if math.isfinite(g) else None
        if step < size:
            if x is not None:  # above factor x the median: the median is added, not the norm (nor any threshold)
                warm.append(g if g <= ref else med)
            if step == size - 1 and warm:
                kept = sorted(warm)
                mean = kept[(len(kept) - 1) // 2]
                dev = sorted(abs(v - mean) for v in warm)
                var, n = (1.4826 * dev[(len(dev) - 1) // 2]) ** 2, len(warm)
        elif x is not None:
            n += 1
            a = max(1 - decay, 1 / n)
            diff = x - mean
            mean, var = mean + a * diff, (1 - a) * (var + a * diff * diff)
        bound = ref if step < size else thr
        if math.isfinite(bound):
            limit = bound
    return out


@pytest.fixture(params=["host", "tensor"])
def zpath(request, monkeypatch):
    """Runs a z-score fit on the CPU float fast path and on the tensor path that accelerators use."""
    from lightning_gradguard.core.clip import ZScoreClipper

    monkeypatch.setattr(ZScoreClipper, "host_fast_path", request.param == "host")
    return request.param


def scalars(tmp_path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


# -------------------------------------------------------------------------------------------- threshold values


def test_zscore_thresholds_match_reference_and_clip_to_threshold(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", warmup_steps=3, z_threshold=1.0)
    _, rows = fit(tmp_path, cb, seeded(lr=0.05), max_steps=30)
    norms = [r["norm"] for r in rows]
    ref = zscore_reference(norms, z=1.0, warmup=3)
    assert rows[0]["threshold"] == 1.0  # nothing seen yet: the default fallback_max_norm guards the first step
    assert [r["threshold"] for r in rows] == pytest.approx(ref, rel=1e-6)
    assert any(r["clipped"] for r in rows[3:])
    for r in rows:
        expected = min(r["norm"], r["threshold"])
        assert r["post"] == pytest.approx(expected, rel=1e-5)
        assert r["clipped"] == (r["norm"] > r["threshold"])


def test_zscore_clip_to_mean(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", z_threshold=0.5, clip_to="mean", warmup_steps=2, ema_decay=0.9)
    _, rows = fit(tmp_path, cb, max_steps=16)
    clipped = [r for r in rows[2:] if r["clipped"]]
    assert clipped, "z=0.5 must clip some steps"
    # a step clipped to the mean has a post-clip norm below its threshold and equal to the mean before the step
    for r in clipped:
        assert r["post"] < r["threshold"]
        assert r["post"] == pytest.approx(r["mean"], rel=1e-5)
    # the statistics were fed min(norm, threshold): the EMA mean stays below the largest threshold
    assert cb._slots[0].clipper.state_dict()["mean"] < max(r["threshold"] for r in rows[2:])


@pytest.mark.parametrize("estimator", ["window", "histogram"])
def test_percentile_thresholds_match_numpy(tmp_path, estimator):
    cb = AdaptiveGradientClipping(
        "percentile", percentile=25.0, window=6, warmup_steps=4, percentile_estimator=estimator
    )
    _, rows = fit(tmp_path, cb, max_steps=20)
    norms = [r["norm"] for r in rows]
    limit = math.inf
    for i, r in enumerate(rows):
        bound = r["threshold"]
        if i == 0:
            assert r["threshold"] == 1.0  # the default fallback_max_norm
            bound = math.inf
        elif i < 4:  # warm-up: min(10 x the lower median of the norms seen, 1.0); the growth limit follows the former
            assert all(t["norm"] <= 10 * min(norms[:k]) for k, t in enumerate(rows[:i]) if k)  # all learned as is
            kept = sorted(norms[:i])
            bound = 10 * kept[(i - 1) // 2]
            assert r["threshold"] == pytest.approx(min(bound, 1.0), rel=1e-6)
        elif estimator == "window":  # numpy's percentile of the window, risen at most 1 % over the last threshold
            expected = min(np.percentile(norms[max(0, i - 6) : i], 25.0), limit * 1.01)
            assert r["threshold"] == pytest.approx(expected, rel=1e-6)
        else:  # decayed histogram: same regime, within its bucket resolution and decay
            lo, hi = min(norms[:i]), max(norms[:i])
            assert lo / 1.16 <= r["threshold"] <= hi * 1.16
        limit = bound if math.isfinite(bound) else limit
        assert r["post"] == pytest.approx(min(r["norm"], r["threshold"]), rel=1e-5)


@pytest.mark.parametrize(
    ("method", "kwargs", "reference"),
    [
        ("norm", {"max_norm": 0.5}, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5)),
        ("value", {"clip_value": 0.05}, lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.05)),
        ("per_parameter", {"max_norm": 0.3}, lambda ps: [torch.nn.utils.clip_grad_norm_([p], 0.3) for p in ps]),
    ],
)
def test_fixed_methods_match_torch(tmp_path, method, kwargs, reference):
    cb = AdaptiveGradientClipping(method, **kwargs)
    snap = GradSnapshot()
    _, rows = fit(tmp_path, cb, max_steps=6, before=[snap])
    assert len(snap.grads) == len(rows) == 6
    for before, row in zip(snap.grads, rows):
        params = [nn.Parameter(torch.zeros_like(g)) for g in before]
        for p, g in zip(params, before):
            p.grad = g.clone()
        reference(params)
        for p, got in zip(params, row["grads"]):
            torch.testing.assert_close(got, p.grad)
        assert row["clipped"]  # fresh-init gradients are larger than these bounds
        assert row["threshold"] == pytest.approx(next(iter(kwargs.values())))


def reference_agc_(params, grads, clipping, eps):
    """timm-style AGC written independently (unit = output row; vectors as a whole)."""
    out = []
    for p, g in zip(params, grads):
        dims = tuple(range(1, g.ndim)) if g.ndim > 1 else None
        wn = p.norm(2, dim=dims, keepdim=True) if dims else p.norm(2)
        gn = g.norm(2, dim=dims, keepdim=True) if dims else g.norm(2)
        max_norm = wn.clamp(min=eps) * clipping
        out.append(torch.where(gn < max_norm, g, g * (max_norm / gn.clamp(min=1e-6))))
    return out


def test_agc_matches_reference_and_excludes_head(tmp_path):
    cb = AdaptiveGradientClipping("agc", clipping=0.02, exclude=["net.4"])
    snap = GradSnapshot()
    model = TinyRegression()
    weights: list[list[torch.Tensor]] = []

    class Weights(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    _, rows = fit(tmp_path, cb, model, max_steps=4, before=[snap, Weights()])
    names = [n for n, _ in model.named_parameters()]
    for before, w, row in zip(snap.grads, weights, rows):
        expected = reference_agc_(w, before, 0.02, 1e-3)
        for name, b, e, got in zip(names, before, expected, row["grads"]):
            if name.startswith("net.4."):
                assert torch.equal(got, b)  # the head is left alone
            else:
                torch.testing.assert_close(got, e)
        assert row["threshold"] is None
        assert row["clipped"]


# ----------------------------------------------------------------------------------------------- spikes and NaN


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_loss_spike_is_clipped_and_later_thresholds_unaffected(tmp_path, method, zpath):
    k = 14
    cb = AdaptiveGradientClipping(method, warmup_steps=5)
    _, rows = fit(tmp_path / "spike", cb, seeded(loss_scale_at={k: 1e6}), max_steps=24)
    base_cb = AdaptiveGradientClipping(method, warmup_steps=5)
    _, base = fit(tmp_path / "base", base_cb, seeded(), max_steps=24)

    spike = rows[k]
    assert spike["norm"] > 1e4 * base[k]["norm"]  # the spike happened
    assert spike["clipped"]
    assert spike["post"] <= spike["threshold"] * (1 + 1e-6)
    assert spike["threshold"] == pytest.approx(base[k]["threshold"], rel=1e-6)  # same history up to k
    for r, b in zip(rows[k + 1 :], base[k + 1 :]):
        assert math.isfinite(r["threshold"])
        assert r["threshold"] == pytest.approx(b["threshold"], rel=0.3)  # the spike did not inflate the statistics
        assert r["threshold"] < 1e-3 * spike["norm"]


def test_zscore_statistics_see_spike_as_threshold_only(tmp_path, zpath):
    k = 14
    cb = AdaptiveGradientClipping("zscore", warmup_steps=5)
    _, rows = fit(tmp_path, cb, seeded(loss_scale_at={k: 1e6}), max_steps=k + 2)
    # the threshold after the spike is what the reference gives when the spike enters as min(norm, threshold)
    ref = zscore_reference([r["norm"] for r in rows], warmup=5)
    assert rows[k + 1]["threshold"] == pytest.approx(ref[k + 1], rel=1e-6)
    assert rows[k + 1]["threshold"] < 2 * rows[k]["threshold"]


@pytest.mark.parametrize("method", ["zscore", "percentile"])
@pytest.mark.parametrize("fault", ["nan_at_steps", "inf_at_steps"])
def test_nonfinite_norm_never_poisons_thresholds(tmp_path, method, fault, zpath):
    bad = {2, 9, 10}
    cb = AdaptiveGradientClipping(method, warmup_steps=4, log_every_n_steps=1)
    model = TinyRegression(**{fault: bad})
    _, rows = fit(tmp_path, cb, model, max_steps=18, after=[SkipNonFinite()])
    for r in rows:
        assert not math.isnan(r["threshold"])
        if r["step"] > 0:
            assert math.isfinite(r["threshold"]), r
        if r["z"] is not None and r["step"] >= 4 and r["step"] not in bad:
            assert math.isfinite(r["z"])
    bad_rows = [r for r in rows if r["step"] in bad]
    assert all(not math.isfinite(r["norm"]) and not r["clipped"] for r in bad_rows)
    clipper = cb._slots[0].clipper
    if method == "zscore":
        assert clipper.state_dict()["count"] == 18 - len(bad)
        ref = zscore_reference([r["norm"] for r in rows], warmup=4)
        assert [r["threshold"] for r in rows] == pytest.approx(ref, rel=1e-6)
    else:
        assert int(clipper.estimator.count) == 18 - len(bad)
    tb = scalars(tmp_path)
    assert all(math.isfinite(v) for tag in tb if tag.startswith("gradguard/") for v in tb[tag].values())


def test_nonfinite_gradients_are_not_touched(tmp_path):
    cb = AdaptiveGradientClipping("norm", max_norm=0.1)
    snap = GradSnapshot()
    _, rows = fit(tmp_path, cb, TinyRegression(inf_at_steps={1}), max_steps=2, before=[snap], after=[SkipNonFinite()])
    for before, got in zip(snap.grads[1], rows[1]["grads"]):
        assert torch.equal(before.nan_to_num(), got.nan_to_num())  # no inf -> NaN from scaling


# ------------------------------------------------------------------------------------------------------- resume


class FullBatch(TinyRegression):
    """One batch per epoch, so the data of a step does not depend on how Lightning restores its epoch loop."""

    def train_dataloader(self):
        return loader(n=16, batch_size=16)


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_resume_continues_with_the_same_threshold(tmp_path, method, zpath):
    kw = {"warmup_steps": 3}
    _, full = fit(tmp_path / "full", AdaptiveGradientClipping(method, **kw), seeded(FullBatch), max_steps=14)
    assert any(r["clipped"] for r in full[8:])

    first = AdaptiveGradientClipping(method, **kw)
    trainer, part1 = fit(tmp_path / "a", first, seeded(FullBatch), max_steps=8)
    ckpt = tmp_path / "k.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert first.state_key in saved
    assert saved[first.state_key]["optimizers"][0]["steps"] == 8

    second = AdaptiveGradientClipping(method, **kw)
    rec = Recorder(second)
    make_trainer(tmp_path / "b", [second, rec], max_steps=14).fit(seeded(FullBatch), ckpt_path=str(ckpt))
    part2 = rec.rows
    assert part2[0]["global_step"] == 8
    assert part2[0]["step"] == 8
    assert [r["threshold"] for r in part1] == [r["threshold"] for r in full[:8]]
    assert [r["threshold"] for r in part2] == pytest.approx([r["threshold"] for r in full[8:]], rel=1e-12)
    assert [r["norm"] for r in part2] == pytest.approx([r["norm"] for r in full[8:]], rel=1e-6)


def test_state_key_holds_the_method_and_no_tuning_argument():
    assert (
        AdaptiveGradientClipping("zscore").state_key
        == AdaptiveGradientClipping("zscore", z_threshold=3.0, ema_decay=0.9, warmup_steps=2).state_key
    )
    assert (
        AdaptiveGradientClipping("percentile").state_key == AdaptiveGradientClipping("percentile", window=50).state_key
    )
    assert AdaptiveGradientClipping("zscore").state_key != AdaptiveGradientClipping("norm").state_key


def test_two_clippers_are_refused_at_setup(tmp_path):
    trainer = make_trainer(tmp_path, [AdaptiveGradientClipping(), AdaptiveGradientClipping("norm")], max_steps=1)
    with pytest.raises(ValueError, match=r"Found 2 AdaptiveGradientClipping callbacks \('zscore', 'norm'\); use one"):
        trainer.fit(TinyRegression())


def test_resume_with_changed_arguments_keeps_the_statistics(tmp_path):
    first = AdaptiveGradientClipping("zscore", warmup_steps=3)
    trainer, part1 = fit(tmp_path / "a", first, seeded(FullBatch), max_steps=8)
    ckpt = tmp_path / "k.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = first._slots[0].clipper.state_dict()
    second = AdaptiveGradientClipping("zscore", warmup_steps=3, z_threshold=1.0)
    rec = Recorder(second)
    make_trainer(tmp_path / "b", [second, rec], max_steps=9).fit(seeded(FullBatch), ckpt_path=str(ckpt))
    row = rec.rows[0]
    assert row["step"] == 8
    assert not row["warmup"]
    assert row["mean"] == pytest.approx(saved["mean"], rel=1e-12)  # the statistics came through
    std = max(math.sqrt(saved["var"]), 0.05 * saved["mean"])
    assert row["threshold"] == pytest.approx(min(saved["mean"] + 1.0 * std, saved["limit"] * 1.01), rel=1e-9)


def test_resume_with_another_method_warns_what_was_dropped(tmp_path):
    first = AdaptiveGradientClipping("percentile", warmup_steps=2)
    trainer, _ = fit(tmp_path / "a", first, seeded(FullBatch), max_steps=4)
    ckpt = tmp_path / "k.ckpt"
    trainer.save_checkpoint(ckpt)
    second = AdaptiveGradientClipping("zscore", warmup_steps=2)
    with pytest.warns(UserWarning, match=r"method='zscore'.*'percentile' clipping statistics.*dropped"):
        make_trainer(tmp_path / "b", [second], max_steps=5).fit(seeded(FullBatch), ckpt_path=str(ckpt))
    assert second.clip_rate() is not None
    assert second._slots[0].steps == 5


def test_load_state_dict_tolerates_missing_keys():
    cb = AdaptiveGradientClipping("zscore")
    cb.load_state_dict({})
    cb.load_state_dict({"optimizers": {0: {}}})
    cb.load_state_dict({"optimizers": {0: {"steps": 3, "stats": {"method": "zscore"}}}})
    assert cb.state_dict()["optimizers"][0]["steps"] == 3


# ---------------------------------------------------------------------------- optimizers, manual, accumulation


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with a generator-like and a discriminator-like net, one optimizer each."""

    def __init__(self, spike_at: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(8, 1)
        self.b = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
        self.spike_at = spike_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss_a = nn.functional.mse_loss(self.a(x), y)
        if batch_idx == self.spike_at:
            loss_a = loss_a * 1e6
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = nn.functional.mse_loss(self.b(x), y) * 100.0  # a different scale of norms
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.Adam(self.b.parameters(), lr=0.01)

    def train_dataloader(self):
        return loader()


def test_two_optimizers_manual_optimization_keep_separate_state(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", warmup_steps=3, progress_bar=True)
    trainer, rows = fit(tmp_path, cb, TwoOptimizers(spike_at=6), max_steps=20, enable_progress_bar=True)  # 10 x 2 opts
    by_opt = {i: [r for r in rows if r["opt"] == i] for i in (0, 1)}
    assert len(by_opt[0]) == len(by_opt[1]) == 10
    assert [r["step"] for r in by_opt[1]] == list(range(10))
    for i in (0, 1):
        ref = zscore_reference([r["norm"] for r in by_opt[i]], warmup=3)
        assert [r["threshold"] for r in by_opt[i]] == pytest.approx(ref, rel=1e-6)
    # the scales differ, so a shared state would be visible
    assert by_opt[1][5]["threshold"] > 3 * by_opt[0][5]["threshold"]
    assert by_opt[0][6]["clipped"]
    assert by_opt[0][6]["post"] <= by_opt[0][6]["threshold"] * (1 + 1e-6)
    assert set(cb.state_dict()["optimizers"]) == {0, 1}
    tb = scalars(tmp_path)
    assert "gradguard/clip_threshold" in tb
    assert "gradguard/clip_threshold_opt1" in tb
    assert "clip_rate" in trainer.progress_bar_metrics
    assert "clip_rate_opt1" in trainer.progress_bar_metrics


class ManualOne(TinyRegression):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.global_step in self.loss_scale_at:
            loss = loss * self.loss_scale_at[self.global_step]
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_single_optimizer(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", warmup_steps=3)
    _, rows = fit(tmp_path, cb, ManualOne(loss_scale_at={7: 1e6}), max_steps=10)
    assert [r["step"] for r in rows] == list(range(10))
    assert rows[7]["clipped"]
    assert rows[7]["post"] <= rows[7]["threshold"] * (1 + 1e-6)


def test_accumulate_grad_batches_acts_once_per_optimizer_step(tmp_path):
    cb = AdaptiveGradientClipping("norm", max_norm=0.5)
    snap = GradSnapshot()

    class CountBackward(pl.Callback):
        backward = 0

        def on_after_backward(self, trainer, pl_module):
            CountBackward.backward += 1

    _, rows = fit(tmp_path, cb, max_steps=3, before=[snap, CountBackward()], accumulate_grad_batches=4)
    assert CountBackward.backward == 12
    assert len(rows) == 3
    assert cb.state_dict()["optimizers"][0]["steps"] == 3
    for before, row in zip(snap.grads, rows):
        # the accumulated gradient is clipped once: the result is exactly one clip of the 4-batch sum
        params = [nn.Parameter(torch.zeros_like(g)) for g in before]
        for p, g in zip(params, before):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        for p, got in zip(params, row["grads"]):
            torch.testing.assert_close(got, p.grad)
        assert row["post"] == pytest.approx(0.5, rel=1e-5)


# ------------------------------------------------------------------------------------------------------ logging


def test_tensorboard_tags_read_back(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", warmup_steps=2, z_threshold=1.0, log_every_n_steps=3)
    _, rows = fit(tmp_path, cb, max_steps=12)
    tb = scalars(tmp_path)
    expected_steps = {0, 3, 6, 9}
    for name in ("clip_threshold", "grad_norm_clipped"):  # step 0's threshold: the default fallback_max_norm, 1.0
        assert set(tb[f"gradguard/{name}"]) == expected_steps, name
    assert tb["gradguard/clip_threshold"][0] == 1.0
    # without a cap the first threshold is inf, and inf is never written
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    fit(nocap, AdaptiveGradientClipping("zscore", warmup_steps=2, fallback_max_norm=None, log_every_n_steps=3),
        max_steps=4)  # fmt: skip
    assert set(scalars(nocap)["gradguard/clip_threshold"]) == {3}
    for name in ("clip_fraction", "clipped_steps"):  # also at the end of the fit, for steps 10 and 11
        assert set(tb[f"gradguard/{name}"]) == expected_steps | {12}, name
    assert set(tb["gradguard/grad_norm_zscore"]) == {3, 6, 9}  # defined once the statistics exist
    for s in expected_steps | {12}:
        window = rows[max(0, s - 2) : s + 1] if s else rows[:1]  # steps since the previous write
        if s == 12:
            window = rows[10:12]
        assert tb["gradguard/clip_fraction"][s] == pytest.approx(np.mean([w["clipped"] for w in window]))
        assert tb["gradguard/clipped_steps"][s] == sum(w["clipped"] for w in window)
        if s == 12:
            continue
        r = rows[s]
        assert tb["gradguard/grad_norm_clipped"][s] == pytest.approx(r["post"], rel=1e-5)
        if s:
            assert tb["gradguard/clip_threshold"][s] == pytest.approx(r["threshold"], rel=1e-6)
            assert tb["gradguard/grad_norm_zscore"][s] == pytest.approx(r["z"], rel=1e-6)
    assert any(v > 0 for v in tb["gradguard/clip_fraction"].values())
    assert sum(tb["gradguard/clipped_steps"].values()) == sum(r["clipped"] for r in rows)


@pytest.mark.parametrize("method", ["value", "per_parameter", "agc"])
def test_post_clip_norm_is_measured_for_non_global_methods(tmp_path, method):
    option = {"value": {"clip_value": 0.01}, "per_parameter": {"max_norm": 0.1}, "agc": {"clipping": 0.01}}[method]
    cb = AdaptiveGradientClipping(method, **option)
    _, rows = fit(tmp_path, cb, max_steps=3)
    tb = scalars(tmp_path)
    for s in range(3):
        assert tb["gradguard/grad_norm_clipped"][s] == pytest.approx(rows[s]["post"], rel=1e-5)
        assert rows[s]["post"] < rows[s]["norm"]
    assert ("gradguard/clip_threshold" in tb) == (method != "agc")
    assert tb["gradguard/clip_fraction"][2] == 1.0


# --------------------------------------------------------------------------------------------------- validation


def test_refuses_trainer_gradient_clip_val(tmp_path):
    trainer = make_trainer(tmp_path, [AdaptiveGradientClipping()], max_steps=2, gradient_clip_val=1.0)
    with pytest.raises(ValueError, match=r"cannot run together with Trainer\(gradient_clip_val=1.0\)"):
        trainer.fit(TinyRegression())


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "autoclip"}, ValueError, r"method must be one of .*'zscore'.*got 'autoclip'"),
        ({"method": 3}, TypeError, r"method must be a str"),
        ({"z_threshold": 0}, ValueError, r"z_threshold must be finite and > 0, got 0"),
        ({"z_threshold": math.inf}, ValueError, r"z_threshold must be finite and > 0, got inf"),
        ({"z_threshold": "2"}, TypeError, r"z_threshold must be a number"),
        ({"clip_to": "median"}, ValueError, r"clip_to must be one of \('threshold', 'mean'\), got 'median'"),
        ({"ema_decay": 1.0}, ValueError, r"ema_decay must be in the open interval \(0, 1\), got 1.0"),
        ({"ema_decay": None}, TypeError, r"^AdaptiveGradientClipping: ema_decay must be a number"),
        ({"percentile": 0}, ValueError, r"percentile must be in \(0.0, 100.0\], got 0"),
        ({"percentile": 150}, ValueError, r"percentile must be in \(0.0, 100.0\], got 150"),
        ({"window": 1}, ValueError, r"window must be an int >= 2 and <= 1000000, got 1"),
        ({"window": 10**12}, ValueError, r"window must be an int >= 2 and <= 1000000, got 1000000000000"),
        ({"warmup_steps": 10**9}, ValueError, r"warmup_steps must be an int >= 0 and <= 100000"),
        ({"window": 10.0}, TypeError, r"window must be an int"),
        ({"percentile_estimator": "tdigest"}, ValueError, r"percentile_estimator must be one of"),
        ({"clipping": -0.01}, ValueError, r"clipping must be finite and > 0, got -0.01"),
        ({"eps": 0.0}, ValueError, r"eps must be finite and > 0, got 0.0"),
        ({"exclude": "head"}, TypeError, r"exclude must be a list or tuple of str"),
        ({"exclude": ["head", 3]}, TypeError, r"exclude must hold non-empty str patterns"),
        ({"max_norm": 0}, ValueError, r"max_norm must be finite and > 0, got 0"),
        ({"clip_value": -1.0}, ValueError, r"clip_value must be finite and > 0, got -1.0"),
        ({"norm_type": 0}, ValueError, r"norm_type must be in \[1, 100\] or inf, got 0"),
        ({"norm_type": 1e-300}, ValueError, r"norm_type must be in \[1, 100\] or inf, got 1e-300"),
        ({"norm_type": 1e3}, ValueError, r"norm_type must be in \[1, 100\] or inf, got 1000.0"),
        ({"method": "agc", "norm_type": 1.0}, ValueError, r"norm_type=1.0 is not used by method='agc'"),
        ({"method": "agc", "z_threshold": 3.0}, ValueError, r"z_threshold=3.0 is not used by method='agc'; .*'zscore'"),
        ({"method": "norm", "percentile": 90}, ValueError, r"percentile=90.0 is not used by method='norm'"),
        ({"method": "zscore", "exclude": ["fc"]}, ValueError, r"exclude=\('fc',\) is not used by method='zscore'"),
        ({"method": "value", "max_norm": 2.0}, ValueError, r"max_norm=2.0 .* methods 'norm', 'per_parameter'"),
        ({"method": "norm", "warmup_steps": 3}, ValueError, r"warmup_steps=3 .* methods 'zscore', 'percentile'"),
        ({"warmup_steps": -1}, ValueError, r"warmup_steps must be an int >= 0 and <= 100000, got -1"),
        ({"warmup_steps": True}, TypeError, r"warmup_steps must be an int"),
        ({"fallback_factor": 0.5}, ValueError, r"fallback_factor must be finite and >= 1, got 0.5"),
        ({"fallback_max_norm": 0.0}, ValueError, r"fallback_max_norm must be finite and > 0, got 0.0"),
        ({"log_every_n_steps": 0}, ValueError, r"log_every_n_steps must be an int >= 1 or None, got 0"),
        ({"progress_bar": 1}, TypeError, r"progress_bar must be a bool"),
    ],
)
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AdaptiveGradientClipping(**kwargs)


@pytest.mark.parametrize("method", ["zscore", "percentile", "agc", "norm", "value", "per_parameter"])
def test_every_argument_at_its_default_is_accepted_by_every_method(method):
    """LightningCLI passes every init argument explicitly: defaults must never count as 'set'."""
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(AdaptiveGradientClipping.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "method"
    }
    assert AdaptiveGradientClipping(method, **defaults).method == method


def test_numpy_scalars_are_accepted():
    cb = AdaptiveGradientClipping(
        "zscore", z_threshold=np.float32(2.5), warmup_steps=np.int64(3), ema_decay=np.float64(0.9)
    )
    assert (cb.z_threshold, cb.warmup_steps, cb.ema_decay) == (2.5, 3, 0.9)
    assert type(cb.warmup_steps) is int


def test_value_method_refuses_complex_parameters_at_setup(tmp_path):
    class Complex(TinyRegression):
        def __init__(self):
            super().__init__()
            self.phase = nn.Parameter(torch.ones(2, dtype=torch.complex64))

    trainer = make_trainer(tmp_path, [AdaptiveGradientClipping("value")], max_steps=1)
    with pytest.raises(ValueError, match=r"cannot clip the complex parameter 'phase'"):
        trainer.fit(Complex())


def test_fallback_max_norm_protects_the_first_step(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", fallback_max_norm=0.2, warmup_steps=3)
    _, rows = fit(tmp_path, cb, TinyRegression(loss_scale_at={0: 1e6}), max_steps=4)
    assert rows[0]["threshold"] == 0.2
    assert rows[0]["clipped"]
    assert rows[0]["post"] <= 0.2 * (1 + 1e-6)
    # the first (clipped) norm enters the statistics as 0.2: the warm-up threshold is then min(10 * 0.2, 0.2)
    assert rows[1]["threshold"] == pytest.approx(0.2)


@pytest.mark.parametrize("method", ["zscore", "percentile", "agc", "norm", "value", "per_parameter"])
def test_every_method_runs_at_defaults(tmp_path, method):
    cb = AdaptiveGradientClipping(method)
    trainer, rows = fit(tmp_path, cb, max_steps=3, logger=False)
    assert len(rows) == 3
    assert trainer.global_step == 3


def test_bf16_mixed_precision_fit(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", warmup_steps=2)
    _, rows = fit(tmp_path, cb, seeded(loss_scale_at={5: 1e6}), max_steps=8, precision="bf16-mixed")
    assert rows[5]["clipped"]
    assert rows[5]["post"] <= rows[5]["threshold"] * (1 + 1e-6)
    assert all(math.isfinite(r["threshold"]) for r in rows[1:])


def test_clip_rate_counts_clipped_steps(tmp_path):
    cb = AdaptiveGradientClipping("norm", max_norm=1e-6, log_every_n_steps=1)
    assert cb.clip_rate() is None
    make_trainer(tmp_path, [cb], max_steps=4).fit(TinyRegression())
    assert cb.clip_rate() == 1.0  # every step's norm is far above 1e-6
    loose = AdaptiveGradientClipping("norm", max_norm=1e6)
    make_trainer(tmp_path / "b", [loose], max_steps=4).fit(TinyRegression())
    assert loose.clip_rate() == 0.0
    assert loose.clip_rate(optimizer_idx=1) is None


@pytest.mark.parametrize("clip_to", ["threshold", "mean"])
@pytest.mark.parametrize("fallback_max_norm", [None, 3.0])
def test_zscore_host_path_matches_device_path(clip_to, fallback_max_norm):
    """On CPU the z-score rule runs on Python floats; the tensor path (used on accelerators) must decide the same.

    Both paths see the same stream of gradients (spikes, a NaN and an inf step, a warm-up) and must take the same
    decisions and leave the same gradients, up to the last bits of float64 (torch's CPU ``sqrt`` of a float64 scalar
    is not always the correctly rounded one that ``math.sqrt`` returns).
    """
    from lightning_gradguard.core.clip import ZScoreClipper
    from lightning_gradguard.core.measure._grad_stats import compute_grad_stats

    kw = dict(warmup_steps=4, z_threshold=2.0, clip_to=clip_to, fallback_max_norm=fallback_max_norm)
    clippers = {True: ZScoreClipper(**kw), False: ZScoreClipper(**kw)}
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (16,), (1, 16), (1,)]
    clipped_any = False
    try:
        for step in range(40):
            scale = 50.0 if step in (2, 12, 13, 30) else 1.0
            grads = [torch.randn(s, generator=g) * scale for s in shapes]
            if step == 20:
                grads[1][3] = math.nan
            if step == 25:
                grads[0][0, 0] = math.inf
            records, outs = {}, {}
            for host, clipper in clippers.items():
                ZScoreClipper.host_fast_path = host
                params = [nn.Parameter(torch.ones(s)) for s in shapes]
                for p, gr in zip(params, grads):
                    p.grad = gr.clone()
                records[host] = clipper.clip_(compute_grad_stats(params))
                clipper.commit()
                outs[host] = [p.grad for p in params]
            host, dev = records[True], records[False]
            assert isinstance(host.threshold, float)
            assert isinstance(dev.threshold, torch.Tensor)
            assert bool(host.clipped) == bool(dev.clipped), step
            assert host.warmup == dev.warmup
            assert float(host.threshold) == pytest.approx(float(dev.threshold), rel=1e-12), step
            assert float(host.coefficient) == pytest.approx(float(dev.coefficient), rel=1e-12), step
            assert float(host.zscore) == pytest.approx(float(dev.zscore), rel=1e-9, nan_ok=True), step
            for a, b in zip(outs[True], outs[False]):
                torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-6, atol=0.0)
            clipped_any |= bool(host.clipped)
    finally:
        ZScoreClipper.host_fast_path = True
    assert clipped_any  # the stream really exercised the clipping branch
    a, b = clippers[True].state_dict(), clippers[False].state_dict()
    for key in ("mean", "var", "count", "seen", "limit"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key


class DropAt(pl.Callback):
    """What NaNGuard does to a step it skips: every grad set to None and the shared step record marked dropped."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from lightning_gradguard.callbacks._step_context import step_record

        if trainer.global_step in self.steps:
            step_record(trainer).dropped = True
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None


def test_dropped_steps_never_enter_the_statistics_and_are_logged_at_once(tmp_path, zpath):
    cb = AdaptiveGradientClipping("zscore", warmup_steps=3, log_every_n_steps=50)
    _, rows = fit(tmp_path, cb, seeded(loss_scale_at={6: 1e6}), max_steps=12, after=[DropAt({6})])
    norms = [r["norm"] for r in rows]
    assert rows[6]["clipped"]
    # the reference without step 6 gives the thresholds of every later step: the spike never entered
    ref = zscore_reference(norms[:6] + norms[7:], warmup=3)
    assert [r["threshold"] for r in rows[7:]] == pytest.approx(ref[6:], rel=1e-6)
    assert cb._slots[0].clipper.state_dict()["count"] == 11
    tb = scalars(tmp_path)
    assert set(tb["gradguard/clipped_steps"]) == {0, 7, 12}  # log step, the step after the drop, fit end
    assert tb["gradguard/clipped_steps"][7] == sum(r["clipped"] for r in rows[1:7])


class _ClipperAtSnapshots(pl.Callback):
    """After the guard's ``on_train_batch_end`` (listed after it): the clipper's statistics whenever the guard has
    just taken a snapshot, by the snapshot's step; a NaN written into a weight at ``nan_at`` (only a rollback undoes
    it); the statistics right after the rollback."""

    def __init__(self, clipper: AdaptiveGradientClipping, guard: Any, nan_at: int) -> None:
        self.clipper, self.guard, self.nan_at = clipper, guard, nan_at
        self.at: dict[int, dict[str, Any]] = {}
        self.after_rollback: dict[str, Any] | None = None

    def _stats(self) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self.clipper._slots[0].clipper.state_dict())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.nan_at:
            with torch.no_grad():
                next(pl_module.parameters())[0, 0] = math.nan

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps = {s.step for s in self.guard.engine.store.snapshots}
        for step in steps - set(self.at):
            self.at[step] = self._stats()
        if self.guard.events and self.guard.events[-1]["kind"] == "rollback" and self.after_rollback is None:
            self.after_rollback = self._stats()


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_a_rollback_puts_the_clipping_statistics_back_to_the_snapshots(tmp_path):
    """The statistics learned after the snapshot describe the discarded trajectory (inflated norms before a
    blow-up would loosen the clipping after the rollback): they go back with the weights; the counters of clipped
    steps keep counting."""
    from lightning_gradguard import NaNGuard

    clipper = AdaptiveGradientClipping("zscore", warmup_steps=3)
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=10, snapshot_confirm_steps=0, rerun=False)
    probe = _ClipperAtSnapshots(clipper, guard, nan_at=17)
    model = TinyRegression(loss_scale_at={12: 30.0, 13: 30.0, 14: 30.0})  # learned by the clipper after 10
    trainer = make_trainer(tmp_path, [clipper, guard, probe], max_steps=20)
    trainer.fit(model, loader(n=256))
    rollbacks = [e for e in guard.events if e["kind"] == "rollback"]
    assert [e["step"] for e in rollbacks] == [17], guard.events
    assert rollbacks[0]["snapshot_step"] == 10
    assert probe.after_rollback is not None
    assert _same_state(probe.after_rollback, probe.at[10])
    assert not _same_state(probe.at[10], probe.at[0])  # (the statistics did move between the snapshots)
    assert clipper._slots[0].steps == 20  # every step counted, the dropped one included
