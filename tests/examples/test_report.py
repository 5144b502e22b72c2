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
    assert "spike score: n/a (no NaNGuard)" in format_summary(summarize(tmp_path))


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


@pytest.fixture(scope="module")
def blow_up_run(tmp_path_factory):
    """A 1e4 loss blow-up between two logs, then a NaN loss in the same interval (skipped), logged every 10 steps."""
    from lightning_gradguard import default_callbacks
    from tests.models import TinyRegression, make_trainer

    root = tmp_path_factory.mktemp("blow_up")
    model = TinyRegression(loss_scale_at={13: 1e4}, nan_at_steps=[19])
    make_trainer(root, default_callbacks(guard="skip"), max_steps=30, log_every_n_steps=10).fit(model)
    return root, model


def test_report_overview_draws_the_blow_up_the_lr_and_nonfinite_losses_at_the_top(blow_up_run):
    from lightning_gradguard.overview import EVENT_STYLES
    from lightning_gradguard.report import draw_report, overview_data

    root, model = blow_up_run
    blow_up = model.losses[13]
    assert blow_up > 1000
    run = summarize(root).runs[0]
    assert max(v for _, v in run.loss if math.isfinite(v)) < blow_up / 100  # the logged loss alone misses it
    data = overview_data(run)
    assert data.loss_max
    assert data.lr
    assert data.events == [(19, "skip")]
    (plot,) = draw_report(summarize(root))
    assert set(plot.axes) == {"norm", "loss", "lr", "clip"}
    loss_steps, loss_values = plot.drawn["loss/loss_max"]
    assert max(loss_values) == pytest.approx(blow_up, rel=1e-6)  # the blow-up is on the loss panel
    assert 13 <= loss_steps[loss_values.index(max(loss_values))] <= 18  # at the end of its own interval
    assert plot.drawn["loss/loss"][1] == [v for _, v in run.loss if math.isfinite(v)]
    # non-finite losses (the NaN of step 19, logged and as its interval's maximum): at the loss panel's top edge
    bad_steps, bad_y = plot.drawn["loss/nonfinite"]
    assert bad_steps == [19]
    assert bad_y == [plot.axes["loss"].get_ylim()[1]]
    assert bad_y[0] > blow_up  # above every finite loss, not at y = 1
    marks = [ln for ln in plot.axes["loss"].get_lines() if list(ln.get_xdata()) == [19]]
    assert [list(ln.get_ydata()) for ln in marks] == [bad_y]
    # the learning-rate panel, on the LR tag
    assert plot.drawn["lr/lr"] == ([s for s, _ in run.lr], [v for _, v in run.lr])
    assert plot.axes["lr"].get_ylabel() == "LR"
    # every event kind its own colour, none the norm line's
    colors = [color for _, color in EVENT_STYLES.values()]
    assert len(set(colors)) == len(colors)
    norm_colors = {ln.get_color() for ln in plot.axes["norm"].get_lines() if len(ln.get_xdata())}
    assert norm_colors.isdisjoint(colors)
    assert plot.drawn["events/skip"][0] == [19]


def test_report_event_kinds_are_read_from_the_line_head():
    from lightning_gradguard.report import event_kind

    assert event_kind("NaNGuard rollback at step 100: loss spike; lr cut") == "rollback"
    assert event_kind("NaNGuard lower_lr at step 90: lr too high") == "lower_lr"
    assert event_kind("NaNGuard raise_lr at step 900: lr recovered") == "raise_lr"
    assert event_kind("NaNGuard warn at step 50: rising norm") == "warn"
    assert event_kind("NaNGuard skip at step 3: nonfinite loss; rollback not needed") == "skip"
    assert event_kind("GradGuard halt at step 7: too many rollbacks") == "halt"


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    """The LSTM demo (guarded) for 12 steps: its loss blows up at lr 10, the guard rolls back and cuts the LR."""
    from lightning_gradguard.demo import run_demo

    root = tmp_path_factory.mktemp("lstm")
    run_demo("lstm", guarded=True, logdir=root, max_steps=12, progress_bar=False)
    return root


