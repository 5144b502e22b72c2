"""``gradguard drill lstm --quick``: every fault injected into the healthy LSTM example is handled, and what the guard
did is the right thing (a bar-style check: actions and diagnoses, with the drill's loss margins; no loss values)."""

from __future__ import annotations

import time

import pytest

from lightning_gradguard._drill_run import DRILL_PLANS, ORDER, drill_faults
from lightning_gradguard.cli import main

# fault -> what its row's "guard did" cell must say
RIGHT = {
    "nan_weight": "rollback (nonfinite_params, diagnosis state",
    "nan_batch": "skip (nonfinite_loss, diagnosis data)",
    "inf_loss": "skip (nonfinite_loss, diagnosis transient)",
    "spike": "clipped x",
    "transient": "skip (nonfinite_loss, diagnosis transient)",
    "bad_batches": "skip x3 (nonfinite_loss, diagnosis data)",
}


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c for c in line.split("  ") if c.strip()]
        if cells and cells[0].strip() in RIGHT:
            rows[cells[0].strip()] = [c.strip() for c in cells]
    return rows


@pytest.fixture(scope="module")
def quick_lstm(tmp_path_factory):
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    t0 = time.perf_counter()
    try:
        code = main(["drill", "lstm", "--quick", "--logdir", str(tmp_path_factory.mktemp("drill"))])
    finally:
        capture.undo()
    return code, buffer.getvalue(), time.perf_counter() - t0


def test_quick_lstm_drill_exits_zero_in_under_a_minute(quick_lstm) -> None:
    code, out, wall = quick_lstm
    assert code == 0, out
    assert wall < 60
    assert "6 of 6 injected faults handled" in out


@pytest.mark.parametrize("fault", ORDER)
def test_each_fault_row_says_handled_the_right_way(quick_lstm, fault: str) -> None:
    _, out, _ = quick_lstm
    row = _rows(out)[fault]
    guard_did, as_expected, recovered = row[2], row[4], row[-1]
    assert guard_did.startswith(RIGHT[fault]), row
    assert as_expected == "yes", row
    assert recovered == "yes", row


def test_the_plan_spreads_the_faults_and_reaches_every_recovery_window() -> None:
    plan = DRILL_PLANS["quick"]
    faults = drill_faults(plan)
    steps = sorted(s for v in faults.values() for s in (v if isinstance(v, list) else [v]))
    assert list(faults) == list(ORDER)
    assert min(b - a for a, b in zip(steps, steps[1:]) if b - a > 1) >= plan.recovery_steps
    assert plan.max_steps() > steps[-1] + plan.recovery_steps
    assert "scale_collapse" in drill_faults(plan, scale_collapse=True)


def test_drill_help_names_the_subcommand(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["drill", "--help"])
    assert "--quick" in capsys.readouterr().out
