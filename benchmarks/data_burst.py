"""A corrupt shard in the data stream: 50 consecutive batches (steps 300-349 of 600) whose inputs arrive x1e4 (finite).

A digits MLP (64-128-128-10) read from an unshuffled stream, Adam 1e-3 (``adam``), Adam 1e-4 (``adam_slow``) or SGD
0.05 with momentum (``sgd``); seeds 0-2; no callbacks, ``default_callbacks()`` and ``NaNGuard()``. Prints the
validation accuracy, the exception (a halt) and the guard's actions by kind and rerun diagnosis. What it shows
(README, "the rerun diagnosis"): the guard skips the shard's batches as *data* instead of rolling back into the
shard until its budget halts the fit.

Also a state fault (``sgd_zeroed``): plain SGD 0.1 on the same stream without the shard, the second Linear's weight
and bias zeroed in place at step 300 (its ReLUs then pass no gradient: the network dies at chance after learning),
and its healthy twin ``sgd_plain`` (no fault) for reference. What it shows (README, "died after learning"): the guard
names the death and goes back to a kept state that does better on the batches, LR kept.

Run: ``python benchmarks/data_burst.py [adam|adam_slow|sgd|sgd_zeroed|sgd_plain ...]`` (default: the first three;
~30 s each on one core).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard, default_callbacks

STEPS, BATCH, SHARD = 600, 64, (300, 350)
ZEROED_AT = 300  # sgd_zeroed: the step whose start zeroes the second Linear


class Shard(pl.LightningModule):
    def __init__(self, seed: int, optimizer: str) -> None:
        super().__init__()
        d = load_digits()
        g = torch.Generator().manual_seed(seed)
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
        order = torch.randperm(len(x), generator=g)
        x, y = x[order], y[order]
        self.x_val, self.y_val = x[1400:], y[1400:]
        n = STEPS * BATCH
        idx = torch.cat([torch.randperm(1400, generator=g) for _ in range(n // 1400 + 1)])[:n]
        corrupt = torch.zeros(n, dtype=torch.bool)
        if optimizer in ("adam", "adam_slow", "sgd"):  # the corrupt shard (the other modes have a state fault or none)
            corrupt[SHARD[0] * BATCH : SHARD[1] * BATCH] = True
        self.stream = (x[idx], y[idx], corrupt)
        self.optimizer = optimizer
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.stream), batch_size=BATCH, shuffle=False)

    def training_step(self, batch, batch_idx):
        if self.optimizer == "sgd_zeroed" and self.global_step == ZEROED_AT and not getattr(self, "_zeroed", False):
            self._zeroed = True  # once (a rollback to before it does not zero it again: a transient fault)
            with torch.no_grad():
                self.net[2].weight.zero_()
                self.net[2].bias.zero_()
        x, y, corrupt = batch
        return F.cross_entropy(self.net(torch.where(corrupt[:, None], x * 1e4, x)), y)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        if self.optimizer == "adam_slow":
            return torch.optim.Adam(self.parameters(), lr=1e-4)
        if self.optimizer in ("sgd_zeroed", "sgd_plain"):
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def accuracy(self) -> float:
        with torch.no_grad():
            return float((self.net(self.x_val).argmax(1) == self.y_val).float().mean())


def main(optimizers: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    configs = {"none": list, "defaults": default_callbacks, "nanguard": lambda: [NaNGuard()]}
    print("optimizer | seed | configuration | val acc | exception | actions (kind, diagnosis): count")
    for opt in optimizers:
        for seed in (0, 1, 2):
            for config, make in configs.items():
                pl.seed_everything(seed, verbose=False)
                model, callbacks, error = Shard(seed, opt), list(make()), ""
                with tempfile.TemporaryDirectory() as root:
                    try:
                        pl.Trainer(default_root_dir=root, accelerator="cpu", max_steps=STEPS, logger=False,
                                   callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False, deterministic=True).fit(model)  # fmt: skip
                    except Exception as e:  # noqa: BLE001 - a halt is a result
                        error = type(e).__name__
                guard = next((c for c in callbacks if isinstance(c, NaNGuard)), None)
                kinds: dict[tuple[str, str], int] = {}
                for e in guard.events if guard else []:
                    if e["kind"] != "warn":
                        key = (e["kind"], e.get("diagnosis") or "-")
                        kinds[key] = kinds.get(key, 0) + 1
                acts = ", ".join(f"{k} {d}: {n}" for (k, d), n in sorted(kinds.items())) or "-"
                print(f"{opt} | {seed} | {config} | {model.accuracy():.3f} | {error or '-'} | {acts}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["adam", "adam_slow", "sgd"])
