"""Where gradguard's callbacks write: scalars to every logger, histograms/images/text to TensorBoard loggers only."""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard.callbacks._pickling import WeakrefsNotPickled
from lightning_gradguard.core.engine._scalars import log10_twins
from lightning_gradguard.core.engine._timeline import Timeline

_log = logging.getLogger("lightning_gradguard")
# every gradguard scalar written to a Trainer's loggers, per Trainer (rank zero): the overview figure and the
# repeat at events read it; it goes with its Trainer
_TIMELINES: weakref.WeakKeyDictionary[Any, Timeline] = weakref.WeakKeyDictionary()


def timeline_for(trainer: pl.Trainer) -> Timeline | None:
    """The :class:`~lightning_gradguard.core.engine._timeline.Timeline` of what gradguard wrote to ``trainer``'s
    loggers (created on first use; None for a stand-in Trainer that takes no weak reference)."""
    try:
        found = _TIMELINES.get(trainer)
        if found is None:
            found = _TIMELINES[trainer] = Timeline()
    except TypeError:
        return None
    return found


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
    """Send scalars to every logger of the Trainer (loggers only write on global rank zero).

    Norm-like tags (:data:`LOG10_NAMES`) also get their ``_log10`` twin in the same call, for charts whose values
    span decades. The values are also kept in the Trainer's timeline (:func:`timeline_for`).
    """
    if not metrics or trainer.global_rank != 0 or not trainer.loggers:
        return
    values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    timeline = timeline_for(trainer)
    if timeline is not None:
        timeline.update(values, step)
    values.update(log10_twins(values))
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def repeat_scalars(trainer: pl.Trainer, step: int, fresh: Mapping[str, float], before: int | None = None) -> None:
    """Write at ``step`` the last value of every level scalar last written to ``trainer``'s loggers before step
    ``before`` (None: ``step``; ``fresh`` values, known for this step, replace the held ones), so that no chart ends
    before the run did."""
    if trainer.global_rank != 0:
        return
    timeline = timeline_for(trainer)
    if timeline is None:
        return
    log_scalars(trainer, timeline.held(step if before is None else before, fresh, at_event=before is None), step)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of each TensorBoardLogger, on global rank zero; empty elsewhere."""
    if trainer.global_rank != 0:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_text(trainer: pl.Trainer, name: str, text: str, step: int) -> None:
    """Write ``text`` under tag ``name`` to every TensorBoard logger (rank zero) and flush it to disk."""
    for writer in tensorboard_writers(trainer):
        writer.add_text(name, text, global_step=step)
        writer.flush()


def announce(
    trainer: pl.Trainer, text: str, level: int = logging.WARNING, logger: logging.Logger | None = None
) -> None:
    """Tell the person watching the run about an event, on its own line above the progress bar (rank zero only).

    With an enabled progress bar the line goes through it (tqdm's ``write`` clears the bar, prints the line and
    redraws the bar; other bars use their own ``print``), so it is never glued to the bar. The Python logging
    record is also emitted when ``logger`` (default ``lightning_gradguard``) has handlers configured, e.g. by the
    user or by pytest's ``caplog``. Without a bar the record is simply logged at ``level``; Python's last-resort
    handler prints WARNING and above to stderr when nothing is configured.
    """
    if trainer.global_rank != 0:
        return
    logger = logger or _log
    bar = trainer.progress_bar_callback
    if bar is None or not getattr(bar, "is_enabled", True):
        logger.log(level, text)
        return
    from lightning.pytorch.callbacks import TQDMProgressBar

    if isinstance(bar, TQDMProgressBar):
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)  # Lightning's tqdm bars draw on stdout
    else:
        bar.print(text)
    if logger.hasHandlers() and logger.isEnabledFor(level):
        # configured handlers (a log file, caplog) still get the record; the terminal line went through the bar
        logger.log(level, text)


class ProgressBarValues(WeakrefsNotPickled):
    """Show a callback's values in the progress bar without paying ``LightningModule.log`` on every step.

    Lightning keeps a progress-bar metric's last value until the next ``fit``/sanity check resets it (the bar reads
    ``trainer.progress_bar_metrics``, which is updated, not replaced, after each step). So a counter is sent only
    when it differs from the one last sent (:meth:`show_changed`), and a value that drifts every step (a rate) at
    most every ``every`` steps, computed only then (:meth:`show_every`). Nothing is sent without a progress bar.
    Call :meth:`reset` in ``on_train_start``.

    A counter (a whole number) is put into the bar's dict as a Python ``int``, without ``LightningModule.log``: a
    logged value reaches the bar as a float, which tqdm prints as ``3.000``; an int prints as ``3``.
    """

    def __init__(self) -> None:
        self._sent: dict[str, tuple[int, float | None]] = {}
        self._barless: weakref.ref[Any] | None = None  # the Trainer last found without a progress bar

    def reset(self) -> None:
        self._sent.clear()
        self._barless = None

    def _no_bar(self, trainer: pl.Trainer) -> bool:
        """Whether ``trainer`` has no progress bar. Remembered per Trainer (its callbacks are fixed): Lightning's
        ``progress_bar_callback`` scans every callback each time, and the callers ask every step."""
        if trainer.progress_bar_callback is not None:
            return False
        with contextlib.suppress(TypeError):  # a stand-in Trainer without weak references is just not remembered
            self._barless = weakref.ref(trainer)
        return True

    def show_changed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, value: float, step: int
    ) -> None:
        """Send ``value`` as ``name`` unless it is the value last sent (at this step or an earlier one)."""
        barless = self._barless
        if barless is not None and barless() is trainer:
            return  # nothing is ever sent without a bar
        last = self._sent.get(name)
        if last is not None and last[1] == value and step >= last[0]:
            return
        if self._no_bar(trainer):
            return
        if float(value).is_integer():
            self._sent[name] = (step, value)
            trainer.progress_bar_metrics[name] = int(value)  # shown as "3", not "3.000"
            return
        self._send(trainer, pl_module, name, value, step, value)

    def show_every(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        name: str,
        make: Callable[[], torch.Tensor],
        step: int,
        every: int,
    ) -> None:
        """Send ``make()`` as ``name`` if nothing was sent for it in the last ``every`` steps."""
        barless = self._barless
        if barless is not None and barless() is trainer:
            return
        last = self._sent.get(name)
        if last is not None and 0 <= step - last[0] < every:
            return
        if not self._no_bar(trainer):
            self._send(trainer, pl_module, name, make(), step, None)

    def _send(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        name: str,
        value: float | torch.Tensor,
        step: int,
        remembered: float | None,
    ) -> None:
        if trainer.progress_bar_callback is None:
            return
        self._sent[name] = (step, remembered)
        pl_module.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)
