"""`run_demo`: both examples guarded and unguarded through the demo's code path, and the demo settings' story."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard.demo import (
    DEMOS,
    DemoResult,
    figures_table,
    run_demo,
    stdout_is_terminal,
    story_margin,
    tensorboard_guide,
)

GUIDANCE = {"histograms": 0, "scalars": 0, "images": 0, "tensors": 0}


def _tags(log_dir: str) -> list[str]:
    acc = EventAccumulator(log_dir, size_guidance=GUIDANCE)
    acc.Reload()
    return acc.Tags()["scalars"]


@pytest.mark.parametrize("example", ["lstm", "cnn"])
@pytest.mark.parametrize("guarded", [False, True])
def test_tiny_demo_runs_through_the_demo_path(tmp_path, example, guarded):
    pytest.importorskip("sklearn")
    result = run_demo(example, guarded=guarded, logdir=tmp_path, max_steps=12, progress_bar=False)
    assert isinstance(result, DemoResult)
    assert result.steps == 12
    assert result.guarded is guarded
    assert result.final_metric_name == DEMOS[example].metric
    assert math.isfinite(result.initial_loss)
    assert result.log_dir.startswith(str(tmp_path))
    assert result.tensorboard_command == f"tensorboard --logdir {tmp_path}"
    tags = _tags(result.log_dir)
    assert "train_loss_step" in tags
    has_gradguard = any(t.startswith("gradguard/") for t in tags)
    assert has_gradguard is guarded
    if guarded:
        assert {"gradguard/grad_norm", "gradguard/clip_threshold", "gradguard/skipped_steps"} <= set(tags)
        assert result.clip_rate is not None
        assert 0.0 <= result.clip_rate <= 1.0
        kinds = [ev["kind"] for ev in result.events]  # each event counted once, under its kind
        assert (result.skips, result.rollbacks) == (kinds.count("skip"), kinds.count("rollback"))
        # 12 steps: only a non-finite step is judged so early (a finite one needs 128 earlier values)
        assert result.spike_score is None or 0.0 <= result.spike_score <= 1.0
    else:
        assert result.clip_rate is None
        assert result.skips == result.rollbacks == 0
        assert result.events == []
        assert result.spike_score is None
        assert result.spike_account() == "not measured (no guard)"
    assert result.to_dict()["spike_score"] == result.spike_score
    text = "\n".join(result.summary_lines())
    assert f"  spike score: {result.spike_account()}" in text
    assert result.tensorboard_command in text
    assert result.final_metric_name in text


def test_unknown_example_and_bad_steps():
    with pytest.raises(ValueError, match="example"):
        run_demo("gru")
    with pytest.raises(ValueError, match="max_steps"):
        run_demo("lstm", max_steps=0)


def test_override_changes_the_model(tmp_path):
    result = run_demo("lstm", guarded=False, logdir=tmp_path, max_steps=3, progress_bar=False, overrides={"lr": 1e-4})
    # a tiny LR cannot blow the loss up in three steps
    assert not result.blew_up


def _result(metric: float, *, guarded: bool = True, peak: float = 1.0, nonfinite: int = 0, example: str = "lstm"):
    settings = DEMOS[example]
    blew_up = nonfinite > 0 or peak > 10.0
    learned = not math.isnan(metric) and (
        metric > settings.learned_bar if settings.higher_is_better else metric < settings.learned_bar
    )
    return DemoResult(
        example, guarded, 100, blew_up and not learned, blew_up, learned, 1.0, peak, 1.0, 1.0, nonfinite,
        settings.metric, metric, settings.baseline, None, 0, 0, learned_bar=settings.learned_bar,
        failed_bar=settings.failed_bar, higher_is_better=settings.higher_is_better,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("example", "metric", "verdict"),
    [
        ("lstm", 0.001, "learned"),
        ("lstm", 0.03, "inconclusive"),  # between the bars (0.0167, 0.083): never part of the story
        ("lstm", 0.17, "did not learn"),
        ("lstm", math.nan, "did not learn"),
        ("cnn", 0.9, "learned"),
        ("cnn", 0.35, "inconclusive"),
        ("cnn", 0.1, "did not learn"),
    ],
)
def test_verdicts_read_the_metric_against_the_two_bars(example, metric, verdict):
    result = _result(metric, example=example)
    assert result.verdict == verdict
    assert (result.learn_margin >= 1) is (verdict == "learned")
    assert (result.fail_margin >= 1) is (verdict == "did not learn")


def test_story_margin_is_the_closest_condition():
    plain = _result(0.17, guarded=False, peak=1e4)
    guarded = _result(0.001, peak=1e4)
    assert plain.verdict == "blew up, did not learn"
    assert story_margin(plain, guarded) == pytest.approx(min(0.17 * 12, (1 / 60) / 0.001, 1e4 / 10))
    # a loss that never rose 10x is no blow-up, whatever the final metric: the story fails
    assert story_margin(_result(0.17, guarded=False, peak=5.0), guarded) == pytest.approx(0.5)
    # an inconclusive guarded run fails the story too
    assert story_margin(plain, _result(0.03)) < 1
    # a non-finite unguarded run: blow-up and failure are infinite, the guarded margin decides
    nan_run = _result(math.nan, guarded=False, nonfinite=5)
    assert nan_run.blow_up_factor == math.inf
    assert story_margin(nan_run, guarded) == pytest.approx((1 / 60) / 0.001)
    row = figures_table([nan_run, guarded]).splitlines()[-1]
    assert "| non-finite | test_mse nan (blew up, did not learn) | test_mse 0.001 (learned) | 17x |" in row


def test_the_cnn_fault_is_in_the_data_and_the_clipper_cuts_it(tmp_path, monkeypatch):
    """The injected batch at step 12 instead of 150, to keep it short: unguarded the loss explodes or turns
    non-finite; guarded, the clipper scales that step's gradients down by far more than 10x."""
    pytest.importorskip("sklearn")
    monkeypatch.setitem(DEMOS, "cnn", replace(DEMOS["cnn"], data={**DEMOS["cnn"].data, "fault_batch": 12}))
    plain, guarded = (
        run_demo("cnn", guarded=g, logdir=tmp_path, max_steps=16, progress_bar=False) for g in (False, True)
    )
    assert plain.fault == guarded.fault == "training batch 12 arrives with its inputs x1000"
    assert plain.blew_up
    assert plain.fault_clip is None
    assert guarded.fault_clip is not None
    assert guarded.fault_clip < 0.1
    assert "injected fault: training batch 12" in "\n".join(guarded.summary_lines())


