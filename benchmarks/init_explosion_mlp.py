"""Explosion at initialisation beyond the rescue grid's CNN: deep plain ReLU MLPs on scikit-learn's digits.

Each layer is He-initialised and then scaled by ``gain`` > 1, so the activations (and the first loss: 40-180 where
chance is 2.3) grow geometrically with depth. Unguarded, SGD with momentum turns them into NaN; Lightning's
``gradient_clip_val=1.0`` tames them (normalised SGD through the transient). The question is whether
``default_callbacks()`` learns wherever the fixed clip does.

Configurations (``CONFIGS``): 8 layers at gain 2.0 and 16 layers at gain 1.5 with SGD (momentum 0.9, lr 0.01), and
16 layers at gain 1.5 with Adam (lr 1e-3). Methods: no callbacks, ``Trainer(gradient_clip_val=1.0)``,
``default_callbacks()``. Metric: validation accuracy after 600 steps (batch 64, 1400/397 split). One command::

    python benchmarks/init_explosion_mlp.py            # seeds 0-2, ~2 min on 2 cores

prints one row per configuration and method (accuracy per seed, the guard's events per seed).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_shapes import digits  # noqa: E402

CONFIGS = {  # name: (depth, gain, optimizer, lr)
    "d8_gain2_sgd": (8, 2.0, "sgd", 0.01),
    "d16_gain1.5_sgd": (16, 1.5, "sgd", 0.01),
    "d16_gain1.5_adam": (16, 1.5, "adam", 1e-3),
}
METHODS = ("none", "lightning gradient_clip_val=1.0", "gradguard default_callbacks()")
STEPS = 600


class DeepMLP(pl.LightningModule):
    def __init__(self, seed: int, depth: int, gain: float, optimizer: str, lr: float) -> None:
        super().__init__()
        self.seed, self.opt_name, self.lr = seed, optimizer, lr
        layers: list[nn.Module] = []
        for _ in range(depth):
            linear = nn.Linear(64, 64)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            with torch.no_grad():
                linear.weight.mul_(gain)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
        layers.append(nn.Linear(64, 10))
        self.net = nn.Sequential(*layers)
        self.train_x, self.train_y, self.val_x, self.val_y = digits(seed)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.opt_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1000 + self.seed)
        ds = TensorDataset(self.train_x, self.train_y)
        return DataLoader(ds, batch_size=64, shuffle=True, generator=g, drop_last=True)

    @torch.no_grad()
    def accuracy(self) -> float:
        self.eval()
        out = self.net(self.val_x)
        if not bool(torch.isfinite(out).all()):
            return math.nan
        return float((out.argmax(1) == self.val_y).float().mean())


def fit(config: str, method: str, seed: int) -> tuple[float, list[str], str]:
    from lightning_gradguard import NaNGuard, default_callbacks

    depth, gain, opt, lr = CONFIGS[config]
    pl.seed_everything(seed, verbose=False)
    model = DeepMLP(seed, depth, gain, opt, lr)
    callbacks = list(default_callbacks()) if method.startswith("gradguard") else []
    kwargs = {"gradient_clip_val": 1.0} if method.startswith("lightning") else {}
    error = ""
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=STEPS, logger=False, callbacks=callbacks,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=root, **kwargs,
        )  # fmt: skip
        try:
            trainer.fit(model)
        except Exception as e:  # noqa: BLE001 - a halted run is a result
            error = type(e).__name__
    guard = next((c for c in callbacks if isinstance(c, NaNGuard)), None)
    events = [f"{e['kind']}@{e['step']}:{e['cause']}" for e in (guard.events if guard else []) if e["kind"] != "warn"]
    return model.accuracy(), events, error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"command: python benchmarks/init_explosion_mlp.py --seeds {args.seeds}")
    print(f"torch {torch.__version__}, lightning {pl.__version__}; {STEPS} steps per fit; metric: validation accuracy")
    print()
    print("| configuration | method | accuracy per seed | mean | guard actions per seed |")
    print("|---|---|---|---|---|")
    for config in CONFIGS:
        for method in METHODS:
            accs, acts = [], []
            for seed in seeds:
                acc, events, error = fit(config, method, seed)
                accs.append(acc)
                acts.append(", ".join(events + ([error] if error else [])) or "-")
            mean = sum(accs) / len(accs)
            cells = " / ".join("nan" if math.isnan(a) else f"{a:.3f}" for a in accs)
            print(f"| {config} | {method} | {cells} | {mean:.3f} | {' / '.join(acts)} |", flush=True)
    print()
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
