"""Events of GradGuard and FabricGradGuard on the terminal and through logging: one line per event whatever the
logging configuration, the same wording as the Lightning NaNGuard's line, rank zero only.

pytest puts its own handlers on the root logger during a test; "nothing configured" is emulated by emptying the root
logger's handlers (Python's last-resort handler then writes to the captured stderr, as in a bare script), and checked
for real once in a subprocess."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_gradguard import FabricGradGuard, GradGuard, NaNGuard
from lightning_gradguard.core.guard import GuardEvent
from lightning_gradguard.plain._announce import announce_line
from tests.models import TinyRegression, loader

REPO = Path(__file__).resolve().parents[2]
NAN_AT = 3


class _Writer:
    """A SummaryWriter stand-in that keeps what it is given."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, text, global_step))

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.setdefault(tag, []).append((global_step, value))

    def flush(self) -> None:
        pass


def _run(guard: GradGuard, model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6, fabric: Any = None) -> None:
    """A plain loop over the regression data of ``tests.models`` with the loss multiplied by NaN at step NAN_AT (as
    ``TinyRegression(nan_at_steps=...)`` does in a Trainer)."""
    for step, (x, y) in enumerate(loader()):
        if step == steps:
            break
        loss = nn.functional.mse_loss(model(x), y)
        if step == NAN_AT:
            loss = loss * float("nan")
        # the step's loss once more, for the rerun diagnosis: the NaN was a one-off (transient), as in the Trainer,
        # whose rerun of training_step no longer meets the injection's step
        again = lambda x=x, y=y: nn.functional.mse_loss(model(x), y)  # noqa: E731
        if fabric is not None:
            fabric.backward(loss)
            guard.before_step(loss, recompute=again)
            opt.step()
        else:
            loss.backward()
            if guard.before_step(loss, recompute=again):
                opt.step()
        guard.after_step()
        opt.zero_grad()


def _plain(**kwargs: Any) -> GradGuard:
    torch.manual_seed(0)
    model = TinyRegression()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradGuard(model, opt, action="skip", **kwargs)
    _run(guard, model, opt)
    return guard


def _fabric_guard(**kwargs: Any) -> tuple[FabricGradGuard, Fabric]:
    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1)
    module = TinyRegression()
    model, opt = fabric.setup(module, torch.optim.Adam(module.parameters(), lr=0.01))
    guard = FabricGradGuard(fabric, model, opt, action="skip", **kwargs)
    _run(guard, model, opt, fabric=fabric)
    return guard, fabric


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Guard " in line]


