"""2-process CPU FSDP2 (``ModelParallelStrategy`` + ``fully_shard``, gloo): ``NaNGuard(snapshot="checkpoint")`` rolls
back from this fit's distributed checkpoints (directories of DCP shards plus ``meta.pt``).

Two fits in the same two processes, one checkpoint directory:

- ``other``: an earlier run (its own guard, so its ``meta.pt`` holds a run id, another one) writes distributed
  checkpoints at steps 5 and 10 into the directory.
- ``main``: ``ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)`` into the same directory, ``NaNGuard(
  snapshot="checkpoint", action="rollback", snapshot_confirm_steps=1)``, Adam + a per-step ``StepLR``. Rank 1 alone
  writes NaN into its weight shard at steps 5 and 11. Before step 5 its step-4 checkpoint loses rank 1's shard file
  and its step-2 ``meta.pt`` is overwritten with garbage; before steps 5 and 11 the other run's step-10 checkpoint is
  touched (the newest) and listed by this run's ModelCheckpoint (as a restored ModelCheckpoint state would list it);
  before step 11 its step-10 checkpoint's rank-0 shard file is truncated. So at step 5 nothing is usable (the guard
  falls back to its in-memory start state, naming each directory), at step 11 it rolls back to its step-8
  checkpoint.

Writes ``main_rank<r>.json`` (events, the candidates passed over, LRs, scheduler counts, timings, the checkpoint
directories) and ``main_rank<r>.pt``: this rank's local shards of the weights and of the Adam state (DCP's layout)
right after each step, and as a DCP load of the step-8 checkpoint into a fresh copy gives them. Run by
tests/compat/test_fsdp_checkpoint_rollback.py through tests/ddp_runner.py.
"""

import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gradguard import NaNGuard  # noqa: E402
from lightning_gradguard.core.recover._snapshot import clone_state  # noqa: E402
from tests.compat.fsdp_models import ShardedRegression, sharded_trainer  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402

FAULTS = {5: (1, "weight"), 11: (1, "weight")}
#: the checkpoint the second fault rolls back to (the step-10 one is truncated before it)
TARGET = 8


class ScheduledRegression(ShardedRegression):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}


def local_state(module, optimizer):
    """This rank's local shards of the weights and of the optimizer state (DCP's layout), CPU copies."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    def plain(obj):
        if torch.is_tensor(obj):
            return (obj.to_local() if hasattr(obj, "to_local") else obj).detach().clone().cpu()
        if isinstance(obj, dict):
            return {str(k): plain(v) for k, v in obj.items()}
        return obj

    return {
        "weights": plain(get_model_state_dict(module)),
        "opt": plain(get_optimizer_state_dict(module, optimizer)["state"]),
    }


class Record(Callback):
    """After the guard: the state right after every step (after a rollback, the restored one), the LR, the scheduler's
    count and the time the guard's step-end took."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}
        self.lr: dict[int, float] = {}
        self.sched: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.states[step] = local_state(pl_module, trainer.optimizers[0])
        self.lr[step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.sched[step] = trainer.lr_scheduler_configs[0].scheduler.last_epoch


class Timed(Callback):
    """Around the guard's on_train_batch_end (one before it, one after it, sharing ``ms``): the wall time of each
    step end."""

    def __init__(self, start: "Timed | None" = None) -> None:
        self.start = start
        self.started = 0.0
        self.ms: dict[int, float] = {} if start is None else start.ms

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is None:
            self.started = time.perf_counter()
        else:
            self.ms[trainer.global_step] = (time.perf_counter() - self.start.started) * 1e3


class Damage(Callback):
    """Damages this run's checkpoints and offers the other run's before the faults (files on rank 0 only)."""

    def __init__(self, ckpt_dir: Path, foreign: Path, saver: ModelCheckpoint) -> None:
        self.ckpt_dir, self.foreign, self.saver = ckpt_dir, foreign, saver
        self.mine: dict[int, str] = {}

    def _mine(self, step: int) -> Path:
        pattern = rf"epoch=\d+-step={step}(-v\d+)?\.ckpt"
        (path,) = [p for p in self.ckpt_dir.iterdir() if re.fullmatch(pattern, p.name) and p != self.foreign]
        return path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step not in FAULTS:
            return
        if trainer.is_global_zero:
            if step == 5:
                (self._mine(4) / "__1_0.distcp").unlink()
                (self._mine(2) / "meta.pt").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(256)))
            if step == 11:
                shard = self._mine(10) / "__0_0.distcp"
                shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            now = time.time() + 60  # the newest of all
            os.utime(self.foreign / "meta.pt", (now, now))
            os.utime(self.foreign, (now, now))
        self.saver.last_model_path = str(self.foreign)  # listed by this run's ModelCheckpoint, on every rank
        for s in (2, 4, 6, 8, 10):
            if s < step:
                self.mine[s] = str(self._mine(s))
        trainer.strategy.barrier()