def test_tensorboard_guide_says_what_to_open_first():
    """Issue 26: at TensorBoard's defaults (smoothing 0.6, outliers ignored) the explosion cannot be seen; the demo's
    closing lines point to the guard's overview image first, then to the two Scalars settings."""
    guarded = "\n".join(tensorboard_guide("logs"))
    assert guarded.startswith("Open the logs: tensorboard --logdir logs\n  1. Images tab, gradguard/overview")
    assert '2. Scalars tab: set Smoothing to 0 and untick "Ignore outliers in chart scaling"' in guarded
    plain = "\n".join(tensorboard_guide("logs", guarded=False))
    assert "gradguard/overview" not in plain  # an unguarded run has no guard to draw it
    assert "Smoothing to 0" in plain


def test_progress_bar_follows_the_terminal(tmp_path, capsys):
    assert not stdout_is_terminal()  # pytest captures stdout
    run_demo("lstm", guarded=True, logdir=tmp_path, max_steps=2)  # progress_bar=None: off here
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err


def test_guarded_account_gives_the_guards_spike_score(tmp_path, monkeypatch):
    """Issue 27: past 128 steps the guard judges steps; the closing account and the JSON carry its spike score."""
    import json

    import lightning_gradguard.demo as demo
    from lightning_gradguard import NaNGuard
    from lightning_gradguard.report import SPIKE_RULE, spike_phrase

    made: list = []
    real = demo.guarded_callbacks

    def recording(*args, **kwargs):
        made.extend(real(*args, **kwargs))
        return list(made)

    monkeypatch.setattr(demo, "guarded_callbacks", recording)
    result = run_demo("lstm", guarded=True, logdir=tmp_path, max_steps=135, progress_bar=False)
    (guard,) = [cb for cb in made if isinstance(cb, NaNGuard)]
    assert guard.spike_score is not None  # finite steps from 128 on were judged
    assert result.spike_score == guard.spike_score
    assert json.loads(json.dumps(result.to_dict()))["spike_score"] == pytest.approx(guard.spike_score)
    text = "\n".join(result.summary_lines())
    assert f"  spike score: {spike_phrase(guard.spike_score)}; {SPIKE_RULE}" in text
