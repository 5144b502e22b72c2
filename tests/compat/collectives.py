"""Count the ``torch.distributed`` collectives a rank calls inside a Trainer's hooks (for the subprocess scripts).

:func:`count_collectives` wraps every collective function of ``torch.distributed`` (the module attributes that
gradguard's core and Lightning's strategies call); :class:`Span` callbacks, one first and one last in the callback
list, open and close a window per hook, so that each call is filed under ``(hook, global_step)``. The collectives
of FSDP2's own forward and backward and of DDP's gradient reducer do not go through these functions (they are
issued on the process group objects) and are not counted; only what the callbacks ask for is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback

#: the collective functions of torch.distributed that are counted
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)


class Counts:
    """Collective calls by ``(hook, global_step)``, in call order; calls outside a window are not kept."""

    def __init__(self) -> None:
        self.window: tuple[str, int] | None = None
        self.calls: dict[tuple[str, int], list[str]] = defaultdict(list)

    def table(self, hook: str) -> dict[int, list[str]]:
        """Step -> the collectives called inside ``hook`` at that step."""
        return {step: list(names) for (h, step), names in sorted(self.calls.items()) if h == hook}


def count_collectives() -> Counts:
    """Wrap the collectives of ``torch.distributed`` (once per process) and return where their calls are filed."""
    counts = Counts()
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapped(*args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
            if counts.window is not None:
                counts.calls[counts.window].append(__name)
            return __original(*args, **kwargs)

        setattr(dist, name, wrapped)
    return counts


class Span(Callback):
    """Opens (``end=False``, first in the list) or closes (``end=True``, last) the counting window of the hooks
    ``on_before_optimizer_step`` (every callback's per-step work before the update) and ``on_train_batch_end`` (the
    guard's decision, snapshots). A window is keyed by the ``global_step`` at which it opened."""

    def __init__(self, counts: Counts, end: bool) -> None:
        self.counts, self.end = counts, end

    def _mark(self, hook: str, step: int) -> None:
        self.counts.window = None if self.end else (hook, step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._mark("on_before_optimizer_step", trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._mark("on_train_batch_end", trainer.global_step - 1)


def around(counts: Counts, callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` between the two :class:`Span` markers."""
    return [Span(counts, end=False), *callbacks, Span(counts, end=True)]
