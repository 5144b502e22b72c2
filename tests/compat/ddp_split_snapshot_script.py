"""2-process CPU DDP (gloo): NaNGuard's in-memory snapshots split over the ranks (``shard_snapshots``).

A weight is corrupted in place on rank 1 only at global step 7 (rank 0's replica stays finite; the all-reduced
gradients are NaN on both). Both ranks roll back; the state right after the rollback must equal, bit for bit, the
state recorded at the snapshot's step on *each* rank, although each rank kept only its own part of that snapshot.
The model has one layer larger than all the rest together, so an even split must cut a tensor.

Run by tests/compat/test_ddp_split_snapshots.py; writes ``<name>_rank<r>.pt`` per fit and rank.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import NaNGuard  # noqa: E402
from lightning_gradguard.core.recover._snapshot import tensors_in  # noqa: E402
from tests.compat.common import StateRecorder, full_state  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402
from tests.models import TinyRegression, make_trainer  # noqa: E402

FAULT_STEP = 7


class RankOneCorruption(TinyRegression):
    def __init__(self, **kw):
        super().__init__(hidden=128, depth=2, **kw)  # the middle Linear: 16k of the ~18k parameters
        self.done = False

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == FAULT_STEP and not self.done:
            self.done = True
            with torch.no_grad():
                self.net[0].weight[3, 5] = float("nan")
        return super().training_step(batch, batch_idx)


class Sizes(Callback):
    """After NaNGuard: the bytes this rank's snapshots hold, against the whole state's, at every step."""

    def __init__(self, guard):
        self.guard = guard
        self.rows = []
        self.after_rollback = None
        self.model_part = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        engine = self.guard.engine
        held = {id(s): s for s in engine.store.snapshots}
        whole = full_state(trainer, pl_module)
        state_bytes = sum(t.numel() * t.element_size() for t in tensors_in(whole))
        self.rows.append(
            {
                "step": trainer.global_step,
                "per_snapshot": [s.nbytes() for s in held.values()],
                "held": engine.snapshot_bytes(),
                "n_held": len({*held, *([id(engine.start_state.snapshot)] if engine.start_state.snapshot else [])}),
                "state_bytes": state_bytes,
                "snapshot_mb": engine.scalars().get("gradguard/snapshot_mb"),
            }
        )
        if self.guard.events and self.after_rollback is None:
            self.after_rollback = whole
        if trainer.global_step == 5 and engine.store.snapshots:  # both ranks: the model's part alone, gathered
            snap = engine.store.snapshots[-1]
            self.model_part = (snap.step, snap.whole_model())


def fit(out_dir: str, name: str, shard: bool) -> None:
    torch.manual_seed(0)
    guard = NaNGuard(
        action="rollback", snapshot_every_n_steps=2, snapshot_confirm_steps=1, shard_snapshots=shard, rerun=False
    )
    recorder, sizes = StateRecorder(), Sizes(guard)
    trainer = make_trainer(Path(out_dir, name), [guard, recorder, sizes], max_steps=12, strategy="ddp", devices=2)
    trainer.fit(RankOneCorruption())
    torch.save(
        {
            "rank": trainer.global_rank,
            "events": [{k: e.get(k) for k in ("step", "kind", "snapshot_step", "lr_scale")} for e in guard.events],
            "states": recorder.states,
            "after_rollback": sizes.after_rollback,
            "rows": sizes.rows,
            "model_part": sizes.model_part,
        },
        Path(out_dir, f"{name}_rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    fit(sys.argv[1], "split", True)
    fit(sys.argv[1], "whole", False)
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
