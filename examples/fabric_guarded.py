"""The bad-batch regression of ``plain_torch.py`` in a Lightning Fabric loop, with and without FabricGradGuard.

    python examples/fabric_guarded.py                       # guarded and unguarded, one CPU process
    python examples/fabric_guarded.py --devices 2 --guarded # DDP on 2 CPU processes (gloo); bad batches on rank 1

Same data, model, optimizer and bad batches as ``plain_torch.py`` (targets x1000 at one step, NaN inputs at two
others). Unguarded, the run ends at NaN; guarded, the outlier step is clipped and the NaN steps are skipped on every
rank at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_torch import batch_at, make_data, make_model  # noqa: E402  (the shared problem)

from lightning_gradguard import FabricGradGuard  # noqa: E402


def train(fabric: Fabric, guarded: bool, steps: int = 400, seed: int = 0) -> dict[str, Any]:
    x, y = make_data(seed)
    x_test, y_test = x[-512:], y[-512:]
    x, y = x[:-512], y[:-512]
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = fabric.setup(model, opt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.optimizer, T_max=steps, eta_min=0.005)
    guard = FabricGradGuard(fabric, model, opt, sched, clipping="zscore", action="auto") if guarded else None
    for step in range(steps):
        xb, yb = batch_at(x, y, step, fabric.global_rank, fabric.world_size, corrupt=True)
        loss = nn.functional.mse_loss(model(xb.to(fabric.device)), yb.to(fabric.device))
        fabric.backward(loss)
        if guard is not None:
            guard.before_step(loss)  # a refused step has no gradients left: the step below changes nothing
        opt.step()
        sched.step()
        if guard is not None:
            guard.after_step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        test_mse = float(nn.functional.mse_loss(model(x_test.to(fabric.device)), y_test.to(fabric.device)))
    out: dict[str, Any] = {"guarded": guarded, "test_mse": test_mse}
    if guard is not None:
        guard.close()
        out.update(
            events=[(e["step"], e["kind"], e["cause"]) for e in guard.events],
            clip_rate=guard.clip_rate(),
            weights=next(iter(model.parameters())).detach().flatten()[:4].tolist(),
        )
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--guarded", action="store_true", help="only the guarded run")
    which.add_argument("--unguarded", action="store_true", help="only the unguarded run")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", default=None, help="write the results to this file (one per rank)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    runs = []
    if not args.unguarded:
        runs.append(train(fabric, True, args.steps))
    if not args.guarded:
        runs.append(train(fabric, False, args.steps))
    for r in runs:
        label = "guarded" if r["guarded"] else "unguarded"
        line = f"rank {fabric.global_rank} {label:>9}: test MSE {r['test_mse']:.4g}"
        if r["guarded"]:
            line += f", clipped {r['clip_rate']:.1%} of steps, events {r['events']}"
        print(line, flush=True)
    if args.json:
        with open(f"{args.json}.rank{fabric.global_rank}", "w") as f:
            json.dump(runs, f)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # a clean exit (without it a rank now and then aborts at exit with "terminate called without an active
        # exception", after its work is done): every rank done with its collectives, then gloo's threads joined
        # before the interpreter ends, and rank 0, which hosts the rendezvous store, the last to leave
        fabric.barrier()
        torch.distributed.destroy_process_group()
        for proc in getattr(fabric.strategy.launcher, "procs", []):  # the ranks it launched (a subprocess launcher)
            proc.wait()
    return runs


if __name__ == "__main__":
    main()
