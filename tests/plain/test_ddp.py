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
    assert r1["events"] == [[25, "skip", "loss_spike"]]
    assert r0["events"] == [[25, "skip", "other_rank"]]  # rank 0 saw nothing wrong itself
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["checksum"] == r1["checksum"]
