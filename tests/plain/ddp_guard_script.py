"""2-process gloo DDP with GradGuard in a plain loop (run by tests/plain/test_ddp.py): a loss spike on rank 1 only.

Rank 1's loss at step SPIKE_AT is multiplied by 1e4 after the backward (its gradients are untouched, so the DDP
all-reduce gives both ranks the same, healthy gradients): only rank 1's loss z-score test fires. Without the
guard's cross-rank reduce rank 1 would skip while rank 0 steps and the replicas would drift apart. Each rank writes
its events, its skip count and a checksum of its weights to ``out_dir/rank<r>.json``.

Then, at step CORRUPT_AT, a NaN is written into rank 1's replica only: both ranks roll back from their in-memory
snapshot, of which each rank holds only its half (``shard_snapshots``, the default under DDP): the weights after the
rollback must equal those at the snapshot's step, on both ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_gradguard import GradGuard  # noqa: E402
from tests.ddp_runner import leave_process_group  # noqa: E402

SPIKE_AT = 25
CORRUPT_AT = 33
STEPS = 40


def worker(rank: int, world: int, out_dir: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradGuard(
        model, opt, clipping="zscore", action="skip", spike_zscore=6.0, spike_window=20,
        snapshot_every_n_steps=10, snapshot_confirm_steps=2, announce=False,
    )  # fmt: skip
    g = torch.Generator().manual_seed(100 + rank)
    at_start: dict[int, float] = {}
    split = []
    for step in range(STEPS):
        at_start[step] = sum(float(p.detach().double().sum()) for p in model.parameters())
        split += [s.sharded is not None for s in guard.engine.store.snapshots]
        if rank == 1 and step == CORRUPT_AT:
            with torch.no_grad():
                model.module[0].weight[0, 0] = float("nan")
        x = torch.randn(16, 4, generator=g)
        y = x.sum(1, keepdim=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        judged = loss.detach() * (1e4 if (rank == 1 and step == SPIKE_AT) else 1.0)
        if guard.before_step(judged):
            opt.step()
        guard.after_step()
        opt.zero_grad()
    checksum = [float(p.detach().double().sum()) for p in model.parameters()]
    result = {"events": [[e["step"], e["kind"], e["cause"]] for e in guard.events], "skipped": guard.skipped_steps}
    result["checksum"] = checksum
    events = guard.events
    result["snapshot_step"] = next((e.get("snapshot_step") for e in events if e["kind"] == "rollback"), None)
    result["at_start"] = at_start
    result["split"] = split
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    leave_process_group(rank, world, out_dir)  # the last thing: gloo's teardown race (tests/ddp_runner.py)


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2, join=True)
