"""The monitor's state per optimizer and its layer-health report: what ``GradientNormMonitor`` keeps between steps
and how a change in the vanishing/exploding sets becomes a warning, an event and a TensorBoard text line."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradguard.callbacks._log_writer import log_text
from lightning_gradguard.callbacks._monitor_capture import LogCapture
from lightning_gradguard.core.measure._interval_stats import IntervalAggregate
from lightning_gradguard.core.measure._layer_health import ExplodingDetector, LayerHealthChanges, VanishingDetector

#: the TensorBoard text tag of layer-health changes
EVENTS_TAG = "gradguard/layer_health_events"
#: layer-health events kept in ``GradientNormMonitor.events`` (the oldest are dropped)
MAX_EVENTS = 1000


class MonitorState:
    """Layer-health detectors, the norm aggregate since the last write, and the pending log of one optimizer."""

    def __init__(self, vanishing: VanishingDetector, exploding: ExplodingDetector) -> None:
        self.logs = 0  # logging steps done (drives the gradient-flow schedule)
        self.vanishing, self.exploding = vanishing, exploding
        self.norms = IntervalAggregate()  # pre-clip global norms since the last write of grad_norm_max/mean
        self.seen_step = -1  # the global step whose measurement was taken in (one per step)
        self.pending: LogCapture | None = None  # what a logging step captured before any clipping
        self.record: Any = None  # the shared StepRecord of the latest step (tells whether the guard dropped it)

    def state_dict(self) -> dict[str, Any]:
        return {
            "logs": self.logs,
            "vanishing": self.vanishing.state_dict(),
            "exploding": self.exploding.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.logs = int(state.get("logs", 0))
        self.vanishing.load_state_dict(state.get("vanishing") or {})
        self.exploding.load_state_dict(state.get("exploding") or {})


def report_layer_health(
    trainer: pl.Trainer,
    health: LayerHealthChanges,
    events: list[dict[str, Any]],
    idx: int,
    step: int,
    order: list[str],
    vanishing: set[str],
    exploding: set[str],
    why: dict[str, str],
) -> None:
    """Fold one logging step's flagged layers into ``health``; for each change: a warning the first time a layer is
    flagged (``why[kind]`` says what the rule saw), an entry in ``events`` and one TensorBoard text line."""
    changes, first = health.update(idx, order, vanishing, exploding)
    if not any(changes.values()):
        return
    where = f" (optimizer {idx})" if idx else ""
    for kind, name in first:
        rank_zero_warn(f"GradientNormMonitor: layer {name!r}{where} is {kind} at step {step}: {why[kind]}.")
    for kind, layers in changes.items():
        events.extend({"step": step, "optimizer": idx, "kind": kind, "layer": n} for n in layers)
    del events[:-MAX_EVENTS]
    parts = [f"{kind}: {', '.join(layers)}" for kind, layers in changes.items() if layers]
    log_text(trainer, EVENTS_TAG, f"step {step}{where}: " + "; ".join(parts), step)
