"""All three callbacks under 2-process CPU DDP with gradient accumulation (one subprocess run, several checks).

What this proves: every rank computes the same norms, thresholds and clip decisions at every step (logged values
are identical whichever rank logs); a NaN seen by rank 1 only makes both ranks roll back at the same step to the
same snapshot; a spike on rank 1 only is clipped identically on both; the run finishes (a timeout turns a hang into
a failure) with bit-identical weights and optimizer state on both ranks; before each update the callbacks together
call one collective (the guard's max-reduce: the gradients are already all-reduced, the measurement needs none).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.ddp_runner import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_all_callbacks_script.py")


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_all_callbacks_under_ddp(tmp_path):
    proc = run_ddp_script(SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], proc.stderr[-3000:]
    r0, r1 = ranks

    for r in ranks:
        assert r["global_step"] == 10
        assert [row["step"] for row in r["rows"]] == list(range(10))  # one action per accumulated step
        assert r["clip_steps"] == 10
        assert r["counters"] == [1, 1, 0.5]
        assert r["lr"] == 0.005
        assert all(math.isfinite(w) for w in r["weights"])
    # identical measurements and decisions on both ranks, step by step (so rank 0's logs speak for both)
    for a, b in zip(r0["rows"], r1["rows"]):
        assert a == b
    assert not math.isfinite(r0["rows"][4]["grad_norm"])
    assert r0["rows"][7]["clipped"]  # the rank-1 spike, clipped on both ranks
    # the monitor measured the same pre-clip norm as the clipper, at every step, on both ranks
    for r in ranks:
        assert [row["monitor_step"] for row in r["rows"]] == list(range(10))
        for row in r["rows"]:  # the same measurement (the clipper reads its float64 value, the monitor float32)
            if row["step"] != 4:
                assert row["monitor_grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-6)
    # one rollback at step 4 on both ranks, to the same snapshot
    rollback = {"step": 4, "kind": "rollback", "snapshot_step": 2}
    assert r1["events"] == [{**rollback, "cause": "nonfinite_loss"}]
    assert r0["events"] == [{**rollback, "cause": "nonfinite_grad"}]
    assert r0["rows"][4]["reason"] == r1["rows"][4]["reason"] == "rolled_back"
    # same final state, bit for bit
    assert r0["weights"] == r1["weights"]
    assert r0["opt_state"] == r1["opt_state"]
    # one collective per optimizer step in on_before_optimizer_step, on every rank: the guard's all-reduce
    for r in ranks:
        assert r["hook_collectives"] == {str(step): ["all_reduce"] for step in range(10)}
