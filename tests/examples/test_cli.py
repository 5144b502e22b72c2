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
    # the closing lines: which TensorBoard view first, and the two Scalars settings whose defaults hide the spike
    closing = out[out.index(f"Open the logs: tensorboard --logdir {logdir}") :]
    assert "1. Images tab, gradguard/overview" in closing
    assert '2. Scalars tab: set Smoothing to 0 and untick "Ignore outliers in chart scaling"' in closing
    assert closing.rstrip().endswith(f"Summarise them: gradguard report {logdir}")
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


def test_piped_demo_output_has_no_progress_bar_frames(tmp_path):
    """Issue 26: piped output (CI logs, ``| tee``) collected ~1,500 redrawn progress-bar frames. With stdout a pipe
    the bar is off by itself; the guard's event line still reaches stderr, saying each thing once."""
    proc = _run("demo", "lstm", "--steps", "12", "--logdir", str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout
    assert "\r" not in proc.stderr
    assert "it/s" not in proc.stdout + proc.stderr  # no tqdm frame at all
    assert "(no progress bar: stdout is not a terminal)" in proc.stdout
    assert "Images tab, gradguard/overview" in proc.stdout
    events = [line for line in proc.stderr.splitlines() if line.startswith("NaNGuard ")]
    assert events, proc.stderr[-2000:]  # the demo's rollback of the blow-up (step 7 on every path measured)
    for line in events:
        cause = line.split(": ", 1)[1].split(";")[0]
        assert line.count(cause) == 1, line
        assert "the state is damaged" not in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal test (Linux pty semantics)")
def test_demo_in_a_terminal_shows_the_progress_bar(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 0x0 terminal gets an empty bar
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [*_gradguard(), "demo", "lstm", "--steps", "3", "--logdir", str(tmp_path / "logs")]
    proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "no progress bar" not in out
    assert "\rEpoch 0:" in out  # the bar, redrawing its line
