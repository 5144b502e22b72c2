"""`run_demo`: both examples guarded and unguarded through the demo's code path, and the demo settings' story."""

from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard.demo import DEMOS, DemoResult, run_demo

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
    else:
        assert result.clip_rate is None
        assert result.skips == result.rollbacks == 0
        assert result.events == []
    text = "\n".join(result.summary_lines())
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
