"""AnnounceQuota: which event lines reach the terminal. Checked against an independent count of what must be shown."""

from __future__ import annotations

import pytest

from lightning_gradguard.core.engine._quiet import BURST, AnnounceQuota


def _expected_shown(n: int) -> bool:
    """The n-th skip of a cause (1-based) is shown when it is among the first BURST or a power of two."""
    return n <= BURST or (n & (n - 1)) == 0


@pytest.mark.parametrize("count", [1, BURST, BURST + 1, 8, 9, 200])
def test_skips_of_one_cause_are_thinned_on_a_power_of_two_clock_and_the_rest_counted(count: int) -> None:
    q = AnnounceQuota()
    shown = [q.line(step, "skip", "nonfinite_loss", f"line {step}") for step in range(0, 3 * count, 3)]
    assert [s is not None for s in shown] == [_expected_shown(n) for n in range(1, count + 1)]
    # every line that says how many were not announced counts exactly the hidden ones since the previous line
    hidden_since_last = 0
    for n, line in enumerate(shown, start=1):
        if line is None:
            hidden_since_last += 1
        elif n > BURST:
            assert f"skip {n} for this cause; {hidden_since_last} more since step" in line
            hidden_since_last = 0
    closing = q.closing_line("NaNGuard")
    if hidden_since_last:
        assert closing is not None
        assert closing.startswith(f"NaNGuard: {hidden_since_last} more skipped steps were not announced")
        assert f"last at step {3 * (count - 1)}" in closing
        assert closing.endswith(f"{count} in all")
        assert q.closing_line("NaNGuard") is None  # counted once: a second fit's end does not repeat them
    else:
        assert closing is None


def test_other_kinds_are_always_shown_and_causes_count_apart() -> None:
    q = AnnounceQuota()
    for step in range(50):
        q.line(step, "skip", "nonfinite_loss", "x")
    # a new cause starts its own burst, and no rollback, LR change, warning or halt is ever held back
    assert q.line(50, "skip", "loss_spike", "first spike") == "first spike"
    for kind in ("rollback", "lower_lr", "raise_lr", "warn", "halt"):
        for step in range(51, 80):
            assert q.line(step, kind, "nonfinite_loss", kind) == kind


def test_the_quota_resumes_from_its_state() -> None:
    a, b = AnnounceQuota(), AnnounceQuota()
    for step in range(12):
        a.line(step, "skip", "nonfinite_loss", "x")
    b.load_state_dict(a.state_dict())
    assert [a.line(s, "skip", "nonfinite_loss", "x") for s in range(12, 40)] == [
        b.line(s, "skip", "nonfinite_loss", "x") for s in range(12, 40)
    ]
    assert a.closing_line("G") == b.closing_line("G")
    b.load_state_dict(None)  # a checkpoint of an older version: a fresh quota
    assert b.line(0, "skip", "nonfinite_loss", "x") == "x"
