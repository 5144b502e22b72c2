"""What a rollback snapshot costs per rank under DDP and FSDP2 (2 CPU processes, gloo), across model sizes.

For each size, an MLP with Adam (one step taken, so the two moments exist) is trained by 2 processes, once
replicated (``DistributedDataParallel``) and once sharded (``fully_shard`` per layer and root). Per rank and per
snapshot, medians over repeats:

- **host MiB** held by one snapshot: under DDP a whole copy (``shard_snapshots=False``) against the split one
  (each rank its 1/world part, the default); under FSDP2 the local shards (the only kind);
- **snapshot ms**: the time to take it (copying to host memory; no collective for either kind);
- **rollback ms**: the time to restore it into the live model and optimizer, the split snapshot's gathering (one
  broadcast per rank) included;
- side by side, the same state saved the usual ways: ``torch.save`` of the full state to a file (what a
  single-file checkpoint does, rank 0 only under DDP) and a ``torch.distributed.checkpoint`` save (every rank
  writes its part, a directory; what ``ModelParallelStrategy`` writes), both to local disk.

The state's own size (weights + Adam moments, whole) is the reference column: "x state" = held / state.

Run: ``.venv/bin/python benchmarks/snapshot_cost.py`` (``--quick``: fewer sizes and repeats). Results are printed as
a table and written to ``benchmarks/results/snapshot_cost[_quick].json``. Pure PyTorch (no Lightning), CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from lightning_gradguard.core.recover._replica_shards import ReplicaSharding  # noqa: E402
from lightning_gradguard.core.recover._snapshot import restore_snapshot, state_nbytes, take_snapshot  # noqa: E402

MIB = 2**20


def _mlp(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _one_step(model: nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _measure(kind: str, width: int, depth: int, repeats: int, tmp: Path) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    net = _mlp(width, depth)
    params = sum(p.numel() for p in net.parameters())
    if kind == "ddp":
        model: nn.Module = nn.parallel.DistributedDataParallel(net)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        model = fully_shard(net, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _one_step(model, opt, width)
    row: dict[str, Any] = {"kind": kind, "params": params, "width": width, "depth": depth}
    state_bytes = params * 4 * 3  # fp32 weights + two fp32 moments (the whole state, not this rank's part)
    row["state_mib"] = state_bytes / MIB
    variants: dict[str, ReplicaSharding | None] = {"whole": None}
    if kind == "ddp":
        variants["split"] = ReplicaSharding(rank, world)
    else:
        row["local_state_mib"] = state_nbytes(model, [opt]) / MIB
    for name, sharding in variants.items():
        snap = take_snapshot(model, [opt], sharding=sharding)
        row[f"{name}_held_mib"] = snap.nbytes() / MIB
        row[f"{name}_x_state"] = snap.nbytes() / state_bytes
        row[f"{name}_snapshot_ms"] = _median_ms(lambda s=sharding: take_snapshot(model, [opt], sharding=s), repeats)
        row[f"{name}_rollback_ms"] = _median_ms(lambda s=snap: restore_snapshot(s, model, [opt]), repeats)
        del snap
    # the same state saved the usual ways, to local disk
    target = tmp / f"{kind}_{width}_{depth}"

    def torch_save() -> None:
        if kind == "ddp":  # a single-file checkpoint: rank 0 writes the (replicated) whole state
            if rank == 0:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, str(target) + ".pt")
        else:  # each rank its shards, as torch.save can
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{target}_rank{rank}.pt")

    def dcp_save() -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        if rank == 0:
            shutil.rmtree(str(target) + "_dcp", ignore_errors=True)
        dist.barrier()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(target) + "_dcp")

    row["torch_save_ms"] = _median_ms(torch_save, repeats)
    row["dcp_save_ms"] = _median_ms(dcp_save, repeats)
    return row


def _worker(rank: int, world: int, port: int, sizes: list[tuple[int, int]], repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tmp = Path(tempfile.mkdtemp(prefix=f"snapshot_cost_{rank}_"))
    rows = []
    try:
        for kind in ("ddp", "fsdp2"):
            for width, depth in sizes:
                rows.append({"rank": rank, **_measure(kind, width, depth, repeats, tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| strategy | params | state MiB | snapshot | held MiB / rank | x state | snapshot ms | rollback ms "
        "| torch.save ms | DCP save ms |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        names = ["whole", "split"] if r["kind"] == "ddp" else ["whole"]
        for name in names:
            label = {"whole": "whole copy", "split": "split (default)"}[name] if r["kind"] == "ddp" else "local shards"
            lines.append(
                f"| {r['kind'].upper()} | {r['params'] / 1e6:.1f} M | {r['state_mib']:.0f} | {label} "
                f"| {r[name + '_held_mib']:.1f} | {r[name + '_x_state']:.2f} | {r[name + '_snapshot_ms']:.1f} "
                f"| {r[name + '_rollback_ms']:.1f} | {r['torch_save_ms']:.1f} | {r['dcp_save_ms']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, 3 repeats")
    parser.add_argument("--tiny", action="store_true", help="one tiny size, 1 repeat (the test suite's smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = parser.parse_args()
    sizes = [(64, 2)] if args.tiny else [(512, 4), (1024, 8)] if args.quick else [(512, 4), (1024, 8), (2048, 8)]
    repeats = 1 if args.tiny else 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, _free_port(), sizes, repeats, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    # per rank the bytes are the same (the split is even); times: the slower rank's
    merged = []
    for a, b in zip(ranks[0], ranks[1]):
        row = dict(a)
        for key, value in b.items():
            if key.endswith(("_ms", "_held_mib", "_x_state")):
                row[key] = max(value, a[key])
        merged.append(row)
    head = f"torch {torch.__version__}, {os.cpu_count()} CPUs, 2 gloo processes, 1 thread each; medians of {repeats}"
    text = head + "\n" + _table(merged)
    print(text)
    name = (
        "snapshot_cost_tiny.json" if args.tiny else "snapshot_cost_quick.json" if args.quick else "snapshot_cost.json"
    )
    dest = (args.out or REPO / "benchmarks" / "results") / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"torch": torch.__version__, "repeats": repeats, "rows": merged}, indent=1))
    dest.with_suffix(".txt").write_text(text + "\n")
    print(f"written: {dest} and {dest.with_suffix('.txt').name}")


if __name__ == "__main__":
    main()
