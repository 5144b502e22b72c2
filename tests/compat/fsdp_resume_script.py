"""2-process FSDP2 (``ModelParallelStrategy``) fit -> distributed checkpoint -> resume, all three callbacks.

Run 1 trains 6 steps (rank 1 writes NaN into its weight shard at step 2, so the guard rolls back and its state is not
trivial) and saves a distributed checkpoint at step 6; run 2 resumes from it with fresh callbacks and trains to step
9. Writes ``rank<r>.json``: every callback's ``state_dict()`` at the end of run 1 and right after the resume
(``on_train_start``, when Lightning has restored callbacks, optimizer and loops), the optimizer LR at both points
and the steps run 2 made. Run as one of the fits of ``fsdp_all_callbacks_script.py`` (``resume``) or on its own.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.compat.common import build_all  # noqa: E402
from tests.compat.fsdp_models import ShardedRegression, sharded_trainer  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402


def plain(obj):
    """A JSON-able copy of a state (tensors as lists with their dtype), for exact comparison."""
    if torch.is_tensor(obj):
        t = obj.full_tensor() if hasattr(obj, "full_tensor") else obj
        return {"dtype": str(t.dtype), "values": t.detach().cpu().flatten().tolist(), "shape": list(t.shape)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return "nan"
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else repr(obj)


class Probe(Callback):
    def __init__(self, callbacks):
        self.callbacks = callbacks
        self.at_start = None
        self.steps = []

    def on_train_start(self, trainer, pl_module):
        self.at_start = {
            "states": {type(c).__name__: plain(c.state_dict()) for c in self.callbacks},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "global_step": trainer.global_step,
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def main(out_dir: str, prefix: str = "rank") -> None:
    torch.set_num_threads(1)
    ckpt_dir = Path(out_dir, f"{prefix}_ckpt")
    guard = {"snapshot_every_n_steps": 2, "snapshot_confirm_steps": 1}
    first = build_all(guard=guard)
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1)
    trainer = sharded_trainer(out_dir, [*first, saver], max_steps=6, enable_checkpointing=True)
    torch.manual_seed(0)
    trainer.fit(ShardedRegression(faults={2: (1, "weight")}))
    saved = {
        "states": {type(c).__name__: plain(c.state_dict()) for c in first},
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "global_step": trainer.global_step,
    }
    (path,) = sorted(ckpt_dir.iterdir())
    second = build_all(guard=guard)
    probe = Probe(second)
    trainer = sharded_trainer(out_dir, [*second, probe], max_steps=9)
    torch.manual_seed(0)
    trainer.fit(ShardedRegression(), ckpt_path=str(path))
    Path(out_dir, f"{prefix}{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "checkpoint": path.name,
                "checkpoint_is_dir": path.is_dir(),
                "saved": saved,
                "resumed": probe.at_start,
                "resumed_steps": probe.steps,
                "final_states": {type(c).__name__: plain(c.state_dict()) for c in second},
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
