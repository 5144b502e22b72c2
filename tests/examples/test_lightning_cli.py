"""examples/*.py through LightningCLI with the YAML configs (subprocess): the gradguard callbacks come from YAML."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
GUIDANCE = {"histograms": 0, "scalars": 0, "images": 0, "tensors": 0}


@pytest.mark.parametrize(
    ("script", "config", "name"), [("lstm", "lstm", "lstm_cli"), ("deep_cnn", "deep_cnn", "deep_cnn_cli")]
)
def test_lightning_cli_fit_with_yaml_callbacks(tmp_path, script, config, name):
    if script == "deep_cnn":
        pytest.importorskip("sklearn")
    cmd = [
        sys.executable,
        str(REPO / "examples" / f"{script}.py"),
        "fit",
        "--config",
        str(REPO / "examples" / "configs" / f"{config}.yaml"),
        "--trainer.max_steps",
        "6",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / name / "version_0"
    acc = EventAccumulator(str(run), size_guidance=GUIDANCE)
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    # one tag from each callback configured in the YAML
    assert "gradguard/grad_norm" in scalars  # GradientNormMonitor
    assert "gradguard/clip_threshold" in scalars  # AdaptiveGradientClipping
    assert "gradguard/skipped_steps" in scalars  # NaNGuard
    assert max(e.step for e in acc.Scalars("gradguard/grad_norm")) == 5
    assert (run / "config.yaml").read_text().count("lightning_gradguard.") >= 3
