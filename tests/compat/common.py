"""Shared pieces of the compatibility and fault-injection suite: the three callbacks together, models with fault
injection, state recorders and bitwise comparisons.

Importable from subprocess scripts too (no pytest import here).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard
from lightning_gradguard.core.recover._snapshot import clone_state
from tests.models import TinyRegression, loader

SIZE_GUIDANCE = {"histograms": 0, "scalars": 0, "images": 0, "tensors": 0}


def build_all(monitor: dict | None = None, clip: dict | None = None, guard: dict | None = None) -> list[Callback]:
    """[GradientNormMonitor, AdaptiveGradientClipping, NaNGuard] in the order users are told to use."""
    mon = GradientNormMonitor(**{"log_every_n_steps": 1, "flow_every_n_logs": 0, **(monitor or {})})
    clip_kw = {"method": "zscore", "log_every_n_steps": 1, **(clip or {})}
    if clip_kw["method"] in ("zscore", "percentile"):  # the clipper refuses options its method does not use
        clip_kw.setdefault("warmup_steps", 3)
    # action="rollback" explicitly: these fault tests check rollbacks ("auto", the default, skips isolated faults)
    guard_kw = {"action": "rollback", "snapshot_every_n_steps": 2, "snapshot_confirm_steps": 0, "log_every_n_steps": 1}
    guard_kw.update(guard or {})
    return [mon, AdaptiveGradientClipping(**clip_kw), NaNGuard(**guard_kw)]


def split(callbacks: list[Callback]) -> tuple[GradientNormMonitor, AdaptiveGradientClipping, NaNGuard]:
    """(monitor, clipper, guard) out of a build_all list."""
    mon = next(c for c in callbacks if isinstance(c, GradientNormMonitor))
    clip = next(c for c in callbacks if isinstance(c, AdaptiveGradientClipping))
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    return mon, clip, guard


def seeded(cls: type = TinyRegression, **kw: Any) -> pl.LightningModule:
    """A model whose initial weights do not depend on what ran before."""
    torch.manual_seed(0)
    return cls(**kw)


class FullBatch(TinyRegression):
    """One batch per epoch: the data of a step does not depend on how Lightning restores its epoch loop."""

    def train_dataloader(self):
        return loader(n=16, batch_size=16)


class InputFaults(TinyRegression):
    """NaN/inf written into the *input* batch (not the loss) at chosen global steps, optionally one micro-batch only.

    Args:
        bad_inputs: {global_step: "nan" | "inf"}.
        bad_batch_idx: when set, only the micro-batch with this batch_idx is corrupted (gradient accumulation).
    """

    def __init__(self, bad_inputs: dict[int, str] | None = None, bad_batch_idx: set[int] | None = None, **kw: Any):
        super().__init__(**kw)
        self.bad_inputs = dict(bad_inputs or {})
        self.bad_batch_idx = bad_batch_idx

    def training_step(self, batch, batch_idx):
        x, y = batch
        kind = self.bad_inputs.get(self.global_step)
        if kind is not None and (self.bad_batch_idx is None or batch_idx in self.bad_batch_idx):
            x[0, 0] = float(kind)  # in place: the batch itself arrives bad (what the guard checks and records)
        return super().training_step((x, y), batch_idx)


def full_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """CPU copies of model, raw optimizer and scheduler state (what a rollback must restore)."""
    return {
        "model": clone_state(pl_module.state_dict()),
        "optimizers": [clone_state(o.state_dict()) for o in trainer.optimizers],
        "schedulers": [clone_state(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
    }


class StateRecorder(Callback):
    """Placed after NaNGuard: the full state at every ``on_train_batch_end``, keyed by ``trainer.global_step``.

    The entry at key ``s`` is the state after ``s`` optimizer steps, exactly what NaNGuard snapshots at that hook.
    """

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_start(self, trainer, pl_module):
        self.states.setdefault(trainer.global_step, full_state(trainer, pl_module))  # what NaNGuard snapshots first

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = full_state(trainer, pl_module)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two nested states differ (tensors compared bitwise, NaN == NaN); empty when identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
            and torch.equal(torch.isnan(a), torch.isnan(b))
        )
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: len {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def without_lr(state: dict[str, Any]) -> dict[str, Any]:
    """``full_state`` minus the LR values a rollback scales on purpose (param-group LRs, scheduler base/last LRs)."""
    out = dict(state)
    out["optimizers"] = []
    for opt in state["optimizers"]:
        groups = [{k: v for k, v in g.items() if k not in _LR_KEYS} for g in opt["param_groups"]]
        out["optimizers"].append({"state": opt["state"], "param_groups": groups})
    out["schedulers"] = [
        {k: v for k, v in s.items() if k not in ("base_lrs", "_last_lr", "eta_min", "min_lrs", "max_lrs")}
        for s in state["schedulers"]
    ]
    return out


def group_lrs(state: dict[str, Any]) -> list[float]:
    return [g["lr"] for opt in state["optimizers"] for g in opt["param_groups"]]


def assert_restored(after: dict[str, Any], snap: dict[str, Any], lr_ratio: float) -> None:
    """The state right after a rollback equals the snapshot bitwise, except the LRs, which are ``lr_ratio`` times it."""
    diff = differences(without_lr(after), without_lr(snap))
    assert not diff, diff[:10]
    for got, want in zip(group_lrs(after), group_lrs(snap)):
        assert math.isclose(got, want * lr_ratio, rel_tol=1e-12), (got, want, lr_ratio)


def reference_grad_norm(pl_module: nn.Module, batch: Any) -> float:
    """Global L2 norm of the fp32 gradient of the MSE loss on ``batch`` at the current weights, computed without
    autocast, without a GradScaler and without touching ``.grad`` (an independent reference)."""
    x, y = batch
    params = [p for p in pl_module.parameters() if p.requires_grad]
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        loss = nn.functional.mse_loss(pl_module(x.float()), y.float())
        grads = torch.autograd.grad(loss, params)
    return float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))


def tb_scalars(logdir: Any) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(logdir), size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
