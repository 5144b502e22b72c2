"""2-process CPU DDP run of the rerun diagnosis: faults on rank 1 only; both ranks must agree on the diagnosis.

Step 6: a one-off NaN in a layer's output on rank 1 (transient). Step 12: rank 1's batch holds a NaN (data).
Step 18: rank 1's output layer multiplied in place to 1e38 (state; rank 0's weights are fine, its own rerun finite:
the most serious diagnosis wins). Run by tests/callbacks/test_rerun_diagnosis.py; writes ``rerun_rank<r>.json``.

A second fit puts a NaN into rank 1's dataset itself (a sample of its batch 2 of every epoch, an unshuffled loader):
the bad-batch record must hold rank 1's batch only (never rank 0's clean batch at the same position), be the same
on both ranks, and make both skip that step again in every later epoch. Writes ``record_rank<r>.json``.
"""

import json
import math
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import NaNGuard  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402
from tests.models import TinyRegression, make_trainer  # noqa: E402


class RankFaults(TinyRegression):
    def __init__(self) -> None:
        super().__init__()
        self.done: set[int] = set()
        self.net[0].register_forward_hook(self._flip)

    def _flip(self, _mod, _inp, out):
        if self.global_rank == 1 and self.global_step == 6 and 6 not in self.done and torch.is_grad_enabled():
            self.done.add(6)
            return out * math.nan
        return out

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 18 and 18 not in self.done:
            self.done.add(18)
            with torch.no_grad():
                self.net[4].weight.mul_(1e38)
        return super().training_step(batch, batch_idx)


class PoisonBatch(Callback):
    """Step 12 on rank 1: a NaN written into the batch itself (the data arrives bad)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 12:
            batch[0][0, 0] = math.nan


class PersistentPoison(TinyRegression):
    """Rank 1's copy of the dataset holds a NaN in sample 17: its batch 2 of every epoch (the Trainer keeps the
    loader's own unshuffled order, ``use_distributed_sampler=False``: 8 batches of 8 per epoch)."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        if self.global_rank == 1:
            loader.dataset.tensors[0][17, 0] = math.nan
        return loader


def record_fit(out_dir: str) -> None:
    torch.manual_seed(0)
    guard = NaNGuard(snapshot_every_n_steps=4, snapshot_confirm_steps=1)
    trainer = make_trainer(
        out_dir, [guard], max_steps=20, strategy="ddp", devices=2, logger=False, use_distributed_sampler=False
    )
    trainer.fit(PersistentPoison())
    Path(out_dir, f"record_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "events": [[e["step"], e["kind"], e["cause"], e.get("diagnosis")] for e in guard.events],
                "record": [e.to_dict() for e in guard.bad_batches.entries],
            }
        )
    )


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    guard = NaNGuard(snapshot_every_n_steps=4, snapshot_confirm_steps=1)
    trainer = make_trainer(out_dir, [guard, PoisonBatch()], max_steps=24, strategy="ddp", devices=2, logger=False)
    model = RankFaults()
    trainer.fit(model)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    Path(out_dir, f"rerun_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "events": [
                    [e["step"], e["kind"], e.get("diagnosis"), e.get("diagnosis_evidence")] for e in guard.events
                ],
                "lr_scale": guard.lr_scale,
                "finite": bool(torch.isfinite(weights).all()),
                "checksum": float(weights.double().sum()),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    record_fit(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
