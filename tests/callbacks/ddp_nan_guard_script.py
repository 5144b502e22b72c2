"""2-process CPU DDP run: faults seen by rank 1 only must make both ranks roll back together and finish.

Step 4: NaN loss on rank 1 (rank 0 sees it through the all-reduced gradients). Step 6: an inf weight on rank 1
only, after the gradient check: found when the snapshot taken right after step 6 is checked before it is trusted
(rank 0 sees nothing itself; the flag reaches it through the one reduce of that check).

Run by tests/callbacks/test_nan_guard_ddp.py in a subprocess (``strategy="ddp"`` inside pytest would re-run pytest
in rank 1). Writes ``guard_rank<r>.json`` per rank into the output directory.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import NaNGuard  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402
from tests.models import TinyRegression, make_trainer  # noqa: E402


class RankFault(TinyRegression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.global_step == 4:
            loss = loss * float("nan")
        return loss


class PoisonOnRank1(Callback):
    """After the gradient check of step 6, put an inf into a weight on rank 1 only: only rank 1 can see it."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 1 and trainer.global_step == 6:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("inf")


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2, snapshot_confirm_steps=1)
    trainer = make_trainer(out_dir, [guard, PoisonOnRank1()], max_steps=10, strategy="ddp", devices=2, logger=False)
    model = RankFault()
    trainer.fit(model)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    Path(out_dir, f"guard_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "global_step": trainer.global_step,
                "events": [{k: e[k] for k in ("step", "kind", "cause", "snapshot_step")} for e in guard.events],
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "finite": bool(torch.isfinite(weights).all()),
                "checksum": float(weights.double().sum()),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
