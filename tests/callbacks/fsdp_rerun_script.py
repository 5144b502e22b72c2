"""2-process CPU FSDP2 run (``ModelParallelStrategy`` + ``fully_shard``, gloo) of the rerun diagnosis: faults on rank
1 only; a rerun is a collective there (the forward all-gathers), so both ranks rerun together and must agree.

Step 4: a one-off NaN in ``net.0``'s output on rank 1 (transient: skipped, LR kept). Step 8: rank 1's batch holds a
NaN (data). Step 12: rank 1's local shard of the output layer multiplied in place to 1e38 (state: the weights stay
finite, every output overflows on both ranks; the trusted snapshot's shards give a finite loss; rolled back). Every
rerun is checked to leave each rank's local shards of the weights, gradients and Adam state, and the RNG, bit for bit
as they were. Run by tests/callbacks/test_rerun_diagnosis.py; writes ``fsdp_rerun_rank<r>.json``.
"""

import json
import math
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import NaNGuard  # noqa: E402
from lightning_gradguard.callbacks._trainer_host import TrainerHost  # noqa: E402
from tests.compat.common import differences  # noqa: E402
from tests.compat.fsdp_models import IN_DIM, ShardedRegression, sharded_trainer  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402


class RankFaults(ShardedRegression):
    """The output layer has 2 rows (mean of both), so that rank 1 holds a piece of it to corrupt."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 2))
        self.done: set[int] = set()
        self.net[0].register_forward_hook(self._flip)

    def _flip(self, _mod, _inp, out):
        if self.global_rank == 1 and self.global_step == 4 and 4 not in self.done:
            self.done.add(4)
            return out * math.nan
        return out

    def forward(self, x):
        return self.net(x).mean(-1, keepdim=True)

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 12 and 12 not in self.done:
            self.done.add(12)
            with torch.no_grad():
                self.net[4].weight.to_local().mul_(1e38)
        return super().training_step(batch, batch_idx)


class PoisonBatch(Callback):
    """Step 8 on rank 1: a NaN written into the batch itself (the data arrives bad)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 8:
            batch[0][0, 0] = math.nan


def _local(obj):
    """Each rank's own pieces of a nested state (DTensors as their local shards), cloned."""
    if isinstance(obj, torch.Tensor):
        return (obj.to_local() if hasattr(obj, "to_local") else obj).detach().clone()
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_local(v) for v in obj]
    return obj


def _live(trainer, model) -> dict:
    return {
        "model": _local(model.state_dict()),
        "grads": [None if p.grad is None else _local(p.grad) for p in model.parameters()],
        "optimizers": [_local(o.state_dict()) for o in trainer.optimizers],
        "rng": torch.get_rng_state(),
        "global_step": trainer.global_step,
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    reruns: list[dict] = []
    original = TrainerHost.rerun

    def checked(self, items, rngs, weights, step=None):
        before = _live(self.trainer, self.pl_module)
        result = original(self, items, rngs, weights, step)
        diff = differences(_live(self.trainer, self.pl_module), before)
        reruns.append({"step": step, "weights": weights is not None, "diff": diff, "result": str(result)})
        return result

    TrainerHost.rerun = checked
    torch.manual_seed(0)
    guard = NaNGuard(snapshot_every_n_steps=2, snapshot_confirm_steps=1)
    trainer = sharded_trainer(out_dir, [guard, PoisonBatch()], max_steps=16)
    model = RankFaults()
    trainer.fit(model)
    local = torch.cat([p.detach().to_local().flatten() for p in model.parameters()])
    Path(out_dir, f"fsdp_rerun_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "events": [
                    [e["step"], e["kind"], e.get("diagnosis"), e.get("diagnosis_evidence"), e.get("lr_scale")]
                    for e in guard.events
                ],
                "reruns": reruns,
                "lr_scale": guard.lr_scale,
                "finite": bool(torch.isfinite(local).all()),
                "global_step": trainer.global_step,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
