"""2-process CPU DDP (gloo) run with all three gradguard callbacks and gradient accumulation.

Faults seen by rank 1 only: a NaN loss at global step 4 (rank 0 sees it through the all-reduced gradients) and a
x1e4 loss spike at step 7 (clipped identically on both ranks, since they hold the same all-reduced gradients).

Run by tests/compat/test_ddp.py in a subprocess (``strategy="ddp"`` inside pytest would re-run pytest in rank 1).
Writes ``rank<r>.json`` per rank into the output directory: what every callback saw and did at every step, the
guard's events, the final weights and optimizer state, and the collectives the callbacks called per step
(``tests/compat/collectives.py``).
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.compat.collectives import around, count_collectives  # noqa: E402
from tests.compat.common import build_all, split  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402
from tests.models import TinyRegression, make_trainer  # noqa: E402


class RankFaults(TinyRegression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.global_step == 4:
            loss = loss * float("nan")
        if self.global_rank == 1 and self.global_step == 7:
            loss = loss * 1e4
        return loss


class Record(Callback):
    """Last in the list: what the gradguard callbacks computed at each optimizer step, on this rank."""

    def __init__(self, callbacks):
        self.mon, self.clip, self.guard = split(callbacks)
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rec = self.clip.last[0]
        self.rows.append(
            {
                "step": trainer.global_step,
                "grad_norm": float(rec.grad_norm),
                "threshold": float(rec.threshold),
                "clipped": bool(rec.clipped),
                "monitor_grad_norm": self.mon.last_grad_norm,
                "monitor_step": self.mon.last_step,
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rows and "reason" not in self.rows[-1] and self.rows[-1]["step"] == trainer.global_step - 1:
            self.rows[-1]["reason"] = self.guard.reason.value


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    counts = count_collectives()
    callbacks = build_all(guard={"snapshot_every_n_steps": 2, "snapshot_confirm_steps": 1})
    record = Record(callbacks)
    listed = around(counts, [*callbacks, record])
    trainer = make_trainer(out_dir, listed, max_steps=10, strategy="ddp", devices=2, accumulate_grad_batches=2)
    model = RankFaults()
    trainer.fit(model)
    _, clip, guard = split(callbacks)
    weights = [float(v) for p in model.parameters() for v in p.detach().flatten()]
    opt_state = [float(v) for s in trainer.optimizers[0].state.values() for t in s.values() for v in t.flatten()]
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "global_step": trainer.global_step,
                "rows": record.rows,
                "events": [{k: e.get(k) for k in ("step", "kind", "cause", "snapshot_step")} for e in guard.events],
                "counters": [guard.skipped_steps, guard.rollbacks, guard.lr_scale],
                "clip_steps": clip.state_dict()["optimizers"][0]["steps"],
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "weights": weights,
                "opt_state": opt_state,
                "hook_collectives": counts.table("on_before_optimizer_step"),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
