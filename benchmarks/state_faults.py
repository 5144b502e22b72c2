"""Faults of the state and of the schedule on healthy runs, each injected after a long healthy stretch.

Six cases (all but ``nan_and_bad_data`` found by a helper on small models, issue 24), each run on seeds 0-2 with
no callbacks (the faulted run), with ``default_callbacks()`` and with ``NaNGuard()``, and the same seed's healthy
run (no fault, no callbacks) as the reference:

- ``weight_bitflip``: a digits MLP (64-128-128-10, Adam 3e-3, batch 32), eight rows of its second Linear scaled
  x1000 in place at step 300 of 600 (an exponent bit flipped by a transient fault: huge, finite weights);
- ``adam_state_reset``: the same MLP with Adam's ``exp_avg_sq`` zeroed at steps 300-304 of 800 (a buggy state reset:
  the model blows up twice);
- ``nan_every_150``: the same MLP under SGD 0.05, a NaN written into one weight every 150 steps of 2400;
- ``nan_and_bad_data``: ``nan_every_150`` with, besides, NaN inputs in the batch of every 40th step (from step 20):
  each state fault comes 10-30 steps after a bad batch;
- ``lr_bug_x10``: SGD with momentum 0.05 whose LambdaLR multiplies the LR by 10 from step 300 to the end of 2500;
- ``slow_starter``: a healthy run, not a fault: RMSprop 1e-2 on a sine regression; its first updates blow the loss
  up (~350 at step 3) and it sits at the untrained level for ~300 steps before it learns.

Metric: validation accuracy (the MLPs; higher is better) or validation MSE (``slow_starter``; lower is better). The
table gives the metric per seed, the guard's actions per seed and the final ``lr_scale``.

Run: ``python benchmarks/state_faults.py [case ...]`` (default: all six; ~4 min on 2 cores).
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
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_shapes import digits  # noqa: E402

CASES = ("weight_bitflip", "adam_state_reset", "nan_every_150", "nan_and_bad_data", "lr_bug_x10", "slow_starter")
CONFIGS = ("healthy", "none", "defaults", "nanguard")
ACTIONS = ("skip", "rollback", "halt", "lower_lr", "restart")
STEPS = {
    "weight_bitflip": 600,
    "adam_state_reset": 800,
    "nan_every_150": 2400,
    "nan_and_bad_data": 2400,
    "lr_bug_x10": 2500,
    "slow_starter": 1500,
}


class DigitsMLP(pl.LightningModule):
    def __init__(self, seed: int, case: str, faulted: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        self.seed, self.case, self.faulted, self.done = seed, case, faulted, set()
        self.x, self.y, self.vx, self.vy = digits(seed)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        step = self.global_step
        nan_weights = self.case in ("nan_every_150", "nan_and_bad_data")
        if self.faulted and nan_weights and step > 0 and step % 150 == 0 and step not in self.done:
            self.done.add(step)
            with torch.no_grad():
                self.net[2].weight[0, 0] = float("nan")
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def on_train_batch_start(self, batch, batch_idx) -> None:  # noqa: ANN001
        if self.faulted and self.case == "nan_and_bad_data" and self.global_step % 40 == 20:
            batch[0].fill_(float("nan"))  # a corrupt record: the batch itself, so a rerun sees it too

    def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
        step = self.global_step
        if not self.faulted or step in self.done:
            return
        if self.case == "weight_bitflip" and step == 300:
            self.done.add(step)
            with torch.no_grad():
                self.net[2].weight[:8].mul_(1000.0)
        elif self.case == "adam_state_reset" and 300 <= step <= 304:
            self.done.add(step)
            for state in optimizer.state.values():
                state["exp_avg_sq"].zero_()

    def configure_optimizers(self) -> Any:
        if self.case in ("weight_bitflip", "adam_state_reset"):
            return torch.optim.Adam(self.parameters(), 3e-3)
        if self.case in ("nan_every_150", "nan_and_bad_data"):
            return torch.optim.SGD(self.parameters(), 0.05)
        opt = torch.optim.SGD(self.parameters(), 0.05, momentum=0.9)
        bug = self.faulted
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 10.0 if bug and t >= 300 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32, shuffle=True, drop_last=True, generator=g)

    @torch.no_grad()
    def metric(self) -> float:
        return float((self.net(self.vx).argmax(-1) == self.vy).float().mean())


class SlowStarter(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        w = torch.randn(16, 1, generator=torch.Generator().manual_seed(5))
        x = torch.randn(6000, 16, generator=g)
        y = torch.sin(x @ w / 1.25) * 3 + 0.1 * torch.randn(6000, 1, generator=g)
        self.train_xy, self.val_xy = (x[:4000], y[:4000]), (x[4000:], y[4000:])
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        return F.mse_loss(self.net(batch[0]), batch[1])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(2)
        return DataLoader(TensorDataset(*self.train_xy), batch_size=32, shuffle=True, generator=g)

    def configure_optimizers(self) -> Any:
        return torch.optim.RMSprop(self.parameters(), lr=1e-2)

    @torch.no_grad()
    def metric(self) -> float:
        return float(F.mse_loss(self.net(self.val_xy[0]), self.val_xy[1]))


def run(case: str, config: str, seed: int) -> dict[str, Any]:
    """One fit; the record: metric, actions (``kind@step``), final lr_scale, the exception of a halt."""
    from lightning_gradguard import NaNGuard, default_callbacks

    pl.seed_everything(seed, verbose=False)
    faulted = config != "healthy"
    model: Any = SlowStarter(seed) if case == "slow_starter" else DigitsMLP(seed, case, faulted)
    callbacks: list[Any] = list(default_callbacks()) if config == "defaults" else []
    if config == "nanguard":
        callbacks = [NaNGuard()]
    error = ""
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=STEPS[case], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
        )  # fmt: skip
        try:
            trainer.fit(model)
        except Exception as e:  # noqa: BLE001 - a halt is part of the record
            error = type(e).__name__
    guard = next((cb for cb in callbacks if isinstance(cb, NaNGuard)), None)
    events = guard.events if guard is not None else []
    return {
        "case": case,
        "config": config,
        "seed": seed,
        "metric": model.metric(),
        "actions": [f"{e['kind']}@{e['step']}" for e in events if e["kind"] in ACTIONS],
        "lr_scale": guard.lr_scale if guard is not None else None,
        "error": error,
    }


def _actions(actions: list[str]) -> str:
    """The actions of one run (``kind@step``), or their count by kind when there are more than 20."""
    if len(actions) <= 20:
        return ", ".join(actions) or "-"
    kinds = [a.split("@")[0] for a in actions]
    return ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds))


def _quiet() -> None:
    """A worker process: one torch thread, no warnings or log lines from the fits."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES), help=f"any of {', '.join(CASES)}")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    jobs = [(c, k, s) for c in args.cases for k in CONFIGS for s in (0, 1, 2)]
    t0 = time.time()
    print(f"command: python benchmarks/state_faults.py {' '.join(args.cases)}")
    print(f"torch {torch.__version__}, lightning {pl.__version__}; {len(jobs)} fits, {args.workers} worker(s)\n")
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_quiet) as pool:
        records = list(pool.map(run, *zip(*jobs)))
    by = {(r["case"], r["config"], r["seed"]): r for r in records}
    print("| case | config | metric per seed | vs healthy (mean) | actions per seed | final lr_scale | halt |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        healthy = [by[(case, "healthy", s)]["metric"] for s in (0, 1, 2)]
        for config in CONFIGS:
            rows = [by[(case, config, s)] for s in (0, 1, 2)]
            metrics = [r["metric"] for r in rows]
            ratio = sum(metrics) / sum(healthy)
            acts = " / ".join(_actions(r["actions"]) for r in rows)
            scales = " / ".join("-" if r["lr_scale"] is None else f"{r['lr_scale']:.3g}" for r in rows)
            halts = " / ".join(r["error"] or "-" for r in rows)
            cells = " / ".join(f"{m:.3f}" for m in metrics)
            print(f"| {case} | {config} | {cells} | {ratio:.3f} | {acts} | {scales} | {halts} |")
    print(
        "\nmetric: validation accuracy (higher is better), slow_starter: validation MSE (lower is better); "
        "'vs healthy': the mean over seeds / the healthy runs' mean."
    )
    print(f"total wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
