"""Per-step cost of gradguard under 2-process sharded CPU training (FSDP2 through ``ModelParallelStrategy``).

What it measures: an MLP sharded with ``fully_shard`` (one call per Linear and one for the root) trains on 2 gloo
processes; each variant below is one short fit, and the variants run in interleaved rounds (the order rotates every
round) inside the same two processes. Per fit, after a warm-up, two medians over the steps:

- **hook span**: the time from the first to the last callback of ``on_before_optimizer_step`` (a stopwatch callback
  at each end of the list), i.e. what the callbacks in between cost per step, collectives included;
- **step**: ``on_train_batch_start`` to ``on_train_batch_end``, the whole training step.

Variants: no callbacks; torch's ``clip_grad_norm_(foreach=True)`` on the ``DTensor`` gradients (the reference a
user would write by hand: it returns the global norm as a ``DTensor``); Lightning's own ``gradient_clip_val`` when the
strategy allows it (it clips after the callbacks, so only its step time is comparable); gradguard's fixed ``norm``
clipper; the ``zscore`` clipper; ``default_callbacks()`` (monitor, zscore clipper, guard; logging every 50 steps).
Ratios are per-round medians against the torch clip.

Run: ``.venv/bin/python benchmarks/sharded_overhead.py`` (``--quick`` for a short run, ``--tiny`` for a smoke test).
No GPU needed; the script launches its second process itself (Lightning's launcher), so run it outside pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gradguard import AdaptiveGradientClipping, default_callbacks  # noqa: E402


class ShardedMLP(pl.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.width = width

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.global_rank)
        x = torch.randn(4096, self.width, generator=g)
        return DataLoader(TensorDataset(x, x[:, :1].tanh()), batch_size=32)


class TorchClip(Callback):
    """What a user would write by hand: torch's clip over the DTensor gradients, in the same hook."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 1.0, foreach=True)


class Stopwatch(Callback):
    """Two instances, first and last in the list: the span of ``on_before_optimizer_step`` and of the step."""

    def __init__(self, shared: dict[str, Any], end: bool) -> None:
        self.shared, self.end = shared, end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if not self.end:
            self.shared["step_t0"] = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
        now = time.perf_counter()
        if self.end:
            self.shared["hook"].append(now - self.shared["hook_t0"])
        else:
            self.shared["hook_t0"] = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if self.end:
            self.shared["step"].append(time.perf_counter() - self.shared["step_t0"])


VARIANTS: dict[str, Any] = {
    "no callbacks": lambda: ([], {}),
    "torch clip_grad_norm_ (DTensor)": lambda: ([TorchClip()], {}),
    "Lightning gradient_clip_val=1": lambda: ([], {"gradient_clip_val": 1.0}),
    "gradguard norm clipper": lambda: ([AdaptiveGradientClipping("norm", max_norm=1.0)], {}),
    "gradguard zscore clipper": lambda: ([AdaptiveGradientClipping("zscore")], {}),
    "default_callbacks()": lambda: (default_callbacks(), {}),
}


def one_fit(name: str, args: argparse.Namespace, out_dir: str) -> dict[str, float] | str:
    from lightning.pytorch.strategies import ModelParallelStrategy

    shared: dict[str, Any] = {"hook": [], "step": []}
    callbacks, extra = VARIANTS[name]()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=args.steps,
        logger=False,
        callbacks=[Stopwatch(shared, end=False), *callbacks, Stopwatch(shared, end=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
        use_distributed_sampler=False,
        **extra,
    )
    try:
        trainer.fit(ShardedMLP(args.width, args.depth))
    except Exception as e:  # noqa: BLE001 - a variant the strategy refuses is reported, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    warm = min(args.warmup, len(shared["step"]) - 1)
    return {
        "hook_s": statistics.median(shared["hook"][warm:]) if shared["hook"] else float("nan"),
        "step_s": statistics.median(shared["step"][warm:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 25 steps instead of 4 of 40")
    p.add_argument("--tiny", action="store_true", help="1 round of 8 steps on a 2x32 MLP (a smoke test)")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of each fit's medians")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.tiny:
        args.rounds, args.steps, args.warmup, args.width, args.depth = 1, 8, 2, 32, 2
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.steps = args.steps or (25 if args.quick else 40)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    torch.set_num_threads(1)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out_dir = "/tmp/gradguard_sharded_overhead"
    names = list(VARIANTS)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    skipped: dict[str, str] = {}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in skipped:
                continue
            res = one_fit(name, args, out_dir)
            if isinstance(res, str):
                skipped[name] = res
            else:
                results[name].append(res)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    base = "torch clip_grad_norm_ (DTensor)"
    print(f"\nsharded_overhead: {' '.join(sys.argv)}")
    print(
        f"2 gloo processes, FSDP2 MLP {args.depth}x{args.width}, {args.rounds} rounds x {args.steps} steps, torch "
        f"{torch.__version__}, lightning {pl.__version__}, 1 thread per process\n"
    )
    print("| variant | hook span ms (median) | hook span / torch clip | step ms (median) |")
    print("|---|---|---|---|")
    table = {}
    for name in names:
        if name in skipped:
            print(f"| {name} | skipped: {skipped[name]} | | |")
            continue
        runs = results[name]
        hook = statistics.median(x["hook_s"] for x in runs)
        step = statistics.median(x["step_s"] for x in runs)
        ratio = statistics.median(x["hook_s"] / b["hook_s"] for x, b in zip(runs, results[base]))
        table[name] = {"hook_ms": hook * 1e3, "hook_ratio": ratio, "step_ms": step * 1e3}
        print(f"| {name} | {hook * 1e3:.3f} | {ratio:.2f}x | {step * 1e3:.2f} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "table": table, "skipped": skipped, "raw": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