@pytest.fixture
def bare_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The root logger as in a script that configures nothing (pytest's capture handlers taken off)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def _event_line(guard: GradGuard, owner: str) -> str:
    """The line of the guard's one event (a skip), as ``GuardEvent.line`` writes it for ``owner``."""
    (event,) = guard.events
    assert event["kind"] == "skip"
    return GuardEvent(**event).line(owner)


# ----------------------------------------------------------------------------------- one line, whatever the config


def test_nothing_configured_one_line_on_stderr(bare_logging: None, capfd: pytest.CaptureFixture[str]) -> None:
    guard = _plain()
    out, err = capfd.readouterr()
    assert _lines(err) == [_event_line(guard, "GradGuard")]
    assert _lines(out) == []


def test_basic_config_on_stderr_one_line_not_two(
    bare_logging: None, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    handler = logging.StreamHandler(sys.stderr)  # what logging.basicConfig(level=logging.DEBUG) installs
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(caplog.handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        guard = _plain()
    finally:
        root.setLevel(old)
    line = _event_line(guard, "GradGuard")
    assert _lines(capsys.readouterr().err) == [f"WARNING:lightning_gradguard.plain:{line}"]
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records if "Guard" in r.getMessage()] == [
        ("lightning_gradguard.plain", logging.WARNING, line)
    ]


def test_a_log_file_gets_the_record_and_the_terminal_one_line(
    bare_logging: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = logging.FileHandler(tmp_path / "train.log")  # logging.basicConfig(filename=...): used to be silent
    logging.getLogger().addHandler(handler)
    try:
        guard = _plain()
    finally:
        handler.close()
    line = _event_line(guard, "GradGuard")
    assert _lines(capsys.readouterr().err) == [line]
    assert _lines((tmp_path / "train.log").read_text()) == [line]


def test_a_handler_on_another_logger_changes_nothing(bare_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    other = logging.getLogger("someone.else")
    other.addHandler(logging.StreamHandler(sys.stderr))
    try:
        guard = _plain()
    finally:
        other.handlers.clear()
    assert _lines(capsys.readouterr().err) == [_event_line(guard, "GradGuard")]


def test_announce_false_leaves_the_line_to_logging(
    bare_logging: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        guard = _plain(announce=False)
    finally:
        handler.close()
    assert _lines(capsys.readouterr().err) == []  # the user's logging sends it to the file only
    assert _lines((tmp_path / "train.log").read_text()) == [_event_line(guard, "GradGuard")]


def test_real_processes_nothing_configured_then_basic_config() -> None:
    script = textwrap.dedent(
        f"""
        import logging, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.plain.test_announce import _plain
        _plain()
        print("-- basicConfig", file=sys.stderr, flush=True)
        logging.basicConfig(level=logging.DEBUG)
        _plain()
        print("-- announce=False, nothing on the terminal wanted", file=sys.stderr, flush=True)
        logging.getLogger().handlers.clear()
        logging.getLogger().addHandler(logging.NullHandler())
        _plain(announce=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare, configured, silenced = proc.stderr.split("\n-- ")
    assert len(_lines(bare)) == 1
    assert _lines(bare)[0].startswith(f"GradGuard skip at step {NAN_AT}: nonfinite loss")
    assert _lines(configured) == [f"WARNING:lightning_gradguard.plain:{_lines(bare)[0]}"]
    assert _lines(silenced) == []
    assert _lines(proc.stdout) == []


# ------------------------------------------------------------------------------ the same words as the callback


def _segments(line: str, owner: str) -> list[str]:
    assert line.startswith(owner + " ")
    return line[len(owner) + 1 :].split("; ")


def _trainer_line(caplog: pytest.LogCaptureFixture) -> str:
    torch.manual_seed(0)
    model = TinyRegression(nan_at_steps={NAN_AT})
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NaNGuard(action="skip")],
    )
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer.fit(model, loader())
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_gradguard.callbacks.nan_guard"]
    caplog.clear()
    assert len(lines) == 1
    return lines[0]


def test_plain_and_fabric_lines_have_the_callbacks_wording(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    trainer = _trainer_line(caplog)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        plain = _plain()
        fabric_guard, _ = _fabric_guard()
    plain_line, fabric_line = _event_line(plain, "GradGuard"), _event_line(fabric_guard, "FabricGradGuard")
    err = _lines(capfd.readouterr().err)
    assert err == [plain_line, fabric_line]  # each once on stderr (caplog's handler is not a terminal)
    records = [(r.name, r.getMessage()) for r in caplog.records]
    assert records == [("lightning_gradguard.plain", plain_line), ("lightning_gradguard.fabric", fabric_line)]
    # the Trainer knows the batch (what it held, which module went non-finite first); a plain loop does not
    batch_only = ("the input batch", "first non-finite output")
    expected = [_digits(s) for s in _segments(trainer, "NaNGuard") if not s.startswith(batch_only)]
    assert expected[0] == f"skip at step {NAN_AT}: nonfinite loss"
    assert "rerun diagnosis: transient (the step gave loss nan, gradient norm nan" in expected
    # the rerun's loss and norm: the same words, the numbers of each loop's own model
    assert [_digits(s) for s in _segments(plain_line, "GradGuard")] == expected
    assert [_digits(s) for s in _segments(fabric_line, "FabricGradGuard")] == expected


def _digits(segment: str) -> str:
    return re.sub(r"\d+\.\d+", "#", segment)


# ---------------------------------------------------------------------------------------- writer, ranks, inputs


def test_plain_writes_the_callbacks_event_text_and_scalars_to_a_summary_writer(
    capfd: pytest.CaptureFixture[str],
) -> None:
    writer = _Writer()
    guard = _plain(writer=writer, log_every_n_steps=1)
    line = _event_line(guard, "GradGuard")
    assert writer.texts == [("gradguard/nan_guard_events", line, NAN_AT)]  # NaNGuard's text tag
    assert (NAN_AT, 1.0) in writer.scalars["gradguard/skipped_steps"]
    assert _lines(capfd.readouterr().err) == [line]


def test_a_custom_reduce_without_torch_distributed_still_announces(capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = TinyRegression()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradGuard(model, opt, action="skip", all_reduce_max=lambda t: t)
    _run(guard, model, opt)
    assert _lines(capfd.readouterr().err) == [_event_line(guard, "GradGuard")]


def test_a_nan_input_batch_is_announced_too(bare_logging: None, capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradGuard(model, opt, action="skip")
    for step in range(4):
        x = torch.randn(8, 8)
        if step == 2:
            x[0, 0] = math.nan
        loss = model(x).pow(2).mean()
        loss.backward()
        if guard.before_step(loss):
            opt.step()
        guard.after_step()
        opt.zero_grad()
    err = _lines(capfd.readouterr().err)
    assert err == [_event_line(guard, "GradGuard")]
    assert err[0].startswith("GradGuard skip at step 2: nonfinite loss")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"announce": "yes"}, TypeError, "GradGuard: announce must be"),
        ({"lr_overwrite": "always"}, ValueError, r"GradGuard: lr_overwrite must be one of \('reapply', 'warn'"),
        ({"lr_overwrite": 1}, TypeError, "GradGuard: lr_overwrite must be"),
    ],
)
def test_new_arguments_are_checked(kwargs: dict[str, Any], error: type, match: str) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(error, match=match):
        GradGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_dict_config_disabling_existing_loggers_does_not_silence_the_terminal_line(
    bare_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("lightning_gradguard.plain")
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    # what logging.config.dictConfig({...}) does by default to loggers created before it (disable_existing_loggers)
    logger.disabled = True
    try:
        guard = _plain()
    finally:
        logger.disabled = False
        logging.getLogger().removeHandler(handler)
    assert _lines(capsys.readouterr().err) == [_event_line(guard, "GradGuard")]


def test_the_line_goes_above_an_active_tqdm_bar(bare_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    tqdm = pytest.importorskip("tqdm")
    with tqdm.tqdm(total=10, file=sys.stderr, ascii=True) as bar:
        bar.update(3)
        announce_line(logging.getLogger("lightning_gradguard.plain"), "GradGuard skip at step 1: nonfinite loss")
    err = capsys.readouterr().err
    assert err.count("GradGuard skip at step 1: nonfinite loss") == 1
    assert "\nGradGuard skip at step 1: nonfinite loss\n" in err.replace("\r", "\n")  # on a line of its own


def test_announce_can_be_switched_off_later(bare_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = TinyRegression()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradGuard(model, opt, action="skip")
    assert guard.announce is True
    guard.announce = False
    logging.getLogger().addHandler(logging.NullHandler())  # a configuration that shows nothing
    _run(guard, model, opt)
    assert _lines(capsys.readouterr().err) == []
    with pytest.raises(TypeError, match="GradGuard: announce must be"):
        guard.announce = "no"  # type: ignore[assignment]


class _ConsoleHandler(logging.Handler):
    """A handler that prints through a console object, as rich's RichHandler does (``console.file``)."""

    def __init__(self) -> None:
        super().__init__()
        self.console = type("Console", (), {"file": sys.stderr})()

    def emit(self, record: logging.LogRecord) -> None:
        print("console:", record.getMessage(), file=self.console.file)


def _absl_handler() -> logging.Handler:
    absl_logging = pytest.importorskip("absl.logging")
    handler = absl_logging.ABSLHandler(absl_logging.PythonFormatter())
    handler.python_handler.stream = sys.stderr  # the captured stderr of this test
    return handler


@pytest.mark.parametrize("make", [_ConsoleHandler, _absl_handler], ids=["rich_like", "absl"])
def test_terminal_handlers_of_other_libraries_are_recognised(
    make: Any, bare_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = make()
    logging.getLogger().addHandler(handler)
    guard = _plain()
    line = _event_line(guard, "GradGuard")
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1
    assert err[0].endswith(line)
