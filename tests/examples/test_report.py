"""`summarize`/`format_summary`/`plot_report` on a real run, checked against the event files read independently."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard.report import format_summary, plot_report, summarize
from tests.models import guarded_run

GUIDANCE = {"histograms": 0, "scalars": 0, "images": 0, "tensors": 0}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return guarded_run(tmp_path_factory.mktemp("report"))


def _events(root):
    acc = EventAccumulator(str(root / "run" / "version_0"), size_guidance=GUIDANCE)
    acc.Reload()
    return acc


def test_summary_matches_event_data(run_root):
    acc = _events(run_root)
    summary = summarize(run_root)
    assert len(summary.runs) == 1
    run = summary.runs[0]
    assert run.name == "run/version_0"
    norms = np.array([e.value for e in acc.Scalars("gradguard/grad_norm")])
    finite = norms[np.isfinite(norms)]
    assert run.grad_norm_tag == "gradguard/grad_norm"
    assert len(run.grad_norm) == len(norms) > 30
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert run.percentiles[key] == pytest.approx(float(np.percentile(finite, q)), rel=1e-6)
    tops = np.array([e.value for e in acc.Scalars("gradguard/grad_norm_max")])
    assert run.percentiles["max"] == pytest.approx(float(tops[np.isfinite(tops)].max()), rel=1e-6)
    assert run.percentiles["max"] >= float(finite.max())
    assert run.nonfinite_norms == int((~np.isfinite(norms)).sum()) >= 1  # the NaN batch at step 20
    if "gradguard/clipped_steps" in acc.Tags()["scalars"]:
        clipped = sum(e.value for e in acc.Scalars("gradguard/clipped_steps"))
        assert run.clipped_steps == clipped
        assert run.clip_rate == pytest.approx(clipped / 40, rel=1e-6)  # the fit's 40 steps
    else:
        fractions = [e.value for e in acc.Scalars("gradguard/clip_fraction")]
        assert run.clip_rate == pytest.approx(float(np.mean(fractions)), rel=1e-6)
    assert run.clip_rate > 0  # the two 100x spikes were clipped
    assert run.skipped_steps == int(acc.Scalars("gradguard/skipped_steps")[-1].value) >= 1
    assert run.rollbacks == int(acc.Scalars("gradguard/rollbacks")[-1].value) >= 1
    assert [(s, k) for s, k, _ in run.guard_events][0] == (20, "rollback")
    assert run.vanishing_max == int(max(e.value for e in acc.Scalars("gradguard/vanishing_layers")))
    assert run.exploding_max == int(max(e.value for e in acc.Scalars("gradguard/exploding_layers")))
    assert any(step == 25 and "exploding" in text for step, text in run.layer_events)
    thresholds = [(e.step, e.value) for e in acc.Scalars("gradguard/clip_threshold")]
    assert run.clip_threshold == [(s, pytest.approx(v)) for s, v in thresholds]


def test_format_summary_names_the_numbers(run_root):
    summary = summarize(run_root)
    text = format_summary(summary)
    run = summary.runs[0]
    assert "run/version_0" in text
    assert f"p50 {run.percentiles['p50']:.4g}" in text
    assert f"{run.clip_rate:.1%} of steps clipped" in text
    assert "step 20 rollback" in text
    assert "NaNGuard:" in text
    assert not re.search(r"step (\d+)\b[^\n]*step \1:", text)  # no step printed twice on a line
    assert f"loss (train_loss): first {run.loss[0][1]:.4g}" in text


def test_plot_report_writes_a_valid_png(run_root, tmp_path):
    pil = pytest.importorskip("PIL.Image")
    out = plot_report(summarize(run_root), tmp_path / "sub" / "report.png")
    assert out.exists()
    with pil.open(out) as img:
        img.verify()
    with pil.open(out) as img:
        assert img.format == "PNG"
        assert img.size[0] > 400


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        summarize(tmp_path / "missing")
    with pytest.raises(ValueError, match="no TensorBoard event files"):
        summarize(tmp_path)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_text("note", "no scalars", 0)
    with pytest.raises(ValueError, match="none with scalars"):
        summarize(tmp_path)


def test_clipping_only_run_falls_back_to_clipped_norm(tmp_path):
    from lightning_gradguard import AdaptiveGradientClipping
    from tests.models import TinyRegression, make_trainer

    make_trainer(tmp_path, [AdaptiveGradientClipping("norm", max_norm=0.5)], max_steps=6).fit(TinyRegression())
    run = summarize(tmp_path).runs[0]
    assert run.grad_norm_tag == "gradguard/grad_norm_clipped"
    assert run.percentiles["max"] <= 0.5 + 1e-5
    assert run.skipped_steps is None
    assert "clip rate" in format_summary(summarize(tmp_path))


def test_runs_without_gradguard_sit_beside_guarded_ones(run_root, tmp_path):
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    shutil.copytree(run_root, tmp_path / "logs")
    with SummaryWriter(str(tmp_path / "logs" / "plain")) as writer:
        for step, loss in enumerate((1.0, 30.0, float("nan"), 0.5)):
            writer.add_scalar("train_loss", loss, step)
        writer.add_scalar("val_mse", 0.25, 3)
    summary = summarize(tmp_path / "logs")
    assert [r.name for r in summary.runs] == ["plain", "run/version_0"]
    assert summary.without_gradguard == ["plain"]
    plain = summary.runs[0]
    assert plain.loss[:2] == [(0, 1.0), (1, 30.0)]
    assert math.isnan(plain.loss[2][1])
    assert plain.metrics == {"val_mse": 0.25}
    text = format_summary(summary)
    assert "run plain: last step 3 (no gradguard data)" in text
    assert "loss (train_loss): first 1, last 0.5, peak 30 at logged steps, 1 non-finite" in text
    assert "metrics (last): val_mse 0.25" in text
    plot_report(summary, tmp_path / "both.png")  # both runs drawn, the unguarded one with its loss only


def test_spike_between_log_steps_is_the_reports_maximum(tmp_path):
    from lightning_gradguard import GradientNormMonitor
    from tests.callbacks.test_gradient_norm_monitor import GradCapture, reference_norm
    from tests.models import TinyRegression, make_trainer

    capture = GradCapture()
    trainer = make_trainer(tmp_path, [capture, GradientNormMonitor(log_every_n_steps=5)], max_steps=12)
    trainer.fit(TinyRegression(loss_scale_at={7: 1e3}))  # step 7 is between the logs at 5 and 10
    true_max = max(reference_norm(g) for g in capture.steps.values())
    run = summarize(tmp_path).runs[0]
    assert run.percentiles["max"] == pytest.approx(true_max, rel=1e-5)
    assert max(v for _, v in run.grad_norm) < true_max / 100  # the logged steps alone would miss it
    assert f"max {true_max:.4g} over every step" in format_summary(summarize(tmp_path))


def test_step_is_printed_once_per_event_line():
    from lightning_gradguard.report import strip_step

    assert strip_step("step 150: exploding: rnn") == "exploding: rnn"
    assert strip_step("step 7 (optimizer 1): vanishing: a") == "vanishing: a"
    assert strip_step("NaNGuard rollback at step 100: loss spike") == "loss spike"
    assert strip_step("loss spike at step 3") == "loss spike at step 3"


def test_halted_run_report_agrees_with_the_callbacks_counters(tmp_path):
    from lightning_gradguard import AdaptiveGradientClipping, DivergenceError, GradientNormMonitor, NaNGuard
    from tests.models import TinyRegression, make_trainer

    clipper = AdaptiveGradientClipping("norm", max_norm=0.5)
    guard = NaNGuard(action="halt")
    callbacks = [GradientNormMonitor(log_every_n_steps=10), clipper, guard]
    trainer = make_trainer(tmp_path, callbacks, max_steps=40, log_every_n_steps=10)
    with pytest.raises(DivergenceError):
        trainer.fit(TinyRegression(nan_at_steps=[23], loss_scale_at={15: 1e3}))  # halts between two logs
    run = summarize(tmp_path).runs[0]
    own = clipper.state_dict()["optimizers"][0]  # the clipper's own counts
    assert run.clipped_steps == own["clipped_total"]  # everything up to the halt was written
    assert run.clip_rate == pytest.approx(own["clipped_total"] / own["steps"], rel=1e-6)
    assert run.skipped_steps == guard.skipped_steps
    assert run.rollbacks == guard.rollbacks
    assert any(kind == "halt" for _, kind, _ in run.guard_events)
    assert run.steps >= 23  # the data reach the halt, not only the last regular log (step 20)
    assert "halt" in format_summary(summarize(tmp_path))