def fit_other(out_dir: Path, ckpt_dir: Path) -> list[Path]:
    torch.manual_seed(0)
    guard = NaNGuard(action="rollback", snapshot="checkpoint", snapshot_confirm_steps=1)
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1)
    trainer = sharded_trainer(out_dir / "other", [guard, saver], max_steps=10, enable_checkpointing=True)
    trainer.fit(ScheduledRegression(lr=0.05))
    return sorted(ckpt_dir.iterdir())


def fit_main(out_dir: Path, ckpt_dir: Path, foreign: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    torch.manual_seed(0)
    timed = Timed()
    timed_end = Timed(timed)
    guard = NaNGuard(action="rollback", snapshot="checkpoint", snapshot_confirm_steps=1, log_every_n_steps=1)
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)
    record, damage = Record(), Damage(ckpt_dir, foreign, saver)
    callbacks = [timed, guard, timed_end, record, damage, saver]
    trainer = sharded_trainer(out_dir / "main", callbacks, max_steps=12, enable_checkpointing=True)
    model = ScheduledRegression(faults=FAULTS)
    trainer.fit(model)
    rank = trainer.global_rank
    # a fresh copy of this rank's state, loaded from the step-8 checkpoint by DCP directly (not through the guard)
    opt = trainer.optimizers[0]
    fresh = {"state_dict": clone_state(get_model_state_dict(model)), "optimizer_0": clone_state(
        get_optimizer_state_dict(model, opt))}  # fmt: skip
    load(fresh, storage_reader=FileSystemReader(damage.mine[TARGET]))
    dcp_target = {
        "weights": {k: v.to_local().clone() for k, v in fresh["state_dict"].items()},
        "opt": {
            fqn: {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in s.items()}
            for fqn, s in fresh["optimizer_0"]["state"].items()
        },
    }
    torch.save({"states": record.states, "dcp_target": dcp_target}, out_dir / f"main_rank{rank}.pt")
    keys = ("step", "kind", "cause", "reason", "snapshot_step", "snapshot_path", "lr_scale")
    Path(out_dir, f"main_rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "events": [{k: e.get(k) for k in keys} for e in guard.events],
                "passed_over": guard.files.passed_over,
                "lr": {str(k): v for k, v in record.lr.items()},
                "sched": {str(k): v for k, v in record.sched.items()},
                "step_end_ms": {str(k): v for k, v in timed.ms.items()},
                "mine": {str(k): v for k, v in damage.mine.items()},
                "foreign": str(foreign),
                "global_step": trainer.global_step,
            }
        )
    )


def main(out: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    ckpt_dir = out_dir / "ckpt"
    started = time.perf_counter()
    other = fit_other(out_dir, ckpt_dir)
    foreign = next(p for p in other if "step=10" in p.name)
    fit_main(out_dir, ckpt_dir, foreign)
    print(f"fits took {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
