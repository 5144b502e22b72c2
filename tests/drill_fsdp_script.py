"""2-process CPU FSDP2 fault drill (``ModelParallelStrategy`` + ``fully_shard``, gloo): ``default_callbacks()`` +
``FaultDrill`` over every fault, two fits in the same two processes.

- ``one_rank``: every fault injected on rank 1 only (``FaultDrill(..., rank=1)``): the NaN weight goes into rank 1's
  local shard of ``net.0.weight`` (rows 8-15 of 16), the transient NaN into rank 1's forward of the sharded
  ``net.0``; rank 0 must see the guard act all the same.
- ``every_rank``: the same faults on both ranks (``rank=None``): each rank's own shard, batch, loss and forward.

``scale_collapse`` is in both: without a GradScaler it must be reported as skipped, with the reason.

Run by tests/test_drill.py through tests/ddp_runner.py. Writes ``<fit>_rank<r>.json`` per rank into the output
directory: the drill's rows, its report, the guard's events and whether each rank's local shards are finite.
"""

import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.compat.fsdp_models import ShardedRegression, rank_batches, sharded_trainer  # noqa: E402
from tests.drill_ddp_script import MAX_STEPS, main, run_drill  # noqa: E402


class DrillRegression(ShardedRegression):
    """ShardedRegression at Adam lr 0.001 over shuffled batches of 32 (10 per epoch, a fixed order per rank): the
    loss still falls through the whole drill, and batches of 32 keep the window means steady (batches of 8 near the
    noise floor vary by half their mean from one to the next). Shuffled like a real loader: an unshuffled one meets
    the same batch at the same index every epoch."""

    def __init__(self) -> None:
        super().__init__(lr=0.001)

    def train_dataloader(self) -> DataLoader:
        data = rank_batches(self.data_rank, n_batches=10, batch_size=32)
        order = torch.Generator().manual_seed(7 + self.data_rank)
        return DataLoader(data, batch_size=32, shuffle=True, generator=order)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def fit(out_dir: str, name: str, rank: int | None) -> None:
    def build_trainer(directory: str, callbacks: list[Any]) -> Any:
        return sharded_trainer(directory, callbacks, max_steps=MAX_STEPS)

    def extra(model: Any) -> dict[str, Any]:
        return {
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "weights_finite": all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters()),
        }

    run_drill(out_dir, name, rank, build_trainer, DrillRegression, extra)


if __name__ == "__main__":
    main(sys.argv[1], fit)
