"""2-process CPU FSDP2 fits that count the collectives the gradguard callbacks call per step (gloo).

Fits, all in the same two processes (``ModelParallelStrategy`` + ``fully_shard``, the model of ``fsdp_models.py``):

- ``default``: ``default_callbacks()`` as a user writes it (Trainer logging every 50 steps), 12 steps.
- ``logging``: ``default_callbacks(log_every_n_steps=2)`` without the gradient-flow image, 6 steps: logging
  steps (the monitor reads the weight norms) too.
- ``faults``, ``accumulate``, ``manual``: every callback at work (the loss-spike test on, logging every 3 steps, the
  gradient-flow image every 2nd log, snapshots every 4 steps) on faults (a NaN loss on rank 1 only at step 3, a x1e4
  loss on both ranks at step 12), on gradient accumulation (2 batches per step), and on manual optimization of two
  sharded nets with two optimizers (GAN-style). Each runs twice: as shipped (``_fused``: the guard's values travel
  with the measurement) and with the measurement's gather turned off (``_separate``: the measurement's all-reduce
  and then the guard's own), so that the test can check the two give the same numbers, decisions, events and
  logged tags.

Every fit records the collectives of ``on_before_optimizer_step`` and ``on_train_batch_end`` per step
(``tests/compat/collectives.py``) and what the callbacks measured and decided. Run by
``tests/compat/test_fsdp_collectives.py`` through ``tests/ddp_runner.py``; writes ``<fit>_rank<r>.json``.
"""

import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_gradguard.core.measure._grad_stats as grad_stats_module  # noqa: E402
from lightning_gradguard import (  # noqa: E402
    AdaptiveGradientClipping,
    GradientNormMonitor,
    NaNGuard,
    default_callbacks,
)
from lightning_gradguard.callbacks._step_context import grad_stats_for, optimizer_index  # noqa: E402
from tests.compat.collectives import around, count_collectives  # noqa: E402
from tests.compat.fsdp_models import ShardedRegression, rank_batches, sharded_trainer  # noqa: E402
from tests.ddp_runner import end_distributed  # noqa: E402

COUNTS = count_collectives()
GATHER_MAX_VALUES = grad_stats_module.GATHER_MAX_VALUES


def _plain(value: Any) -> Any:
    """JSON-able, tensors as lists of floats (NaN/inf kept by json's own spelling)."""
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.detach().double().flatten().tolist()]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, int | float | str | bool):
        return value.value  # enums
    return value


class SpikeOnBothRanks(ShardedRegression):
    """A NaN loss on rank 1 at step 3 and a x1e4 loss on both ranks at step 12 (a spike on one rank only makes the
    other ranks replay their batch for a diagnosis the spiking rank does not run: a hang under FSDP, in the guard's
    fault path, which this file does not test)."""

    def __init__(self) -> None:
        super().__init__(faults={3: (1, "nan")})

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.global_step == 12 else loss


