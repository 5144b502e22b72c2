"""``gradguard drill``: a :class:`~lightning_gradguard.FaultDrill` over the demo examples at healthy settings.

The examples are built as ``gradguard demo`` builds them (:mod:`lightning_gradguard.demo`), but healthy: the LSTM at
Adam lr 0.01 (the demo's lr 10 is the fault there), the CNN without its x1000 batch. Every fault that applies is
injected ``gap`` steps after the previous one (``scale_collapse`` only with a GradScaler, so never on CPU), with
``default_callbacks()`` as a user would add them; the fit runs ``recovery_steps`` past the last fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DRILL_PLANS", "DrillPlan", "DrillResult", "drill_faults", "run_drill"]

#: the fault order of a drill, one fault every ``gap`` steps: the rollback (nan_weight) first, where losing the steps
#: since the last snapshot costs least (a rollback later, as the LSTM leaves its plateau, can undo that escape)
ORDER = ("nan_weight", "nan_batch", "inf_loss", "spike", "transient", "bad_batches")


@dataclass(frozen=True)
class DrillPlan:
    """Steps of one drill: the first fault at ``start`` (past the examples' fragile first steps, as a drill a few
    hundred steps into a real run), then one every ``gap`` steps; recovery judged ``recovery_steps`` on."""

    start: int
    gap: int
    recovery_steps: int

    def max_steps(self) -> int:
        """Steps that reach the after-window of the last fault (the bad batches take two extra steps)."""
        return self.start + self.gap * (len(ORDER) - 1) + 2 + self.recovery_steps + 1


#: both start at step 150: before it the CNN is still in its chaotic first phase, where a rollback to step 50 (the
#: quick plan's NaN weight at step 100) sent it to chance for good, as a manual restore of step 50's model and SGD
#: state with no guard at all did too (seed 0); the quick plan saves steps between the faults instead
DRILL_PLANS = {
    "full": DrillPlan(start=150, gap=70, recovery_steps=50),
    "quick": DrillPlan(start=150, gap=40, recovery_steps=25),
}
#: healthy versions of the demo settings (lightning_gradguard.demo.DEMOS): what changes
HEALTHY: dict[str, dict[str, dict[str, Any]]] = {
    "lstm": {"model": {"lr": 0.01}},
    "cnn": {"data": {"fault_batch": None}},
}


def drill_faults(plan: DrillPlan, scale_collapse: bool = False) -> dict[str, Any]:
    """The ``faults`` argument of the drill: ORDER at ``start``, ``start + gap``, ... (``bad_batches``: three steps).

    Example:
        >>> drill_faults(DrillPlan(start=100, gap=40, recovery_steps=25))
        {'nan_weight': 100, 'nan_batch': 140, 'inf_loss': 180, 'spike': 220, 'transient': 260, \
'bad_batches': [300, 301, 302]}
    """
    faults: dict[str, Any] = {}
    for i, name in enumerate(ORDER):
        step = plan.start + i * plan.gap
        faults[name] = [step, step + 1, step + 2] if name == "bad_batches" else step
    if scale_collapse:
        faults["scale_collapse"] = plan.start + len(ORDER) * plan.gap
    return faults


@dataclass
class DrillResult:
    """What one ``gradguard drill`` run found: the drill's rows, its printable report, and the time taken."""

    example: str
    steps: int
    rows: list[dict[str, Any]]
    report: str
    wall_s: float
    error: str = ""
    other_events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every injected fault was handled, and the fit did not stop on an error."""
        injected = [r for r in self.rows if r["injected"]]
        return not self.error and bool(injected) and all(r["handled"] for r in injected)


def run_drill(
    example: str = "lstm",
    quick: bool = False,
    seed: int = 0,
    logdir: str | Path = "gradguard_logs",
    progress_bar: bool = False,
) -> DrillResult:
    """Train ``example`` (``"lstm"`` or ``"cnn"``) at healthy settings with ``default_callbacks()`` and a
    :class:`~lightning_gradguard.FaultDrill` injecting every applicable fault; return what it found.

    Raises:
        ValueError: an unknown example.
    """
    from lightning_gradguard.demo import DEMOS, EXAMPLE_ALIASES, _build, guarded_callbacks, quiet_lightning

    if example not in EXAMPLE_ALIASES:
        raise ValueError(f"example must be one of {sorted(EXAMPLE_ALIASES)}, got {example!r}")
    example = EXAMPLE_ALIASES[example]
    base = DEMOS[example]
    changes = HEALTHY[example]
    settings = dataclasses.replace(  # default_callbacks() as they are: no demo-specific clipping or guard options
        base,
        model={**base.model, **changes.get("model", {})},
        data={**base.data, **changes.get("data", {})},
        clipping={},
        guard={},
    )
    plan = DRILL_PLANS["quick" if quick else "full"]

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradguard.drill import FaultDrill

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's choice: the same arithmetic order on any core count
    with quiet_lightning(), contextlib.ExitStack() as restore:
        restore.callback(torch.set_num_threads, threads)
        pl.seed_everything(seed, workers=False, verbose=False)
        model, data = _build(example, settings, seed)
        drill = FaultDrill(drill_faults(plan), recovery_steps=plan.recovery_steps, print_report=False)
        callbacks = [*guarded_callbacks(settings, progress_bar=progress_bar), drill]
        root = Path(logdir)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=plan.max_steps(),
            max_epochs=-1,
            logger=TensorBoardLogger(str(root), name=f"{example}_drill"),
            callbacks=callbacks,
            log_every_n_steps=settings.log_every_n_steps,
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=str(root),
        )
        t0 = time.perf_counter()
        error = ""
        try:
            trainer.fit(model, datamodule=data)
        except Exception as e:  # noqa: BLE001 - a halted drill is a finding, reported in the table
            error = f"{type(e).__name__}: {e}"
        wall = time.perf_counter() - t0
    return DrillResult(
        example=example,
        steps=int(trainer.global_step),
        rows=drill.table(),
        report=drill.report(),
        wall_s=wall,
        error=error,
        other_events=drill.other_events(),
    )
