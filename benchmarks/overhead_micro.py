"""``overhead.py --sections micro``: the per-step cost of each gradguard callback against torch's and Lightning's tools.

On three models (a 48-layer MLP of width 256; a model with 1000 small parameter tensors; one ``Linear(4096, 4096)``),
inside a real ``Trainer.fit``, at one optimizer step whose gradients are saved and restored before every timed call,
the per-step cost of

- the baselines: ``torch.nn.utils.clip_grad_norm_(..., foreach=True)`` and Lightning's
  ``lightning.pytorch.utilities.grad_norm``;
- the shared statistics core alone (``compute_grad_stats``, and with per-layer norms and update ratios);
- each ``AdaptiveGradientClipping`` method, a ``GradientNormMonitor`` logging step (and a non-logging one) and
  ``NaNGuard`` (its checks, and a memory snapshot), each driven through the callback's own per-step hooks, so the
  path timed is exactly the path a fit runs (statistics, threshold, clip, logging glue).

Every timed call is a new optimizer step for the callbacks: the harness advances the Trainer's optimizer-step
counter (untimed) between calls, so per-step caches miss and log/snapshot schedules advance as in a real run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import common
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm
from overhead_common import (
    CLIP_METHODS,
    SNAPSHOT,
    TORCH_CLIP,
    clip_factory,
    guard_factory,
    mlp,
    monitor_factory,
    param_names,
    quiet_lightning,
    run_in_fit,
    start_driver,
)
from torch import nn

from lightning_gradguard.core.measure._grad_stats import compute_grad_stats


class ManySmall(nn.Module):
    """``n`` parallel ``Linear(width, width)`` blocks summed: 2n small parameter tensors, n layers."""

    def __init__(self, n: int = 500, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.blocks]).sum(0)


def model_specs(tiny: bool) -> dict[str, tuple[Callable[[], nn.Module], int]]:
    """name -> (factory, input width)."""
    if tiny:
        return {
            "MLP 4x32": (lambda: mlp(4, 32), 32),
            "40 small tensors": (lambda: ManySmall(20, 4), 4),
            "Linear(256,256)": (lambda: nn.Linear(256, 256), 256),
        }
    return {
        "MLP 48x256": (lambda: mlp(48, 256), 256),
        "1000 small tensors": (lambda: ManySmall(500, 8), 8),
        "Linear(4096,4096)": (lambda: nn.Linear(4096, 4096), 4096),
    }


def micro_candidates(quick: bool) -> list[tuple[str, Callable[[], pl.Callback]]]:
    cands: list[tuple[str, Callable[[], pl.Callback]]] = [(f"clip {m}", clip_factory(m)) for m in CLIP_METHODS]
    cands += [
        ("monitor, logging step", monitor_factory(1)),
        ("monitor, non-logging step", monitor_factory(10**9)),
        ("NaNGuard skip (checks)", guard_factory(action="skip")),
        ("NaNGuard rollback, defaults", guard_factory(action="rollback", snapshot="memory")),
        (
            "NaNGuard rollback, snapshot every step",
            guard_factory(action="rollback", snapshot="memory", snapshot_every_n_steps=1),
        ),
    ]
    return cands


def measure_micro(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (5 if args.quick else 15)
    inner = 3 if args.quick else 5
    preroll = 20 if args.quick else 60
    out: dict[str, Any] = {"rounds": rounds, "inner": inner, "preroll": preroll, "models": {}}
    wanted = [w for w in getattr(args, "models", "").split(",") if w]
    specs = {k: v for k, v in model_specs(args.tiny).items() if not wanted or any(w in k for w in wanted)}
    for model_name, (factory, in_dim) in specs.items():

        def measure(trainer, module, optimizer, batch, params, restore, next_step):  # noqa: ANN001
            names = param_names(module, params)
            cands: dict[str, Callable[[], object]] = {
                TORCH_CLIP: lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
                "lightning grad_norm": lambda: grad_norm(module, 2),
                "lightning grad_norm + log_dict": lambda: module.log_dict(grad_norm(module, 2)),
                "core compute_grad_stats": lambda: compute_grad_stats(params, names).total_norm,
                "core stats + layer norms + update ratios": lambda: (
                    compute_grad_stats(params, names).layer_update_ratio
                ),
            }
            skipped: dict[str, str] = {}
            snapshot_bytes = 0
            try:
                from lightning_gradguard.core.recover._snapshot import take_snapshot

                snap = take_snapshot(module, trainer.optimizers, [], step=0)
                snapshot_bytes = snap.nbytes() if callable(snap.nbytes) else int(snap.nbytes)
                cands[SNAPSHOT] = lambda: take_snapshot(module, trainer.optimizers, [], step=0)
                del snap
            except Exception as e:  # noqa: BLE001
                skipped[SNAPSHOT] = f"{type(e).__name__}: {e}"
            for label, make in micro_candidates(args.quick):
                with quiet_lightning():
                    driver, err = start_driver(make, trainer, module, optimizer, batch, next_step, preroll)
                if driver is None:
                    skipped[label] = err
                    continue
                cands[label] = driver.step
            with quiet_lightning():
                timings = common.interleaved(
                    cands, baseline=TORCH_CLIP, rounds=rounds, inner=inner, before_each=next_step, warmup=2
                )
            return {
                "params": sum(p.numel() for p in params),
                "tensors": len(params),
                "timings": {
                    k: {"median_s": v.median, "ratio": v.ratio, "ratio_iqr": v.ratio_iqr} for k, v in timings.items()
                },
                "skipped": skipped,
                "snapshot_bytes": snapshot_bytes,
            }

        t0 = time.perf_counter()
        res = run_in_fit(factory, in_dim, measure)
        res["wall_s"] = time.perf_counter() - t0
        out["models"][model_name] = res
        print(
            f"  micro {model_name}: {res['tensors']} tensors, {res['params']:,} params, {res['wall_s']:.1f} s",
            flush=True,
        )
    return out
