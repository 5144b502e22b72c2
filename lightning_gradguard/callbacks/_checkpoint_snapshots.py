"""NaNGuard's second snapshot source: ModelCheckpoint files that this fit wrote (or resumed from), verified as such.

A file in the checkpoint directory is not evidence of anything: a reused ``dirpath`` holds files of other runs
that look like this run's by name. So a file counts only when (a) the guard saw one of the Trainer's own
``ModelCheckpoint`` callbacks report it during this fit (noted once per step; no directory scan) and (b) the guard's
state saved inside it carries this fit's run identity (a random id made at ``setup``), or it is the file the fit
resumed from. A verified file must also have survived ``confirm_steps`` healthy steps and hold finite weights; it is
then turned into a :class:`~lightning_gradguard.core.recover._snapshot.Snapshot` and restored by the same code as an
in-memory one.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradguard.core.recover._snapshot import Snapshot, nonfinite_entries


def guard_state_in(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The NaNGuard state saved in a checkpoint, whatever the guard's arguments were (empty dict if none)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith("NaNGuard") and isinstance(state, dict):
            return state
    return {}


def _reported_paths(trainer: pl.Trainer) -> list[str]:
    """The paths the Trainer's ModelCheckpoint callbacks report right now (each keeps only its latest/best ones)."""
    paths: list[str] = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            last = getattr(cb, "_last_checkpoint_saved", "")  # no public name for "the file just written"
            paths += [p for p in (last, cb.last_model_path, cb.best_model_path, *cb.best_k_models.keys()) if p]
    return paths


def full_checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and not cb.save_weights_only]


def always_leaves_a_confirmed_file(trainer: pl.Trainer) -> bool:
    """Whether some ModelCheckpoint keeps more than one step's file (so an older, confirmed one always exists)."""
    return any(cb.save_top_k == -1 or cb.save_top_k > 1 for cb in full_checkpoints(trainer))


def check_checkpointing(trainer: pl.Trainer, confirm_steps: int) -> None:
    """At setup: refuse a Trainer without a full-state ModelCheckpoint; warn when no confirmed file can always exist."""
    suggestion = "e.g. ModelCheckpoint(every_n_train_steps=100, save_top_k=-1), or use snapshot='memory'"
    if not trainer.checkpoint_callbacks:
        raise ValueError(
            "NaNGuard(snapshot='checkpoint') rolls back to this fit's ModelCheckpoint files, but the Trainer has "
            f"no ModelCheckpoint callback; add one ({suggestion})"
        )
    if not full_checkpoints(trainer):
        raise ValueError(
            "NaNGuard(snapshot='checkpoint') needs full checkpoints (optimizer and scheduler state), but every "
            f"ModelCheckpoint has save_weights_only=True ({suggestion})"
        )
    if not always_leaves_a_confirmed_file(trainer):
        rank_zero_warn(
            "NaNGuard(snapshot='checkpoint'): no ModelCheckpoint keeps more than one file (save_top_k <= 1), so "
            f"for {confirm_steps} steps after each save no confirmed file exists; a fault then "
            f"rolls back to the state the fit started from. To always have one: {suggestion}."
        )


class CheckpointSnapshots:
    """Finds the newest usable checkpoint file of this fit (see the module docstring)."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.resumed_from: str | None = None
        self.seen: dict[str, str] = {}  # realpath -> path, every file a ModelCheckpoint reported during this fit

    def start(self, trainer: pl.Trainer) -> None:
        """Call at ``setup``: a new identity for this fit, and the file it resumes from."""
        self.run_id = trainer.strategy.broadcast(uuid.uuid4().hex, src=0)
        path = getattr(trainer, "ckpt_path", None)
        self.resumed_from = os.path.realpath(path) if path and os.path.isfile(path) else None
        self.seen = {self.resumed_from: str(path)} if self.resumed_from else {}

    def observe(self, trainer: pl.Trainer) -> None:
        """Note the files the ModelCheckpoint callbacks report now (call once per step: a few attribute reads)."""
        for p in _reported_paths(trainer):
            self.seen.setdefault(os.path.realpath(p), p)

    def files(self) -> list[Path]:
        """The noted files that still exist, newest first."""
        paths = [Path(p) for p in self.seen.values() if os.path.isfile(p)]
        return sorted(paths, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def best(self, trainer: pl.Trainer, survived: Callable[[int], bool]) -> tuple[Snapshot | None, list[str]]:
        """The newest verified, confirmed, finite file as a snapshot (meta: ``lr_scale``, ``path``), and why each
        other file was passed over."""
        tried: list[str] = []
        self.observe(trainer)
        for path in self.files():
            try:
                ckpt = self._read(trainer, path)
            except Exception as err:  # unreadable, truncated or garbage: try an older one
                tried.append(f"{path}: unreadable ({type(err).__name__}: {err})")
                continue
            state = guard_state_in(ckpt)
            mine = state.get("run_id") == self.run_id or os.path.realpath(path) == self.resumed_from
            if not mine:
                tried.append(f"{path}: not written by this run")
                continue
            step = int(ckpt.get("global_step", -1))
            if not survived(step):
                tried.append(f"{path}: step {step} not yet confirmed")
                continue
            bad = nonfinite_entries(ckpt.get("state_dict", {}))
            if bad:
                tried.append(f"{path}: holds non-finite weights ({', '.join(bad[:3])})")
                continue
            precision_key = type(trainer.precision_plugin).__qualname__
            extra = {"precision": ckpt[precision_key]} if ckpt.get(precision_key) else {}
            snap = Snapshot(
                step=step,
                model=ckpt["state_dict"],
                optimizers=list(ckpt.get("optimizer_states", [])),
                schedulers=list(ckpt.get("lr_schedulers", [])),
                extra=extra,
                meta={"lr_scale": float(state.get("lr_scale", 1.0)), "path": str(path)},
            )
            return snap, tried
        return None, tried

    def _read(self, trainer: pl.Trainer, path: Path) -> dict[str, Any]:
        try:
            return trainer.strategy.load_checkpoint(path)
        except pickle.UnpicklingError:
            # weights-only loading refused some non-tensor state of another callback; the file is one the Trainer's
            # own ModelCheckpoint lists for this fit, and it is verified by its run id right after reading
            return trainer.strategy.load_checkpoint(path, weights_only=False)
