"""The `gradguard` command: --version/--help as subprocesses, report on a real run, demo in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_gradguard import __version__
from lightning_gradguard.cli import main
from tests.models import guarded_run


def _gradguard() -> list[str]:
    script = Path(sys.executable).parent / "gradguard"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "lightning_gradguard.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*_gradguard(), *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def test_version_is_fast_and_does_not_import_lightning():
    proc = _run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"gradguard {__version__}"
    code = "import sys; from lightning_gradguard import cli; print('lightning' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_help_lists_the_subcommands():
    proc = _run("--help")
    assert proc.returncode == 0
    assert "demo" in proc.stdout
    assert "report" in proc.stdout
    sub = _run("demo", "--help")
    assert "--quick" in sub.stdout
    assert "--unguarded" in sub.stdout


def test_report_on_a_generated_run(tmp_path):
    root = guarded_run(tmp_path / "logs")
    proc = _run("report", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "run/version_0" in proc.stdout
    assert "p50" in proc.stdout
    assert "step 20 rollback" in proc.stdout
    png = root / "gradguard_report.png"
    assert png.exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    custom = tmp_path / "out.png"
    assert main(["report", str(root), "--png", str(custom)]) == 0
    assert custom.exists()


def test_report_without_event_files_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_in_process_prints_the_account(tmp_path, capsys):
    logdir = tmp_path / "demo"
    out_json = tmp_path / "out" / "demo.json"
    args = ["demo", "lstm", "--both", "--steps", "15", "--no-progress-bar", "--logdir", str(logdir)]
    assert main([*args, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    written = json.loads(out_json.read_text())
    assert [(r["guarded"], r["steps"]) for r in written] == [(False, 15), (True, 15)]
    guarded = written[1]
    assert f"final test_mse: {guarded['final_metric']:.4g}" in out  # the JSON holds what was printed
    assert guarded["verdict"] in out
    assert "15 steps" in out
    assert "clip rate" in out
    assert "NaNGuard:" in out
    assert "final test_mse" in out
    assert f"tensorboard --logdir {logdir}" in out
    assert (logdir / "lstm_guarded" / "version_0").is_dir()
    assert main(["report", str(logdir), "--no-png"]) == 0
    report = capsys.readouterr().out
    assert "lstm_guarded/version_0" in report
    assert "lstm_unguarded/version_0: last step" in report  # the unguarded run sits beside the guarded one


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 0
    assert "usage: gradguard" in capsys.readouterr().out


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "gru"])
    assert exc.value.code == 2