def test_report_overview_writes_the_norm_peak_and_the_lr_cut(lstm_run):
    from lightning_gradguard.report import draw_report

    acc = EventAccumulator(str(lstm_run / "lstm_guarded" / "version_0"), size_guidance=GUIDANCE)
    acc.Reload()
    tops = [(e.step, e.value) for e in acc.Scalars("gradguard/grad_norm_max")]
    lr = sorted((e.step, e.value) for e in acc.Scalars("gradguard/lr"))
    run = summarize(lstm_run).runs[0]
    ((step, kind),) = [(s, k) for s, k, _ in run.guard_events]
    assert kind == "rollback"
    (plot,) = draw_report(summarize(lstm_run))
    notes = {(n.panel, n.kind): n for n in plot.notes}
    # the norm's peak: the largest interval maximum, at its step
    peak = notes["norm", "peak"]
    value, at = max((v, -s) for s, v in tops if math.isfinite(v))
    assert (peak.step, peak.value) == (-at, pytest.approx(value, rel=1e-6))
    assert peak.value > 100 * float(np.median([v for _, v in tops]))
    assert re.fullmatch(rf"peak \d[\d.]*(e\d+)? @ step {peak.step}", peak.text), peak.text  # peak 1.16e3 @ step 7
    # the LR cut at the rollback: from the LR logged before it to the one logged at its step
    (change,) = [n for n in plot.notes if n.kind == "lr_change"]
    assert change.step == step
    assert change.before == pytest.approx(max((s, v) for s, v in lr if s < step)[1]) == pytest.approx(10.0)
    assert change.value == pytest.approx(dict(lr)[step]) == pytest.approx(10.0 * 0.003)  # the demo's lr_factor
    assert change.text == "10 → 0.03"
    # both written on their panels, inside them
    for note in (peak, change):
        ax = plot.axes[note.panel]
        (text,) = [t for t in ax.texts if t.get_text() == note.text]
        box, frame = text.get_window_extent(), ax.bbox
        assert frame.x0 <= box.x0 <= box.x1 <= frame.x1
        assert frame.y0 <= box.y0 <= box.y1 <= frame.y1


def test_report_overview_of_a_run_without_lr_changes_has_no_lr_note(blow_up_run):
    from lightning_gradguard.report import draw_report

    root, _ = blow_up_run
    (plot,) = draw_report(summarize(root))
    assert [n for n in plot.notes if n.panel == "lr"] == []
    (loss_note,) = [n for n in plot.notes if n.panel == "loss"]
    assert (loss_note.kind, loss_note.step) == ("nonfinite", 19)  # the NaN loss of step 19, before the blow-up's 1e4
    assert any(t.get_text() == loss_note.text for t in plot.axes["loss"].texts)


@pytest.fixture(scope="module")
def spiky_run(tmp_path_factory):
    """160 steps with 20x loss spikes at steps 140 and 150, logged every 10 steps; the guard only measures them."""
    from lightning_gradguard import NaNGuard
    from tests.models import TinyRegression, make_trainer

    root = tmp_path_factory.mktemp("spiky")
    guard = NaNGuard(divergence=False, stability=False, action="skip")
    model = TinyRegression(loss_scale_at={140: 20.0, 150: 20.0}, lr=0.003)
    make_trainer(root, [guard], max_steps=160, log_every_n_steps=10).fit(model)
    return root, guard


def test_report_shows_the_last_logged_spike_score(spiky_run):
    """Issue 27: the spike score in the summary (text and data) is the last logged ``gradguard/spike_score``."""
    import dataclasses

    from lightning_gradguard.report import spike_phrase

    root, guard = spiky_run
    acc = _events(root)
    logged = acc.Scalars("gradguard/spike_score")
    last = logged[-1]
    assert last.value > 0  # the spikes were judged (steps 128 on): the score is not the trivial 0
    run = summarize(root).runs[0]
    assert run.spike_score == pytest.approx(last.value, rel=1e-6)
    assert run.spike_score_step == last.step
    assert run.spike_scores == {0: run.spike_score}
    assert run.spike_score == pytest.approx(guard.spike_score, rel=1e-6)  # the last write is at the fit's end
    assert dataclasses.asdict(run)["spike_score"] == run.spike_score
    text = format_summary(summarize(root))
    assert f"spike score: {spike_phrase(last.value)} at step {last.step}; a spike: " in text
    assert "6 sigma of the previous 128" in text


def test_report_spike_score_per_optimizer_and_when_missing(tmp_path):
    """``_opt<i>`` tags give one line per optimizer; a guarded run without the tag (no step judged yet) says why; a
    run without the guard says nothing of it."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "two")) as writer:
        for step, (first, second) in ((190, (0.02, 0.0)), (200, (0.025, 0.004))):
            writer.add_scalar("train_loss", 1.0, step)
            writer.add_scalar("gradguard/skipped_steps", 0.0, step)
            writer.add_scalar("gradguard/spike_score", first, step)
            writer.add_scalar("gradguard/spike_score_opt1", second, step)
    with SummaryWriter(str(tmp_path / "short")) as writer:  # a guarded run of a few finite steps: nothing judged
        writer.add_scalar("train_loss", 1.0, 9)
        writer.add_scalar("gradguard/skipped_steps", 0.0, 9)
    with SummaryWriter(str(tmp_path / "plain")) as writer:
        writer.add_scalar("train_loss", 1.0, 9)
    summary = summarize(tmp_path)
    plain, short, two = summary.runs
    assert two.spike_score == pytest.approx(0.025)  # the last value, not the first
    assert two.spike_scores == pytest.approx({0: 0.025, 1: 0.004})
    assert two.spike_score_step == 200
    assert (short.spike_score, short.spike_scores, plain.spike_score) == (None, {}, None)
    text = format_summary(summary)
    assert "  spike score: 0.025 (1 in 40 judged steps spiked) at step 200; a spike: " in text
    assert "  spike score (optimizer 1): 0.004 (1 in 250 judged steps spiked)" in text.splitlines()
    assert text.count("spike score: not logged (no step judged") == 1  # the short guarded run, not the plain one
