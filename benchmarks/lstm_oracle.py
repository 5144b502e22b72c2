"""How close can any rule bring the grid's ``char_lstm/explosive`` runs? An oracle's answer.

``benchmarks/rescue.py``'s char LSTM at its explosive LR (SGD momentum, lr 10, 10x the stable LR, 150 steps) ends
near 4.0 bits per character under ``default_callbacks()`` (no guard event) and under Lightning's
``gradient_clip_val=1.0``; the stable runs end at 3.156, so "within 5 % of the reference" means 3.31 or lower.
This script gives ``default_callbacks()`` an oracle that knows the LR is 10x too high:

- ``cut@S``: at step S the LR is set to the stable LR (1.0) and the run goes on from its state;
- ``restart@S``: at step S the model goes back to its initial weights, the optimizer state is cleared and the LR
  is the stable one (a rule that restarts from the untrained state at the right LR, with the steps left).

Both happen with certainty, at a chosen step, without any evidence: no rule can do better than the better of them
at that step. Prints each run's validation bits per character. Run: ``python benchmarks/lstm_oracle.py``
(~3 min on one core).
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_gradguard import default_callbacks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402

STEPS, STABLE_LR, TARGET = 150, 1.0, 3.156 * 1.05


class Oracle(pl.Callback):
    """At ``step``: set the LR to the stable one (``restart`` False), or restart from the initial weights with a
    fresh optimizer state at the stable LR (``restart`` True)."""

    def __init__(self, step: int, restart: bool) -> None:
        self.step, self.restart = step, restart
        self.initial: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step != self.step:
            return
        opt = trainer.optimizers[0]
        if self.restart and self.initial is not None:
            pl_module.load_state_dict(self.initial)
            opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = STABLE_LR


def fit(seed: int, oracle: Oracle | None) -> float:
    pl.seed_everything(seed, verbose=False)
    model, _ = scenarios._char_build(seed, "explosive", False)
    callbacks = list(default_callbacks()) + ([oracle] if oracle is not None else [])
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            default_root_dir=root, max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(model)
        return float(trainer.validate(model, verbose=False)[0]["val_bpc"])


def main() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    print(f"char_lstm/explosive (SGD momentum lr 10), {STEPS} steps, default_callbacks() plus an oracle; "
          f"within 5 % of the stable reference: <= {TARGET:.3f} bpc")  # fmt: skip
    print("oracle | seed 0 | seed 1 | seed 2 | runs within 5 %")
    plans: list[tuple[str, int | None, bool]] = [("none", None, False)]
    plans += [(f"cut@{s}", s, False) for s in (15, 30, 60)]
    plans += [(f"restart@{s}", s, True) for s in (15, 30, 60)]
    for name, step, restart in plans:
        values = [fit(seed, None if step is None else Oracle(step, restart)) for seed in (0, 1, 2)]
        inside = sum(v <= TARGET for v in values)
        print(f"{name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {inside}/3", flush=True)


if __name__ == "__main__":
    main()
