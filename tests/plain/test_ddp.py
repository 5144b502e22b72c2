"""GradGuard under torch.distributed (2 gloo processes, subprocess with a time bound): a fault seen by one rank
makes every rank take the same action, so the replicas stay identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ddp_runner import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_guard_script.py")


@pytest.mark.ddp
def test_a_loss_spike_on_one_rank_makes_both_ranks_skip(tmp_path: Path) -> None:
    proc = run_ddp_script(SCRIPT, tmp_path, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["events"][0] == [25, "skip", "loss_spike"]
    assert r0["events"][0] == [25, "skip", "other_rank"]  # rank 0 saw nothing wrong itself
    # the NaN written into rank 1's replica at step 33: both roll back, from snapshots each rank holds half of
    assert [e[:2] for e in r0["events"][1:]] == [e[:2] for e in r1["events"][1:]] == [[33, "rollback"]]
    for r in (r0, r1):
        assert r["split"]
        assert all(r["split"])
        snap = r["snapshot_step"]
        assert snap is not None
        assert r["at_start"][str(34)] == r["at_start"][str(snap)]  # the weights of the snapshot's step, exactly
    assert r0["checksum"] == r1["checksum"]
