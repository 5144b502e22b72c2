"""The host interface: everything the guard engine needs from the training loop it protects.

The engine (:class:`~lightning_gradguard.core.engine.GuardEngine`) never touches a Trainer, a Fabric or a user's
loop. Each adapter implements this small interface over its own objects: the Lightning callback over the Trainer
(``callbacks/_trainer_host.py``), the plain-loop guard over the model, optimizers, schedulers and GradScaler it was
given (``plain/_loop_host.py``), the Fabric adapter over the same with Fabric's collectives. The engine is handed
the host at the start of a fit and drops it at the end; the host holds no reference to the engine or to the adapter.

Methods with a body here are optional: their defaults are what a host without that capability does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_gradguard.core.guard._step_judge import RankReducer
from lightning_gradguard.core.recover._fault_trace import FaultTrace
from lightning_gradguard.core.recover._replica_shards import ReplicaSharding
from lightning_gradguard.core.recover._rerun import RerunResult, RngState
from lightning_gradguard.core.recover._snapshot import Snapshot


class GuardHost:
    """What a training loop offers the guard engine (subclass and fill in the first group)."""

    # ------------------------------------------------------------------ required: the state the guard protects
    def model(self) -> nn.Module:
        """The module whose ``state_dict`` a snapshot holds (a DDP/Fabric wrapper is fine)."""
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The raw torch optimizers (state operations must use these, never a wrapper)."""
        raise NotImplementedError

    def schedulers(self) -> list[Any]:
        """The LR schedulers, restored and rescaled with the optimizers."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional: precision, ranks, output
    def named_module(self) -> nn.Module:
        """The module whose parameter names events report (no wrapper prefix)."""
        return self.model()

    def scaler(self) -> Any:
        """The enabled ``GradScaler`` of the loop, or None."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """State outside model/optimizers/schedulers that a snapshot must hold (e.g. a GradScaler's)."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Put back what :meth:`extra_state` returned."""

    def clipping_in_probation(self) -> bool:
        """Whether an adaptive clipper's learned statistics took over from its warm-up cap only recently (a
        divergence then is the statistics' doing: the guard pins the cap instead of cutting the LR)."""
        return False

    def pin_clipping(self) -> bool:
        """Hold the loop's adaptive clipping thresholds at their warm-up caps for the rest of the run; returns whether
        any was pinned now (False: no adaptive clipper with a cap, or already pinned)."""
        return False

    def rebase_clipping(self, optimizer: int, norms: list[float]) -> bool:
        """Restart the adaptive clipping statistics of optimizer ``optimizer`` (its index) from ``norms``, the run's
        gradient norms at a new level (:meth:`~lightning_gradguard.core.clip.Clipper.rebase`); returns whether any
        clipper changed."""
        return False

    def reducer(self) -> RankReducer | None:
        """The element-wise cross-rank maximum (None: a single process)."""
        return None

    def device(self) -> torch.device | None:
        """Where cross-rank flags are reduced (None: the CPU)."""
        return None

    def local_processes(self) -> int:
        """How many training processes share this machine's memory (the snapshot budget is split among them)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)

    def replica_sharding(self) -> ReplicaSharding | None:
        """This rank's place among ranks that hold the *same* state (data parallelism: DDP), so that each keeps only
        its part of a snapshot; None where the state is not replicated (one process, or sharded already: FSDP2)."""
        return None

    def rank(self) -> int:
        """This process's rank among those the reducer reduces over (0 with one process)."""
        return 0

    def is_global_zero(self) -> bool:
        return True

    def warn(self, message: str, local: bool) -> None:
        """A warning; ``local``: about this rank only (else every rank has the same one: say it once)."""
        warnings.warn(message, UserWarning, stacklevel=4)

    def announce(self, line: str) -> None:
        """Tell the person watching the run about an event."""

    def emit_scalars(self, values: dict[str, float], step: int) -> None:
        """Write scalars (``gradguard/...`` tags) at ``step``."""

    def emit_text(self, tag: str, text: str, step: int) -> None:
        """Write a text line at ``step``."""

    def repeat_scalars(self, step: int, fresh: Mapping[str, float], before: int | None = None) -> None:
        """At an event, a halt or the end: write at ``step`` every level scalar (not an interval's) last written
        before step ``before`` (None: ``step``), each with its ``_log10`` twin, so that no chart ends before the run
        did. ``fresh``: values the engine knows for this step (the LR, the step's norm), written instead of the held
        ones, for tags already written."""

    def emit_overview(
        self, step: int, reason: str, events: Sequence[Mapping[str, Any]], losses: Sequence[Sequence[float]]
    ) -> None:
        """At an event, a halt or the end: draw the run's overview figure at ``step`` (``reason``: why now, e.g.
        ``"halt"``; ``events``: the engine's events; ``losses``: recent ``[step, loss]`` rows)."""

    def state_changed(self) -> None:
        """A rollback or LR cut replaced the state: drop anything cached about the discarded one."""

    def report_dir(self) -> Path | None:
        """Where a halt report goes (None: none is written)."""
        return None

    def epoch(self) -> int | None:
        """The current epoch of the loop's data (None: the loop gives no batches; no bad-batch record then)."""
        return None

    def report_extra(self) -> dict[str, Any]:
        """Loop facts for the halt report (epoch, precision, world size)."""
        return {}

    def stop_training(self) -> None:
        """A halt: end the loop after this step (the engine raises afterwards when asked to)."""

    # ------------------------------------------------------------------ optional: the batch and checkpoint files
    def replay(self, item: tuple[Any, int], step: int | None = None) -> FaultTrace | None:
        """Run the flagged batch once more with hooks on every module and say which one produced the fault
        (:func:`~lightning_gradguard.core.recover._fault_trace.trace_fault`; None: cannot replay)."""
        return None

    def rerun(
        self,
        items: list[tuple[Any, int]],
        rngs: list[RngState | None],
        weights: dict[str, Any] | None,
        step: int | None = None,
    ) -> RerunResult | None:
        """Recompute the flagged step's loss and gradient norm from the current state (``weights`` None) or from
        ``weights`` (a snapshot's model state), each micro-batch of ``items`` after restoring its random-number
        state from ``rngs``, without touching ``.grad``, with the loop's step counter at ``step`` where it has one
        (:func:`~lightning_gradguard.core.recover._rerun.rerun_step`); None where this loop cannot (then there is
        no rerun diagnosis)."""
        return None

    def rerun_takes_items(self) -> bool:
        """Whether :meth:`rerun` recomputes the micro-batches it is given (then the engine may rerun the current state
        on an earlier step's batch); False: it recomputes the current step whatever the items (a loop's ``recompute``
        closure)."""
        return False

    def rerun_is_collective(self) -> bool:
        """Whether :meth:`rerun` is a collective that every rank must join (sharded parameters: the forward
        all-gathers them); the engine then reruns on every rank together and agrees on each branch first. False:
        each rank reruns on its own (a replica's bare module: DDP, one process)."""
        return False

    def save_batches(self, batches: list[tuple[Any, int]], step: int) -> str | None:
        """Save the flagged step's batches; returns the path (None: not saved)."""
        return None

    def checkpoint_snapshot(self, survived: Callable[[int], bool]) -> tuple[Snapshot | None, list[str]]:
        """The newest usable checkpoint file of this run as a snapshot, and why each other file was passed over
        (``survived(step)``: whether a file of that step is confirmed healthy)."""
        return None, []
