"""Rare classes and rare loss terms: gradients that are large on a few % of batches, again and again.

An imbalanced classifier is the common case: once the model predicts the majority class, the majority batches'
gradients shrink and the batches that hold a rare positive carry gradients 10-10,000x larger. They are the run's
signal, not faults. An adaptive clipper that treats them as outliers cuts them away for the whole run. This script
fits such runs without callbacks, with Lightning's ``gradient_clip_val=1.0`` and with ``default_callbacks()``, on
seeds 0-2, and prints the final metric per seed (validation ROC AUC, or the rare task's accuracy) and the guard's
events.

Variants (``VARIANTS``), each 1500 steps:

- ``pw_balanced``: 0.2 % positives, ``BCEWithLogitsLoss(pos_weight=neg/pos)``, Adam 1e-3, batch 32 (the zoo's
  ``rare_positives``); ``pw_balanced_bs8``: 0.5 % positives, batch 8;
- ``no_pos_weight``: 0.2 % positives, plain BCE;
- ``focal``: 0.2 % positives, focal loss (alpha 0.99, gamma 2; Lin et al. 2017);
- ``sgd_rarer``: 0.1 % positives, pos_weight 1000, SGD momentum 0.9 lr 1e-3, batch 16 (a batch holds a positive
  once every ~60 steps: rarer than the z-score statistics' horizon of 33 steps);
- ``sparse_aux``: a regression whose auxiliary classification term (weight 10) is present on 5 % of batches; metric:
  the auxiliary task's validation accuracy;
- ``long_tail``: 20 classes with frequencies ~1/k^1.5 (the rarest ~0.3 %), cross-entropy weighted by 1/frequency;
  metric: balanced validation accuracy.

One command::

    python benchmarks/rare_classes.py            # ~6 min on 2 cores

"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_shapes import RarePositives  # noqa: E402

STEPS = 1500
METHODS = ("none", "lightning gradient_clip_val=1.0", "gradguard default_callbacks()")
ACTIONS = ("skip", "rollback", "halt", "lower_lr", "restart")


class _Sampled(pl.LightningModule):
    """Batches drawn inside ``training_step``, seeded by the batch index."""

    def __init__(self, seed: int, batch: int = 32) -> None:
        super().__init__()
        self.seed, self.batch = seed, batch

    def _idx(self, batch_idx: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + batch_idx)
        return torch.randint(0, n, (self.batch,), generator=g)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(STEPS)), batch_size=1)


class SparseAux(_Sampled):
    """Regression (tanh teacher, MSE) plus an auxiliary 2-class term, weight 10, on 5 % of batches."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x = torch.randn(40_000, 16, generator=g)
        y = torch.tanh(x @ torch.randn(16, generator=g) / 4) * 3 + 0.3 * torch.randn(40_000, generator=g)
        c = (x[:, :4].sum(1) > 0).long()
        self.x, self.y, self.c = x[:30_000], y[:30_000], c[:30_000]
        self.val_x, self.val_c = x[30_000:], c[30_000:]
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
        self.reg, self.cls = nn.Linear(64, 1), nn.Linear(64, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        idx = self._idx(batch_idx, len(self.y))
        h = self.body(self.x[idx])
        loss = F.mse_loss(self.reg(h).squeeze(1), self.y[idx])
        g = torch.Generator().manual_seed(self.seed * 31 + batch_idx)
        if torch.rand(1, generator=g).item() < 0.05:
            loss = loss + 10 * F.cross_entropy(self.cls(h), self.c[idx])
        return loss

    def metric(self) -> float:
        return float((self.cls(self.body(self.val_x)).argmax(1) == self.val_c).float().mean())


class LongTail(_Sampled):
    """20 Gaussian classes, frequencies ~1/k^1.5, cross-entropy weighted by 1/frequency (normalised to mean 1)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        k = torch.arange(1, 21).float()
        y = torch.multinomial(k**-1.5 / (k**-1.5).sum(), 60_000, replacement=True, generator=g)
        x = (torch.randn(20, 16, generator=g) * 1.2)[y] + torch.randn(60_000, 16, generator=g)
        self.x, self.y, self.val_x, self.val_y = x[:40_000], y[:40_000], x[40_000:], y[40_000:]
        freq = torch.bincount(self.y, minlength=20).float() / len(self.y)
        w = 1 / freq.clamp_min(1e-4)
        self.weight = w / w.mean()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 20))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        idx = self._idx(batch_idx, len(self.y))
        return F.cross_entropy(self.net(self.x[idx]), self.y[idx], weight=self.weight)

    def metric(self) -> float:
        pred = self.net(self.val_x).argmax(1)
        per = [(pred[self.val_y == c] == c).float().mean() for c in range(20) if bool((self.val_y == c).any())]
        return float(torch.stack(per).mean())


VARIANTS: dict[str, Any] = {
    "pw_balanced": lambda seed: RarePositives(seed, STEPS),
    "pw_balanced_bs8": lambda seed: RarePositives(seed, STEPS, rate=0.005, batch=8),
    "no_pos_weight": lambda seed: RarePositives(seed, STEPS, pos_weight=1.0),
    "focal": lambda seed: RarePositives(seed, STEPS, loss="focal"),
    "sgd_rarer": lambda seed: RarePositives(seed, STEPS, rate=0.001, pos_weight=1000.0, optimizer="sgd", batch=16),
    "sparse_aux": SparseAux,
    "long_tail": LongTail,
}


def fit(variant: str, method: str, seed: int) -> tuple[str, str, int, float, list[tuple[int, str, str]], float]:
    from lightning_gradguard import NaNGuard, default_callbacks

    warnings.simplefilter("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    model = VARIANTS[variant](seed)
    callbacks = list(default_callbacks()) if method.startswith("gradguard") else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        pl.Trainer(
            default_root_dir=root, max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
            gradient_clip_val=1.0 if method.startswith("lightning") else None,
        ).fit(model)  # fmt: skip
    model.eval()
    with torch.no_grad():
        metric = float(model.metric())
    guard = next((c for c in callbacks if isinstance(c, NaNGuard)), None)
    events = [] if guard is None else [(int(e["step"]), str(e["kind"]), str(e.get("rule") or "")) for e in guard.events]
    return variant, method, seed, metric, events, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list from " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    variants = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(v, m, s) for v in variants for m in METHODS for s in seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(fit, *zip(*jobs)))
    got = {(v, m, s): (metric, events) for v, m, s, metric, events, _ in results}
    print(f"rare classes: {STEPS} steps, seeds {args.seeds}; metric per seed (higher is better); gradguard's events as "
          "actions / warnings per seed")  # fmt: skip
    print("| variant | method | per seed | mean | events |")
    print("|---|---|---|---|---|")
    for v in variants:
        for m in METHODS:
            vals = [got[(v, m, s)][0] for s in seeds]
            ev = ""
            if m.startswith("gradguard"):
                ev = " / ".join(
                    f"{sum(k in ACTIONS for _, k, _ in got[(v, m, s)][1])}a {len(got[(v, m, s)][1])}e" for s in seeds
                )
            per = " / ".join(f"{x:.4f}" for x in vals)
            print(f"| {v} | {m} | {per} | {sum(vals) / len(vals):.4f} | {ev} |", flush=True)
    print(f"total wall time {time.perf_counter() - t0:.0f} s for {len(jobs)} fits")


if __name__ == "__main__":
    main()
