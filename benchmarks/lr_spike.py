"""An LR spike on two shapes where it used to end the run with no event: the LR set x100 for 20 steps (150-169 of 300).

The spike is the schedule's (a ``LambdaLR`` whose factor is 100 on those steps: a bug in a hand-written schedule),
so a rollback's restored scheduler state brings it back as the user wrote it.

- ``uncert``: a digits MLP (64-128-128 body, a 10-class head and a regression head) whose two losses are weighted by
  learned log-variances (Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR 2018), Adam
  3e-3, batch 64. The spike sends the log-variances up and the network to chance; the loss then sits flat at ~4,
  below the first loss. Metric: validation accuracy (higher is better).
- ``tbptt``: a character LSTM language model (64-d embedding, 128 units) trained with truncated backpropagation
  through time on scikit-learn's dataset descriptions (16 streams, 32 characters a step, the hidden state carried
  and detached), Adam 3e-3. Its cross-entropy has a high floor: 2.3 nats at its best, 4.5 untrained; the spike
  throws it to ~3.9 and it cannot double. Metric: validation cross-entropy in nats (lower is better).

Each seed (0-2) runs four ways: ``healthy`` (no spike, no callbacks: the reference), ``none`` (the spike, no
callbacks), ``defaults`` (the spike, ``default_callbacks()``) and ``nanguard`` (the spike, ``NaNGuard()``). Prints the
metric, the exception (a halt) and the guard's actions, each with its rule. What it shows (README, the climbing
loss): a spike whose first steps fell into the best window no longer hides the climb behind that window's noise (the
spread is a robust one), and a loss that lost half of what it learned climbs, tested on the batches.

Run: ``python benchmarks/lr_spike.py [uncert|tbptt ...]`` (default both; ~2 min on one core).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_gradguard import NaNGuard, default_callbacks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenarios import load_text  # noqa: E402

STEPS, SPIKE, SPIKE_STEPS, FACTOR = 300, 150, 20, 100.0


def _adam(module: pl.LightningModule, spike: bool):
    """Adam 3e-3 under a ``LambdaLR`` that is 1, or (``spike``) ``FACTOR`` on steps ``SPIKE`` .. ``SPIKE +
    SPIKE_STEPS - 1``."""
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    if not spike:
        return opt

    def factor(step: int) -> float:
        return FACTOR if SPIKE <= step < SPIKE + SPIKE_STEPS else 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _digits(seed: int):
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    return x[order][:1400], y[order][:1400], x[order][1400:], y[order][1400:]


class Uncert(pl.LightningModule):
    def __init__(self, seed: int, spike: bool) -> None:
        super().__init__()
        self.seed, self.spike = seed, spike
        self.x, self.y, self.x_val, self.y_val = _digits(seed)
        self.t = self.x.mean(1) * 10  # a regression target read off the same images
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
        self.cls, self.reg = nn.Linear(64, 10), nn.Linear(64, 1)
        self.logvar = nn.Parameter(torch.zeros(2))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.x, self.y, self.t), batch_size=64, shuffle=True, generator=g,
                          drop_last=True)  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        h = F.relu(self.body(x))
        ce, mse = F.cross_entropy(self.cls(h), y), F.mse_loss(self.reg(h).squeeze(1), t)
        return torch.exp(-self.logvar[0]) * ce + 0.5 * torch.exp(-self.logvar[1]) * mse + 0.5 * self.logvar.sum()

    def configure_optimizers(self):
        return _adam(self, self.spike)

    def metric(self) -> float:
        with torch.no_grad():
            return float((self.cls(F.relu(self.body(self.x_val))).argmax(1) == self.y_val).float().mean())


class _Chunks(Dataset):
    def __init__(self, streams: torch.Tensor, length: int) -> None:
        self.streams, self.length = streams, length

    def __len__(self) -> int:
        return (self.streams.shape[1] - 1) // self.length

    def __getitem__(self, i: int):
        a = i * self.length
        return self.streams[:, a : a + self.length], self.streams[:, a + 1 : a + self.length + 1]


class TBPTT(pl.LightningModule):
    def __init__(self, seed: int, spike: bool) -> None:
        super().__init__()
        self.spike = spike
        text, _ = load_text()
        chars = sorted(set(text))
        ids = torch.tensor([chars.index(c) for c in text])
        n = int(len(ids) * 0.9)
        cols = n // 16
        self.streams, self.val = ids[: cols * 16].view(16, cols), ids[n:]
        torch.manual_seed(seed)
        self.emb, self.rnn = nn.Embedding(len(chars), 64), nn.LSTM(64, 128, batch_first=True)
        self.out = nn.Linear(128, len(chars))
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Chunks(self.streams, 32), batch_size=1, shuffle=False)

    def training_step(self, batch, batch_idx):
        x, y = batch[0][0], batch[1][0]
        if self.hidden is not None:
            self.hidden = (self.hidden[0].detach(), self.hidden[1].detach())
        out, self.hidden = self.rnn(self.emb(x), self.hidden)
        return F.cross_entropy(self.out(out).reshape(-1, self.out.out_features), y.reshape(-1))

    def configure_optimizers(self):
        return _adam(self, self.spike)

    def metric(self) -> float:
        with torch.no_grad():
            out, _ = self.rnn(self.emb(self.val[:-1].unsqueeze(0)))
            return float(F.cross_entropy(self.out(out)[0], self.val[1:]))


SHAPES = {"uncert": Uncert, "tbptt": TBPTT}


def run(shape: str, seed: int, config: str) -> tuple[float, str, list[dict]]:
    """One fit: (final metric, the exception's type or '', the guard's events)."""
    pl.seed_everything(seed, verbose=False)
    model = SHAPES[shape](seed, spike=config != "healthy")
    make = {"healthy": list, "none": list, "defaults": default_callbacks, "nanguard": lambda: [NaNGuard()]}[config]
    callbacks = list(make())
    error = ""
    with tempfile.TemporaryDirectory() as root:
        try:
            pl.Trainer(default_root_dir=root, accelerator="cpu", max_steps=STEPS, logger=False, callbacks=callbacks,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       num_sanity_val_steps=0).fit(model)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a halt is a result
            error = type(e).__name__
    guard = next((c for c in callbacks if isinstance(c, NaNGuard)), None)
    return model.metric(), error, list(guard.events) if guard else []


def main(shapes: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print("shape | seed | configuration | metric | exception | actions (kind, rule @ step) | warnings")
    for shape in shapes:
        for seed in (0, 1, 2):
            for config in ("healthy", "none", "defaults", "nanguard"):
                metric, error, events = run(shape, seed, config)
                acts = [f"{e['kind']} {e.get('rule') or e.get('cause')} @ {e['step']}" for e in events
                        if e["kind"] != "warn"]  # fmt: skip
                warns = sum(e["kind"] == "warn" for e in events)
                print(f"{shape} | {seed} | {config} | {metric:.4f} | {error or '-'} | {', '.join(acts) or '-'} | "
                      f"{warns}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:] or list(SHAPES))
