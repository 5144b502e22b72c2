"""The three callbacks configured in a LightningCLI YAML file (``class_path`` + ``init_args``), run in-process.

What this proves: every argument reaches the callbacks through jsonargparse (type hints, Literal choices, keyword-only
arguments, lazy package exports as class paths); the fit runs with them (a NaN is rolled back with the configured LR
factor, the monitor logs on its configured schedule); the saved ``config.yaml`` round-trips; a bad value in the
YAML fails before training with our message naming the argument.
"""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard
from tests.compat.common import tb_scalars
from tests.models import TinyRegression


def _config(tmp_path, guard_args=None):
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 12,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "run", "version": 0},
            },
            "callbacks": [
                {
                    "class_path": "lightning_gradguard.GradientNormMonitor",
                    "init_args": {"log_every_n_steps": 2, "flow_every_n_logs": 0, "vanishing_patience": 4},
                },
                {
                    "class_path": "lightning_gradguard.AdaptiveGradientClipping",
                    "init_args": {"method": "percentile", "percentile": 50.0, "window": 20, "warmup_steps": 2},
                },
                {
                    "class_path": "lightning_gradguard.NaNGuard",
                    "init_args": {
                        "action": "rollback",
                        "lr_factor": 0.25,
                        "snapshot_every_n_steps": 2,
                        "snapshot_confirm_steps": 0,
                        **(guard_args or {}),
                    },
                },
            ],
        },
        "model": {"nan_at_steps": [5], "lr": 0.02},
    }


def _cli(tmp_path, config):
    path = tmp_path / "gradguard.yaml"
    path.write_text(yaml.safe_dump(config))
    return LightningCLI(TinyRegression, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})


def test_three_callbacks_from_yaml(tmp_path):
    cli = _cli(tmp_path, _config(tmp_path))
    trainer = cli.trainer
    (mon,) = [c for c in trainer.callbacks if isinstance(c, GradientNormMonitor)]
    (clip,) = [c for c in trainer.callbacks if isinstance(c, AdaptiveGradientClipping)]
    (guard,) = [c for c in trainer.callbacks if isinstance(c, NaNGuard)]
    assert (mon.log_every_n_steps, mon.flow_every_n_logs, mon.vanishing_patience) == (2, 0, 4)
    assert (clip.method, clip.percentile, clip.window, clip.warmup_steps) == ("percentile", 50.0, 20, 2)
    assert (guard.lr_factor, guard.snapshot_every_n_steps) == (0.25, 2)

    assert trainer.global_step == 12
    assert [(e["step"], e["kind"]) for e in guard.events] == [(5, "rollback")]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)
    assert clip.state_dict()["optimizers"][0]["steps"] == 12
    tb = tb_scalars(tmp_path / "run" / "version_0")
    assert sorted(tb["gradguard/grad_norm"]) == [0, 2, 4, 6, 8, 10]
    assert "gradguard/clip_threshold" in tb
    assert tb["gradguard/lr_scale"][5] == 0.25

    saved = yaml.safe_load((tmp_path / "run" / "version_0" / "config.yaml").read_text())
    by_path = {c["class_path"]: c["init_args"] for c in saved["trainer"]["callbacks"]}
    assert by_path["lightning_gradguard.NaNGuard"]["lr_factor"] == 0.25
    assert by_path["lightning_gradguard.AdaptiveGradientClipping"]["method"] == "percentile"
    assert by_path["lightning_gradguard.GradientNormMonitor"]["log_every_n_steps"] == 2


def test_bad_value_in_yaml_fails_before_training(tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        _cli(tmp_path, _config(tmp_path, guard_args={"lr_factor": 2.0}))
    message = str(info.value) + capsys.readouterr().err
    assert "lr_factor" in message
    assert not (tmp_path / "run" / "version_0").exists() or not list((tmp_path / "run" / "version_0").glob("events*"))
