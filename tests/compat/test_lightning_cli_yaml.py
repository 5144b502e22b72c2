"""The three callbacks configured in a LightningCLI YAML file (``class_path`` + ``init_args``), run in-process.

What this proves: every argument reaches the callbacks through jsonargparse (type hints, Literal choices, keyword-only
arguments, lazy package exports as class paths); the fit runs with them (a NaN is rolled back with the configured LR
factor, the monitor logs on its configured schedule); the saved ``config.yaml`` round-trips; a bad value in the
YAML fails before training with our message naming the argument; a misspelled key names the closest valid one
(``KeySuggestingParser``).
"""

from __future__ import annotations

from argparse import ArgumentError

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, KeySuggestingParser, NaNGuard
from lightning_gradguard.key_suggesting_parser import suggest_keys
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


def _cli(tmp_path, config, **kwargs):
    path = tmp_path / "gradguard.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path)]
    return LightningCLI(TinyRegression, args=args, save_config_kwargs={"overwrite": True}, **kwargs)


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
    # every second step, and the last values at the rollback's step and at the end (issue 26)
    assert sorted(tb["gradguard/grad_norm"]) == [0, 2, 4, 5, 6, 8, 10, 12]
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


def _misspelled(tmp_path, capsys, **kwargs):
    """The error of a LightningCLI run on a config with a misspelled key (stderr and the exception, joined)."""
    with pytest.raises((SystemExit, ArgumentError)) as info:
        _cli(tmp_path, kwargs.pop("config"), **kwargs)
    return str(info.value) + capsys.readouterr().err


@pytest.mark.parametrize(
    ("index", "typo", "meant"),
    [(1, "z_treshold", "z_threshold"), (2, "lr_facter", "lr_factor"), (0, "log_every_n_step", "log_every_n_steps")],
)
def test_misspelled_callback_key_names_the_closest_valid_one(tmp_path, capsys, index, typo, meant):
    """Issue 26: jsonargparse only says "Option 'z_treshold' is not accepted", deep in a list of union errors."""
    config = _config(tmp_path)
    callback = config["trainer"]["callbacks"][index]
    callback["init_args"][typo] = 3
    message = _misspelled(tmp_path, capsys, config=config, parser_class=KeySuggestingParser)
    where = callback["class_path"]
    first = message[message.index("error: ") :].splitlines()[0]
    assert first == f"error: unknown key '{typo}' in the init_args of {where}: did you mean '{meant}'?"
    assert f"Option '{typo}' is not accepted" in message  # jsonargparse's own message follows
    assert not (tmp_path / "run" / "version_0").exists()  # failed before training


def test_misspelled_config_keys_and_far_typos(tmp_path, capsys):
    config = _config(tmp_path)
    config["trainer"]["max_step"] = 3
    message = _misspelled(tmp_path, capsys, config=config, parser_class=KeySuggestingParser)
    assert "error: unknown key 'trainer.max_step' in the config: did you mean 'trainer.max_steps'?" in message
    # nothing close: the valid keys of that class instead of a guess
    config = _config(tmp_path, guard_args={"qqq": 1})
    message = _misspelled(tmp_path, capsys, config=config, parser_class=KeySuggestingParser)
    assert (
        "error: unknown key 'qqq' in the init_args of lightning_gradguard.NaNGuard; the valid keys there: " in message
    )
    assert "lr_factor, lr_recovery_steps, max_consecutive_skips" in message


def test_without_the_parser_class_the_key_is_still_named(tmp_path, capsys):
    """Plain LightningCLI: jsonargparse names the unknown key (no suggestion); the hint needs the parser_class."""
    config = _config(tmp_path)
    config["trainer"]["callbacks"][1]["init_args"]["z_treshold"] = 3
    message = _misspelled(tmp_path, capsys, config=config)
    assert "Option 'z_treshold' is not accepted" in message
    assert "did you mean" not in message


def test_suggest_keys_reads_jsonargparse_messages():
    nested = (
        'Parser key "trainer.callbacks":\n  Errors:\n    - Problem with given class_path '
        "'lightning_gradguard.AdaptiveGradientClipping':\n        Option 'z_treshold' is not accepted\n"
    )
    hinted = suggest_keys(nested)
    assert hinted.splitlines()[0] == (
        "unknown key 'z_treshold' in the init_args of lightning_gradguard.AdaptiveGradientClipping: "
        "did you mean 'z_threshold'?"
    )
    assert hinted.endswith(nested)
    assert suggest_keys(hinted) == hinted  # once only (nested parsers)
    assert suggest_keys("Problem with given class_path 'no.such.Module':\n  Option 'x' is not accepted") == (
        "Problem with given class_path 'no.such.Module':\n  Option 'x' is not accepted"
    )  # nothing to suggest from: the message as it was
    assert suggest_keys("Expected a <class 'int'>") == "Expected a <class 'int'>"


def test_example_scripts_suggest_the_key(tmp_path):
    """examples/lstm.py with its YAML, one key misspelled: exit code 2 and the suggestion, before any training."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((repo / "examples" / "configs" / "lstm.yaml").read_text())
    clip = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("AdaptiveGradientClipping"))
    clip["init_args"]["z_treshold"] = clip["init_args"].pop("z_threshold")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(repo / "examples" / "lstm.py"), "fit", "--config", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "error: unknown key 'z_treshold' in the init_args of lightning_gradguard.AdaptiveGradientClipping: "
        "did you mean 'z_threshold'?"
    ) in proc.stderr
    assert not (tmp_path / "gradguard_logs").exists()
