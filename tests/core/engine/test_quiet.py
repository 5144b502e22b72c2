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


def test_actions_are_always_shown_and_causes_count_apart() -> None:
    q = AnnounceQuota()
    for step in range(50):
        q.line(step, "skip", "nonfinite_loss", "x")
    # a new cause starts its own burst, and no rollback, LR change or halt is ever held back
    assert q.line(50, "skip", "loss_spike", "first spike") == "first spike"
    for kind in ("rollback", "lower_lr", "raise_lr", "halt"):
        for step in range(51, 80):
            assert q.line(step, kind, "nonfinite_loss", kind) == kind


@pytest.mark.parametrize("count", [BURST, BURST + 1, 9, 100])
def test_warnings_of_one_rule_are_thinned_and_a_new_rule_is_shown_at_once(count: int) -> None:
    """A warning that recurs (a TD loss that climbs after every target sync) is thinned on the same clock as a skip,
    counted per rule: the first warning of another rule (a network that died) is never held back by them."""
    q = AnnounceQuota()
    shown = [
        q.line(step, "warn", "instability", f"w {step}", rule="loss_above_best") for step in range(0, 10 * count, 10)
    ]
    assert [s is not None for s in shown] == [_expected_shown(n) for n in range(1, count + 1)]
    assert all(line is None or line.startswith("w ") for line in shown)
    for n, line in enumerate(shown, start=1):
        if line is not None and n > BURST:
            assert f"(warning {n} of this kind; " in line
    # skips and the other rules keep their own counts
    assert q.line(10 * count, "warn", "instability", "climbing", rule="loss_climbing") == "climbing"
    assert q.line(10 * count + 1, "warn", "dead_network", "dead", rule="dead_network") == "dead"
    assert q.line(10 * count + 2, "skip", "nonfinite_loss", "skip") == "skip"
    hidden = sum(line is None for line in shown)
    closing = q.closing_line("NaNGuard")
    if hidden:
        assert closing is not None
        assert " more skipped steps" not in closing
        # the thinned lines counted the hidden ones up to the last shown; the closing line the rest
        last_shown = max(n for n, line in enumerate(shown, start=1) if line is not None)
        rest = count - last_shown
        assert closing == (
            f"NaNGuard: {rest} more warnings were not announced (instability loss above best {rest}, last at step "
            f"{10 * (count - 1)}); {count + 2} in all"
        )
    else:
        assert closing is None


def test_the_quota_resumes_from_its_state() -> None:
    a, b = AnnounceQuota(), AnnounceQuota()
    for step in range(12):
        a.line(step, "skip", "nonfinite_loss", "x")
    b.load_state_dict(a.state_dict())
    assert [a.line(s, "skip", "nonfinite_loss", "x") for s in range(12, 40)] == [
        b.line(s, "skip", "nonfinite_loss", "x") for s in range(12, 40)
    ]
    assert a.closing_line("G") == b.closing_line("G")
    for step in range(12):
        a.line(step, "warn", "instability", "w", rule="loss_climbing")
    b.load_state_dict(a.state_dict())
    assert [a.line(s, "warn", "instability", "w", rule="loss_climbing") for s in range(12, 40)] == [
        b.line(s, "warn", "instability", "w", rule="loss_climbing") for s in range(12, 40)
    ]
    assert a.closing_line("G") == b.closing_line("G") is not None
    b.load_state_dict({"skips": {}})  # a checkpoint written before warnings were thinned
    assert b.line(0, "warn", "instability", "w", rule="loss_climbing") == "w"
    b.load_state_dict(None)  # a checkpoint of an older version: a fresh quota
    assert b.line(0, "skip", "nonfinite_loss", "x") == "x"