class ShardedGAN(ShardedRegression):
    """Two sharded nets (``gen``, ``disc``), two Adam optimizers, manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.disc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.automatic_optimization = False

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for net in (self.net, self.disc):
            for layer in net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_g, opt_d = self.optimizers()
        loss_g = nn.functional.mse_loss(self.net(x), y)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        loss_d = nn.functional.mse_loss(self.disc(x), y) * 10.0
        if batch_idx == 4 and self.global_rank == 1:
            loss_d = loss_d * float("nan")
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.net.parameters(), lr=0.01), torch.optim.Adam(self.disc.parameters(), lr=0.02)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(rank_batches(self.data_rank), batch_size=8, shuffle=False)


class Record(Callback):
    """Last in the list: what every callback measured and decided at each optimizer step, on this rank."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.mon = next(c for c in callbacks if isinstance(c, GradientNormMonitor))
        self.clip = next(c for c in callbacks if isinstance(c, AdaptiveGradientClipping))
        self.guard = next(c for c in callbacks if isinstance(c, NaNGuard))
        self.rows: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        stats = grad_stats_for(trainer, pl_module, optimizer)  # the cached measurement every callback used
        idx = optimizer_index(trainer, optimizer)
        judge = self.guard.engine.judge_
        spike = judge.spike.state_dict() if judge.spike is not None else None
        self.rows.append(
            {
                "step": trainer.global_step,
                "optimizer": idx,
                "carried": stats.carried is not None,
                "grad_norm": float(stats.total_norm64),
                "param_norms": _plain(stats.param_norms64),
                "weight_norms_measured": "weight_norms64" in stats.__dict__,
                "clip": _plain({k: getattr(self.clip.last[idx], k, None) for k in ("threshold", "clipped")}),
                "grad_history": _plain(list(judge.grad_history)[-1:]),
                "loss_history": _plain(list(judge.loss_history)[-1:]),
                "spike": _plain(spike),
                "last": _plain({k: v.last for k, v in judge.streams.items()}),
                "monitor": [self.mon.last_grad_norm, self.mon.last_step],
            }
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        g = self.guard
        self.rows.append(
            {
                "end": trainer.global_step,
                "reason": g.reason.value,
                "counters": [g.skipped_steps, g.rollbacks, g.lr_scale],
            }
        )


def _callbacks(name: str) -> list[Callback]:
    if name == "default":
        return default_callbacks()
    if name == "logging":
        return default_callbacks(log_every_n_steps=2, monitor_kwargs={"flow_every_n_logs": 0})
    return default_callbacks(
        log_every_n_steps=3,
        monitor_kwargs={"flow_every_n_logs": 2},
        clipping_kwargs={"warmup_steps": 3},
        guard_kwargs={"spike_zscore": 4.0, "spike_window": 8, "snapshot_every_n_steps": 4, "snapshot_confirm_steps": 1},
    )


def fit(out_dir: str, name: str) -> None:
    base, _, mode = name.partition("_")
    grad_stats_module.GATHER_MAX_VALUES = 0 if mode == "separate" else GATHER_MAX_VALUES
    COUNTS.calls.clear()
    torch.manual_seed(0)
    callbacks = _callbacks(base)
    record = Record(callbacks)
    steps = {"default": 12, "logging": 6, "faults": 16, "accumulate": 8, "manual": 16}[base]
    model = {
        "faults": SpikeOnBothRanks,
        "manual": ShardedGAN,
    }.get(base, ShardedRegression)()
    kwargs: dict[str, Any] = {"log_every_n_steps": 50} if base == "default" else {}
    if base == "accumulate":
        kwargs["accumulate_grad_batches"] = 2
    logger = TensorBoardLogger(out_dir, name=f"tb_{name}", version=0) if mode else False
    trainer = sharded_trainer(out_dir, around(COUNTS, [*callbacks, record]), max_steps=steps, logger=logger, **kwargs)
    trainer.fit(model)
    guard, clip, mon = record.guard, record.clip, record.mon
    Path(out_dir, f"{name}_rank{trainer.global_rank}.json").write_text(
        json.dumps(
            {
                "rank": trainer.global_rank,
                "global_step": trainer.global_step,
                "hook": COUNTS.table("on_before_optimizer_step"),
                "batch_end": COUNTS.table("on_train_batch_end"),
                "rows": record.rows,
                "events": _plain(guard.events),
                "guard": _plain({k: v for k, v in guard.state_dict().items() if k not in ("run_id", "snapshots")}),
                "clip": _plain(clip.state_dict()),
                "monitor": _plain(mon.state_dict()),
                "weights": _plain({n: p.to_local() for n, p in model.named_parameters()}),
            }
        )
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    pairs = [f"{b}_{m}" for b in ("faults", "accumulate", "manual") for m in ("fused", "separate")]
    names = ["default", "logging", *pairs]
    for fit_name in sys.argv[2].split(",") if len(sys.argv) > 2 else names:
        fit(sys.argv[1], fit_name)
    end_distributed(sys.argv[1])  # the last thing: gloo's teardown race (tests/ddp_runner.py)
