"""How much of a rescue-grid cell is chaos? Lightning's own clip, moved by one part in a million.

``rescue.py``'s ``char_lstm/explosive`` cell (SGD with momentum at 10x its stable LR, 150 steps) is compared with
Lightning's ``gradient_clip_val=1.0``. The trajectory at that LR is chaotic: a perturbation of the first clipped
steps grows until the runs part. This script runs the same cell with ``gradient_clip_val`` 1.0 and 1.000001 (the
clipped steps differ by one part in a million), and with ``default_callbacks()``, seeds 0-2 by default, and prints
the validation bits per character of each and each method's mean. A gap between gradguard and Lightning's clip that
is smaller than the gap between Lightning's clip and itself says nothing about either. One command::

    python benchmarks/clip_chaos.py            # seeds 0-2, ~1 min on 2 cores
    python benchmarks/clip_chaos.py --seeds 10 # seeds 0-9
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios  # noqa: E402

METHODS = ("gradient_clip_val=1.0", "gradient_clip_val=1.000001", "default_callbacks()")


def run(method: str, seed: int, scenario: str, setting: str) -> float:
    import torch

    from lightning_gradguard import default_callbacks

    torch.set_num_threads(1)
    callbacks, kwargs = [], {}
    if method == "default_callbacks()":
        callbacks = list(default_callbacks())
    else:
        kwargs = {"gradient_clip_val": float(method.split("=")[1])}
    with tempfile.TemporaryDirectory() as root:
        res = scenarios.fit(scenario, root, callbacks, seed=seed, setting=setting, trainer_kwargs=kwargs, logger=False)
    return float(res.metric)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--scenario", default="char_lstm")
    parser.add_argument("--setting", default="explosive")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    print(f"{args.scenario}/{args.setting}, seeds 0-{args.seeds - 1}: validation metric per seed, then the mean")
    means = {}
    for method in METHODS:
        values = [run(method, seed, args.scenario, args.setting) for seed in range(args.seeds)]
        means[method] = statistics.mean(values)
        print(f"  {method:28s} " + " ".join(f"{v:.4g}" for v in values) + f"   mean {means[method]:.4g}", flush=True)
    chaos = abs(means[METHODS[1]] - means[METHODS[0]])
    gap = means[METHODS[2]] - means[METHODS[0]]
    print(f"Lightning's clip against itself moved by 1e-6: {chaos:.4g}; gradguard minus Lightning's clip: {gap:+.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
