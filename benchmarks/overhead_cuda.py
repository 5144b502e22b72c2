"""``overhead.py --sections cuda``: host-device synchronisations per step (only when CUDA is available).

Counted with ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising call torch makes raises a warning that is
counted. Target: zero syncs on steps that neither log nor detect a fault.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import grad_norm
from overhead_common import (
    CLIP_METHODS,
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

from lightning_gradguard.core.measure._grad_stats import compute_grad_stats


def count_syncs(fn: Callable[[], object]) -> int:
    """How many synchronising CUDA calls ``fn`` makes (``torch.cuda.set_sync_debug_mode("warn")`` warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _sync_counts(counts: list[int]) -> dict[str, Any]:
    return {"syncs_per_step_median": statistics.median(counts), "syncs_per_step_max": max(counts)}


def measure_cuda_syncs(args: argparse.Namespace) -> dict[str, Any]:
    """Count synchronising CUDA calls per step with ``torch.cuda.set_sync_debug_mode("warn")``.

    Each candidate runs its per-step hooks on a CUDA model (the 48x256 MLP) at steps that neither log nor see a fault
    (log interval set far away, or the defaults between logging steps) and, for the monitor, at a logging step. Every
    synchronising call torch makes raises a UserWarning, which is counted. Target: zero syncs on steps that neither
    log nor detect a fault. Not runnable without CUDA.
    """
    if not torch.cuda.is_available():
        return {"skipped": "CUDA not available on this machine; not run"}
    results: dict[str, Any] = {}
    cands = [(f"clip {m}", clip_factory(m)) for m in CLIP_METHODS] + [
        ("monitor, non-logging step", monitor_factory(10**9)),
        ("monitor, logging step", monitor_factory(1)),
        ("NaNGuard skip", guard_factory(action="skip")),
        ("NaNGuard rollback (defaults)", guard_factory(action="rollback")),
    ]
    steps = 20

    def measure(trainer, module, optimizer, batch, params, restore, next_step):  # noqa: ANN001
        names = param_names(module, params)
        baselines = {
            TORCH_CLIP: lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
            "core compute_grad_stats + layer norms": lambda: compute_grad_stats(params, names).layer_norms,
            "lightning grad_norm": lambda: grad_norm(module, 2),
        }
        for label, fn in baselines.items():
            counts = []
            for _ in range(5):
                next_step()
                counts.append(count_syncs(fn))
            results[label] = _sync_counts(counts)
        for label, make in cands:
            with quiet_lightning():
                # past warm-up phases (a logging step may fall in the pre-roll, not below)
                driver, err = start_driver(make, trainer, module, optimizer, batch, next_step, preroll=60)
                if driver is None:
                    results[label] = {"skipped": err}
                    continue
                counts = []
                for _ in range(steps):
                    next_step()
                    counts.append(count_syncs(driver.step))
            results[label] = _sync_counts(counts)
        return results

    run_in_fit(lambda: mlp(48, 256), 256, measure, accelerator="cuda")
    return {"device": torch.cuda.get_device_name(0), "callbacks": results}
