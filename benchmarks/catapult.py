"""What clipping costs a healthy large-LR SGD run in its catapult phase: distributions over seeds.

``zoo_shapes.Catapult`` trains a wide MLP with plain SGD at 3 / lambda_max of its initial loss (Lewkowycz et al.
2020, arXiv 2003.02218): the loss climbs 10-50x over the first steps and falls by itself, and the run ends lower than
one at a safe LR. The onset of the climb (gradient norms growing several-fold per step, step after step) is what an
LR-driven divergence looks like at its start, and every clipper in the defaults' place clips it. This script runs
seeds 0..N-1 without callbacks, with ``default_callbacks()``, with ``default_callbacks(clipping=None)`` (monitor and
guard, no clipper), with ``default_callbacks()`` whose clipper stops at step 40 (after the climb: which part of the
clipping costs), and with Lightning's ``gradient_clip_val=1.0``; it prints the validation MSE of each seed, each
method's mean and median, and on how many seeds each method ends lower / higher than the run without callbacks. Any
guard action is printed (none is expected). One command::

    python benchmarks/catapult.py              # seeds 0-9, 2000 steps, ~4 min on 2 cores
    python benchmarks/catapult.py --seeds 3 --steps 600
    python benchmarks/catapult.py --c 1.5      # LR 1.5 / lambda: below the catapult
    python benchmarks/catapult.py --warmup 100 # the same LR reached by a linear warm-up over 100 steps
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

METHODS = (
    "none",
    "default_callbacks()",
    "default_callbacks(clipping=None)",
    "defaults, clipper off from step 40",
    "Lightning gradient_clip_val=1.0",
)
STEPS = 2000
CLIP_UNTIL = 40


def run(method: str, seed: int, steps: int = STEPS, c: float = 3.0, warmup: int = 0) -> tuple[float, list[str]]:
    """One fit: (validation MSE, the guard's actions as ``kind@step cause``)."""
    import lightning.pytorch as pl
    import torch
    import zoo_shapes

    from lightning_gradguard import AdaptiveGradientClipping, NaNGuard, default_callbacks

    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    torch.set_num_threads(1)

    class ClipUntil(AdaptiveGradientClipping):
        """The defaults' z-score clipper, switched off from global step ``until``."""

        def __init__(self, until: int) -> None:
            super().__init__("zscore")
            self.until = until

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            if trainer.global_step < self.until:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)

    callbacks: list[pl.Callback] = []
    trainer_kwargs: dict[str, Any] = {}
    if method == "default_callbacks()":
        callbacks = list(default_callbacks())
    elif method == "default_callbacks(clipping=None)":
        callbacks = list(default_callbacks(clipping=None))
    elif method.startswith("defaults, clipper off"):
        monitor, guard = default_callbacks(clipping=None)
        callbacks = [monitor, ClipUntil(CLIP_UNTIL), guard]  # the order of default_callbacks()
    elif method.startswith("Lightning"):
        trainer_kwargs = {"gradient_clip_val": 1.0}
    pl.seed_everything(seed, verbose=False)
    module = zoo_shapes.Catapult(seed, steps, c=c, warmup=warmup)
    zoo_shapes.fit_quietly(module, steps, callbacks, **trainer_kwargs)
    guard = next((cb for cb in callbacks if isinstance(cb, NaNGuard)), None)
    actions = zoo_shapes.classify_events(guard.events if guard is not None else [])["actions"]
    return module.evaluate(), [f"{e.get('kind')}@{e.get('step')} {e.get('cause', '')}" for e in actions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per fit (default {STEPS})")
    parser.add_argument("--c", type=float, default=3.0, help="the LR as a multiple of 1 / lambda_max (default 3)")
    parser.add_argument("--warmup", type=int, default=0, help="linear LR warm-up over this many steps (default 0)")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {(m, s): pool.submit(run, m, s, args.steps, args.c, args.warmup) for m in METHODS for s in seeds}
        results = {m: [futures[(m, s)].result() for s in seeds] for m in METHODS}
    values = {m: [v for v, _ in results[m]] for m in METHODS}
    print(
        f"catapult: validation MSE, {args.steps} steps, LR {args.c:g} / lambda_max, warm-up {args.warmup} steps, "
        f"seeds 0-{args.seeds - 1} (lower is better)"
    )
    table = common.seed_table(METHODS, seeds, values, 4, "lower / higher than none", higher_first=False, ratio=True)
    print("\n".join(table))
    acted = [(m, s, a) for m in METHODS for s, (_, a) in zip(seeds, results[m]) if a]
    print("guard actions: " + ("; ".join(f"{m} seed {s}: {', '.join(a)}" for m, s, a in acted) if acted else "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
