"""core.sharded and core.grad_stats on hand-made DTensors, 2 gloo processes (torch.multiprocessing, no Lightning).

Layouts the Lightning fits do not all reach: a row shard, a column shard, an uneven 1-D shard, a replicated tensor, a
NaN in one rank's piece only (for every p, the inf-norm's max included) and a ``Partial`` tensor (refused by name);
and the measurement whose one all-gather also carries a rider's values and the weight norms, against the plain one.
Writes ``rank<r>.json`` into the output directory; tests/compat/test_fsdp_core.py compares it with full tensors.
"""

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard.core.measure._grad_stats import compute_grad_stats, norms_of  # noqa: E402
from lightning_gradguard.core.measure._sharded import unit_norms  # noqa: E402
from tests.ddp_runner import leave_process_group  # noqa: E402


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "rows": torch.randn(6, 4, generator=g) * 1e25,  # float32 sums of squares overflow: the repair on shards
        "cols": torch.randn(5, 6, generator=g),
        "odd": torch.randn(5, generator=g),
        "repl": torch.randn(3, 2, generator=g),
    }


class Rider:
    """Three values per rank whose maximum over the ranks should come back with the measurement."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.calls = 0

    def values(self, device: torch.device) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([float(self.rank), -float(self.rank), 5.0 - 2.5 * self.rank], dtype=torch.float64)


def _floats(t: torch.Tensor) -> list:
    return [x if math.isfinite(x) else str(x) for x in t.tolist()]


def carried_measurements(rank: int, params: list) -> dict:
    """For each p: the measurement with a rider and the weight norms in its one all-gather, and without (the
    all-reduce), as JSON: the norms of both, the carried maximum and how often the rider was asked."""
    names = [f"layer.{i}" for i in range(len(params))]
    found = {}
    for p in (2.0, 3.0, math.inf):
        plain = compute_grad_stats(params, names, p)
        rider = Rider(rank)
        carried = compute_grad_stats(params, names, p, rider=rider, weight_norms=True)
        if carried.carried is None or carried.carried[0] is not rider:
            raise AssertionError(f"the rider's values did not travel with the measurement (p={p})")
        found[str(p)] = {
            "plain": _floats(plain.param_norms64) + _floats(plain.total_norm64.reshape(1)),
            "carried": _floats(carried.param_norms64) + _floats(carried.total_norm64.reshape(1)),
            "plain_weights": _floats(plain.weight_norms64),
            "carried_weights": _floats(carried.__dict__["weight_norms64"]),
            "max": carried.carried[1].tolist(),
            "calls": rider.calls,
        }
    return found


def work(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    full = full_tensors()
    layouts = {"rows": [Shard(0)], "cols": [Shard(1)], "odd": [Shard(0)], "repl": [Replicate()]}
    dt = {k: distribute_tensor(v, mesh, layouts[k]) for k, v in full.items()}
    out: dict = {"rank": rank, "norms": {}, "nan_norms": {}}
    for p in (1.0, 2.0, 3.0, math.inf):
        out["norms"][str(p)] = norms_of(list(dt.values()), p, torch.float64).tolist()
    params = []
    for t in dt.values():
        q = torch.nn.Parameter(t.detach().clone())
        q.grad = t.detach().clone()
        params.append(q)
    stats = compute_grad_stats(params, [f"layer.{n}" for n in dt], 2.0)
    out["stats"] = {"total": float(stats.total_norm64), "all_finite": bool(stats.all_finite)}
    out["weight_norms"] = stats.weight_norms64.tolist()
    out["units"] = {k: unit_norms(v).flatten().tolist() for k, v in dt.items()}
    out["local_rows"] = {k: list(v.to_local().shape) for k, v in dt.items()}
    out["carried"] = carried_measurements(rank, params[:3])  # rows, cols, odd: sharded alike over both ranks
    if rank == 1:  # a NaN in rank 1's piece of "cols" only
        dt["cols"].to_local()[0, 0] = float("nan")
    for p in (2.0, math.inf):
        out["nan_norms"][str(p)] = [x if math.isfinite(x) else str(x) for x in norms_of(list(dt.values()), p).tolist()]
    if rank == 1:  # and in rank 1's piece of the "cols" gradient
        params[1].grad.to_local()[0, 0] = float("nan")
    out["carried_nan"] = carried_measurements(rank, params[:3])
    try:
        partial = torch.distributed.tensor.DTensor.from_local(torch.ones(3), mesh, [Partial()])
        compute_grad_stats([torch.nn.Parameter(torch.zeros(3))], ["head.weight"])  # plain: fine
        q = torch.nn.Parameter(partial.detach().clone())
        q.grad = partial
        compute_grad_stats([q], ["head.weight"])
        out["partial_error"] = None
    except ValueError as err:
        out["partial_error"] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    leave_process_group(rank, 2, out_dir)  # the last thing: gloo's teardown race (tests/ddp_runner.py)


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    mp.spawn(work, args=(sys.argv[1],), nprocs=2, join=True)
