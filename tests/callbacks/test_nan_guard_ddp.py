"""NaNGuard under 2-process CPU DDP, run as a script in a subprocess (see ddp_nan_guard_script.py)."""

import json
from pathlib import Path

import pytest

from tests.ddp_runner import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_nan_guard_script.py")


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_faults_on_one_rank_make_every_rank_roll_back(tmp_path):
    proc = run_ddp_script(SCRIPT, tmp_path)
    lines = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("guard_rank*.json"))]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r["rank"] for r in lines) == [0, 1], proc.stdout + proc.stderr[-3000:]
    rank0, rank1 = sorted(lines, key=lambda r: r["rank"])
    first = {"step": 4, "kind": "rollback", "snapshot_step": 2}
    # snapshots at the multiples of 2 on the step counter: the one of step 6 was taken after step 5, before the poison
    second = {"step": 7, "kind": "rollback", "snapshot_step": 6}
    assert rank1["events"] == [{**first, "cause": "nonfinite_loss"}, {**second, "cause": "nonfinite_params"}]
    # rank 0 sees the NaN loss through the all-reduced gradients; the inf weight (found at step 7, the first check
    # after it) through the one reduce of the guard's diagnosis: damage on any rank is named on every rank
    assert rank0["events"] == [{**first, "cause": "nonfinite_grad"}, {**second, "cause": "nonfinite_params"}]
    for r in (rank0, rank1):
        assert r["global_step"] == 10
        assert r["finite"]
        assert r["lr"] == 0.0025
    assert rank0["checksum"] == rank1["checksum"]
