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

import json
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gradguard import FaultDrill, default_callbacks  # noqa: E402
from tests.compat.fsdp_models import ShardedRegression, rank_batches, sharded_trainer  # noqa: E402

#: one fault every 15 steps from step 20; recovery judged 10 steps on (windows of 5 steps)
FAULTS = {
    "scale_collapse": 4,
    "nan_weight": 20,
    "nan_batch": 35,
    "inf_loss": 50,
    "transient": 65,
    "spike": 80,
    "bad_batches": [95, 96, 97],
}
RECOVERY_STEPS = 10
MAX_STEPS = 97 + RECOVERY_STEPS + 1


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
    torch.manual_seed(0)
    guard = {"snapshot_every_n_steps": 5, "snapshot_confirm_steps": 2}
    drill = FaultDrill(FAULTS, recovery_steps=RECOVERY_STEPS, rank=rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = sharded_trainer(out_dir, [*default_callbacks(guard_kwargs=guard), drill], max_steps=MAX_STEPS)
        model = DrillRegression()
        trainer.fit(model)
    events = [{k: e.get(k) for k in ("step", "kind", "cause", "diagnosis")} for e in drill._guard.events]
    Path(out_dir, f"{name}_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "global_step": trainer.global_step,
                "rows": drill.table(),
                "report": drill.report(),
                "all_handled": drill.all_handled,
                "fired": {str(k): v for k, v in drill.fired.items()},  # this rank's own injections ("": injected here)
                "events": events,
                "other_events": [{k: e.get(k) for k in ("step", "kind", "cause")} for e in drill.other_events()],
                "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
                "weights_finite": all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters()),
                "warnings": [str(w.message) for w in caught if "FaultDrill" in str(w.message)],
            },
            default=str,
        )
    )


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    fit(out_dir, "one_rank", rank=1)
    fit(out_dir, "every_rank", rank=None)


if __name__ == "__main__":
    main(sys.argv[1])
