"""``overhead.py --sections e2e``: end-to-end step time with and without gradguard at default settings.

Models (:data:`E2E_MODELS`): gradguard's two examples (``lstm``, ``deep_cnn``: ``scenarios.EXAMPLES``) and
``many_small``, a deep narrow residual MLP of 1000 small parameter tensors whose step is dominated by per-tensor
overhead (``scenarios.TIMING_ONLY``). Each is fitted for real (``scenarios.fit``) at its stable learning rate, in
three arms: no callbacks, Lightning's own ``gradient_clip_val=1.0`` and ``lightning_gradguard.default_callbacks()``.
The arms are interleaved (the order rotates every round); a timing callback records per-step wall time; the figures
are medians over rounds of the per-round ratios of median step times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import common
import lightning.pytorch as pl
import scenarios
from overhead_common import quiet_lightning

#: the e2e models, in report order
E2E_MODELS = (*scenarios.EXAMPLES, *scenarios.TIMING_ONLY)
# Lightning's default logging interval, so the monitor logs as often as it would for a user who sets nothing
E2E_TRAINER = {"log_every_n_steps": 50}


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_start`` calls (one optimizer step each, no accumulation)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.stamps.append(time.perf_counter())

    def step_times(self, skip: int) -> list[float]:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return d[skip:]


def default_guard_callbacks() -> list[pl.Callback]:
    """``lightning_gradguard.default_callbacks()``: monitor, z-score clipping and a rollback NaNGuard at defaults."""
    from lightning_gradguard import default_callbacks

    return default_callbacks()


def measure_e2e(
    args: argparse.Namespace,
    pairs: int | None = None,
    steps: int | None = None,
    models: Sequence[str] = E2E_MODELS,
    guarded: Callable[[], list[pl.Callback]] = default_guard_callbacks,
) -> dict[str, Any]:
    """Interleaved fits of each model in three arms; ``pairs`` (rounds) and ``steps`` default by mode.

    ``guarded`` builds the callbacks of the gradguard arm (``e2e_breakdown.py`` passes each callback alone).
    """
    pairs = pairs or (2 if args.tiny else (3 if args.quick else 8))
    steps = steps or (12 if args.tiny else (40 if args.quick else 150))
    skip = 3 if args.tiny else 10
    out: dict[str, Any] = {"pairs": pairs, "steps_per_fit": steps, "timed_from_step": skip, "examples": {}}
    out["notes"] = {name: scenarios.TIMING_ONLY[name].describe for name in models if name in scenarios.TIMING_ONLY}
    for name in models:
        try:
            scenarios.check_available(name)
            guarded()
        except Exception as e:  # noqa: BLE001
            out["examples"][name] = {"skipped": f"{type(e).__name__}: {e}"}
            continue
        # three arms, rotated each round: no callbacks, Lightning's own fixed clip (the baseline issue 13 compares
        # against: what a user pays today for clipping) and gradguard's default_callbacks()
        arms = ["unguarded", "lightning_clip", "guarded"]
        per_arm: dict[str, list[float]] = {arm: [] for arm in arms}
        ratios: list[float] = []
        vs_clip: list[float] = []
        for i in range(pairs):
            order = arms[i % 3 :] + arms[: i % 3]
            this: dict[str, float] = {}
            for arm in order:
                timer = StepTimer()
                cbs: list[pl.Callback] = [timer] + (guarded() if arm == "guarded" else [])
                kwargs = dict(E2E_TRAINER, gradient_clip_val=1.0) if arm == "lightning_clip" else E2E_TRAINER
                with tempfile.TemporaryDirectory() as root, quiet_lightning():
                    scenarios.fit(name, root, cbs, steps=steps, seed=i, tiny=args.tiny, trainer_kwargs=kwargs)
                this[arm] = statistics.median(timer.step_times(skip))
                per_arm[arm].append(this[arm])
            ratios.append(this["guarded"] / this["unguarded"])
            vs_clip.append(this["guarded"] / this["lightning_clip"])
        out["examples"][name] = {
            "unguarded_step_s": statistics.median(per_arm["unguarded"]),
            "lightning_clip_step_s": statistics.median(per_arm["lightning_clip"]),
            "guarded_step_s": statistics.median(per_arm["guarded"]),
            "overhead": statistics.median(ratios) - 1,
            "overhead_iqr": (common.quantile(ratios, 0.25) - 1, common.quantile(ratios, 0.75) - 1),
            "ratios": ratios,
            "vs_lightning_clip": statistics.median(vs_clip),
            "vs_lightning_clip_iqr": (common.quantile(vs_clip, 0.25), common.quantile(vs_clip, 0.75)),
        }
        e = out["examples"][name]
        print(
            f"  e2e {name}: overhead {e['overhead'] * 100:+.1f}%, {e['vs_lightning_clip']:.3f}x Lightning's clip",
            flush=True,
        )
    return out
