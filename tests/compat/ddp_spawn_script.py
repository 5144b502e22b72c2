"""``Trainer(strategy="ddp_spawn")`` with ``default_callbacks()``: the spawn launcher pickles the Trainer and its
callbacks into each new process (a weak reference in a callback made the launch fail). One spawned CPU process
(pickled all the same, and no teardown race between ranks); a NaN loss at step 6 must be skipped in the spawned
process. Writes ``result.json`` from rank 0."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import NaNGuard, default_callbacks  # noqa: E402
from tests.models import TinyRegression, loader, make_trainer  # noqa: E402


class _Result(TinyRegression):
    def on_train_end(self) -> None:
        guard = next(cb for cb in self.trainer.callbacks if isinstance(cb, NaNGuard))
        if self.trainer.global_rank == 0:
            kinds = [e["kind"] for e in guard.events]
            out = {"kinds": kinds, "steps": self.trainer.global_step, "world": self.trainer.world_size}
            Path(sys.argv[1], "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer = make_trainer(
        sys.argv[1], default_callbacks(), max_steps=10, logger=False, strategy="ddp_spawn", devices=1
    )
    trainer.fit(_Result(nan_at_steps=(6,)), loader())
