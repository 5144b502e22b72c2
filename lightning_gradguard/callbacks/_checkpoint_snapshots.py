"""NaNGuard's second snapshot source: ModelCheckpoint files and distributed checkpoints that this fit wrote (or resumed
from), verified as such.

A checkpoint in the checkpoint directory is not evidence of anything: a reused ``dirpath`` holds checkpoints of other
runs that look like this run's by name. So a checkpoint counts only when (a) the guard saw one of the Trainer's own
``ModelCheckpoint`` callbacks report it during this fit (noted once per step; no directory scan) and (b) the guard's
state saved inside it carries this fit's run identity (a random id made at ``setup``), or it is the checkpoint the fit
resumed from. A verified checkpoint must also have survived ``confirm_steps`` healthy steps and hold finite weights;
it is then turned into a :class:`~lightning_gradguard.core.recover._snapshot.Snapshot` and restored by the same code
as an in-memory one.

**Files** (single process, DDP): each rank reads the file on its own (no collective), newest first.

**Distributed checkpoints** (``ModelParallelStrategy``, FSDP2/tensor parallel): a directory of DCP shards (``*.distcp``
and ``.metadata``) plus ``meta.pt``, the non-tensor part that rank 0 wrote (callback states, ``global_step``,
``lr_schedulers``, the precision plugin's state). Loading one is a collective, so every rank walks the same
candidates in the same order and agrees at each stage:

1. rank 0 orders the candidates (newest first) and broadcasts the list;
2. every rank checks the candidate cheaply and identically: ``meta.pt`` readable, this fit's run id (or the
   directory it resumed from), its step confirmed, DCP's ``.metadata`` readable and every shard file it names present
   and long enough (a truncated or deleted ``.distcp`` file is found here, without reading the shards); one
   all-reduce: skipped if any rank objects;
3. every rank loads its shards of the weights and optimizer states with DCP into *copies* (on the CPU) of its local
   state, never into the live one, so a candidate that fails half-way leaves the training state untouched, and
   checks its local shards finite; one all-reduce: skipped if any rank failed (DCP itself raises on every rank when a
   read fails on one). The copies are made once per search, by every rank together, when the first candidate passes
   step 2 (one more all-reduce); torch's ``get_optimizer_state_dict`` gives an optimizer without state yet (right
   after a rollback to the start state) one first with a zero-gradient, zero-LR step, which the load replaces;
4. the copies are applied to the live module and optimizers (``set_model_state_dict``/``set_optimizer_state_dict``,
   as Lightning's own resume does) and the snapshot is taken from the live state with
   :func:`~lightning_gradguard.core.recover._snapshot.take_snapshot`, the schedulers' and precision plugin's states
   from ``meta.pt``; one all-reduce: the next candidate if any rank failed (then the live state may be partly
   replaced; the next candidate, or the in-memory start state the engine falls back to, replaces all of it).

The snapshot is thus in the raw ``optimizer.state_dict()`` layout (integer parameter ids; each state tensor this
rank's DTensor shard, ``step`` a plain tensor), which ``restore_snapshot`` loads back bit for bit: the engine's
restore and LR cut then work as for any snapshot. It holds this rank's shards only, in host memory, and while it is
built a second copy (the load target) exists for a moment. A full-state *file* under ``ModelParallelStrategy``
(``save_distributed_checkpoint=False``) is passed over: loading it is a broadcast from rank 0 into the live module,
which a damaged file could leave half-done (the setup check warns). Candidates are ordered by modification time (a
directory: the newest of itself and its ``meta.pt``), as files are. Why each candidate was passed over is returned
to the engine (it names them in the event when it falls back to its in-memory start state) and kept in
:attr:`CheckpointSnapshots.passed_over` after every search.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradguard.core.guard._step_judge import RankReducer, any_rank
from lightning_gradguard.core.recover._snapshot import Snapshot, clone_state, nonfinite_entries, take_snapshot

#: the file of a distributed checkpoint that holds everything but the weights and optimizer states (Lightning's name)
META_FILE = "meta.pt"


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


def is_model_parallel(trainer: pl.Trainer) -> bool:
    """Whether the strategy is Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel): its checkpoints are
    loaded collectively (see the module docstring)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def check_checkpointing(trainer: pl.Trainer, confirm_steps: int) -> None:
    """At setup: refuse a Trainer without a full-state ModelCheckpoint; warn when no confirmed file can always exist,
    and under ``ModelParallelStrategy`` when it writes full-state files (not used: only distributed checkpoints are)."""
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
    if is_model_parallel(trainer) and not getattr(trainer.strategy, "_save_distributed_checkpoint", True):
        rank_zero_warn(
            "NaNGuard(snapshot='checkpoint') under ModelParallelStrategy(save_distributed_checkpoint=False): "
            "full-state checkpoint files are not used as snapshots (loading one is a broadcast into the live model "
            "that a damaged file could leave half-done), so a fault rolls back to the state the fit started from. "
            "Use save_distributed_checkpoint=True (the default) to roll back to this fit's distributed checkpoints."
        )


class _WorldMax:
    """The cross-rank maximum through ``torch.distributed`` (a RankReducer), when no other is given."""

    def __init__(self, trainer: pl.Trainer) -> None:
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = int(trainer.world_size) if ready else 1

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
        return local


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _local_tensors(obj: Any, name: str, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of every tensor in a nested state, by dotted name (DTensors as their local shards)."""
    if isinstance(obj, torch.Tensor):
        out[name] = _local(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _local_tensors(v, f"{name}.{k}" if name else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _local_tensors(v, f"{name}.{i}", out)
    return out


def _load(path: Path, **kwargs: Any) -> Any:
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except pickle.UnpicklingError:
        # weights-only loading refused some non-tensor state of another callback; the checkpoint is one the
        # Trainer's own ModelCheckpoint lists for this fit, and it is verified by its run id right after reading
        return torch.load(path, map_location="cpu", weights_only=False)


def _missing_shards(path: Path) -> str | None:
    """Why the DCP shards of ``path`` cannot be whole (a missing ``.metadata``, a missing or short shard file), from
    DCP's metadata and the file sizes alone; None when they look whole."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        return f"DCP metadata unreadable ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard file {name} missing"
        size = shard.stat().st_size
        if size < end:
            return f"shard file {name} truncated ({size} of at least {end} bytes)"
    return None


class _ShardedLoadTarget:
    """Copies (on the CPU) of this rank's part of the model's and optimizers' state in DCP's layout, to load a
    distributed checkpoint into without touching the live state, then applied to it."""

    def __init__(self, trainer: pl.Trainer) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        module = trainer.strategy.model
        assert module is not None
        self.module = module
        self.optimizers = list(trainer.optimizers)
        self.strict = bool(getattr(trainer.lightning_module, "strict_loading", True))
        # the keys and layout Lightning's ModelParallelStrategy saves under (save_checkpoint)
        state: dict[str, Any] = {"state_dict": clone_state(get_model_state_dict(module))}
        for i, opt in enumerate(self.optimizers):
            state[f"optimizer_{i}"] = clone_state(get_optimizer_state_dict(module, opt))
        self.state = state

    def load(self, path: Path, inf_by_design: frozenset[str] = frozenset()) -> str | None:
        """Load the shards of ``path`` into the copies (a collective: every rank at once); why they are unusable on
        this rank (a read that failed, non-finite values), or None."""
        from torch.distributed.checkpoint import FileSystemReader, load

        try:
            load(self.state, storage_reader=FileSystemReader(str(path)))
        except Exception as err:  # DCP raises on every rank when a read failed on any
            return f"shards unreadable ({type(err).__name__}: {str(err)[:300]})"
        bad = nonfinite_entries(_local_tensors(self.state["state_dict"], "", {}), inf_by_design)
        if bad:
            return f"holds non-finite weights ({', '.join(bad[:3])})"
        bad = nonfinite_entries(_local_tensors({k: v for k, v in self.state.items() if k != "state_dict"}, "", {}))
        if bad:
            return f"holds non-finite optimizer state ({', '.join(bad[:3])})"
        return None

    def apply(self) -> None:
        """Load the copies into the live module and optimizers (as Lightning's resume does)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(strict=self.strict)
        set_model_state_dict(self.module, self.state["state_dict"], options=options)
        for i, opt in enumerate(self.optimizers):
            set_optimizer_state_dict(self.module, opt, self.state[f"optimizer_{i}"], options=options)


class CheckpointSnapshots:
    """Finds the newest usable checkpoint of this fit (see the module docstring)."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.resumed_from: str | None = None
        self.seen: dict[str, str] = {}  # realpath -> path, every checkpoint a ModelCheckpoint reported during this fit
        self.passed_over: list[str] = []  # why each checkpoint was passed over, by the last search
        #: buffers that held +-inf from the start (the guard's ``inf_by_design``): a checkpoint's are checked for NaN
        self.inf_by_design: frozenset[str] = frozenset()

    def start(self, trainer: pl.Trainer) -> None:
        """Call at ``setup``: a new identity for this fit, and the checkpoint (file or directory) it resumes from."""
        self.run_id = trainer.strategy.broadcast(uuid.uuid4().hex, src=0)
        path = getattr(trainer, "ckpt_path", None)
        self.resumed_from = os.path.realpath(path) if path and os.path.exists(path) else None
        self.seen = {self.resumed_from: str(path)} if self.resumed_from else {}
        self.passed_over = []

    def observe(self, trainer: pl.Trainer) -> None:
        """Note the checkpoints the ModelCheckpoint callbacks report now (call once per step: a few attribute
        reads)."""
        for p in _reported_paths(trainer):
            self.seen.setdefault(os.path.realpath(p), p)

    def files(self) -> list[Path]:
        """The noted files that still exist, newest first."""
        paths = [Path(p) for p in self.seen.values() if os.path.isfile(p)]
        return sorted(paths, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def checkpoints(self) -> list[Path]:
        """The noted files and directories that still exist, newest first (a directory: its newest of itself and
        its ``meta.pt``)."""

        def mtime(p: Path) -> int:
            stamps = [p.stat().st_mtime_ns]
            if p.is_dir() and (p / META_FILE).is_file():
                stamps.append((p / META_FILE).stat().st_mtime_ns)
            return max(stamps)

        paths = [Path(p) for p in self.seen.values() if os.path.exists(p)]
        return sorted(paths, key=lambda p: (mtime(p), str(p)), reverse=True)

    def best(
        self, trainer: pl.Trainer, survived: Callable[[int], bool], reduce: RankReducer | None = None
    ) -> tuple[Snapshot | None, list[str]]:
        """The newest verified, confirmed, finite checkpoint as a snapshot (meta: ``lr_scale``, ``path``), and why
        each other one was passed over. Under ``ModelParallelStrategy`` a collective (every rank calls it at the
        same time; ``reduce``: the cross-rank maximum, ``torch.distributed``'s by default)."""
        self.observe(trainer)
        if is_model_parallel(trainer):
            snap, tried = self._best_distributed(trainer, survived, reduce or _WorldMax(trainer))
        else:
            snap, tried = self._best_file(trainer, survived)
        self.passed_over = list(tried)
        return snap, tried

    def _mine(self, state: dict[str, Any], path: Path) -> bool:
        return state.get("run_id") == self.run_id or os.path.realpath(path) == self.resumed_from

    def _best_file(self, trainer: pl.Trainer, survived: Callable[[int], bool]) -> tuple[Snapshot | None, list[str]]:
        tried: list[str] = []
        for path in self.files():
            try:
                ckpt = self._read(trainer, path)
            except Exception as err:  # unreadable, truncated or garbage: try an older one
                tried.append(f"{path}: unreadable ({type(err).__name__}: {err})")
                continue
            state = guard_state_in(ckpt)
            if not self._mine(state, path):
                tried.append(f"{path}: not written by this run")
                continue
            step = int(ckpt.get("global_step", -1))
            if not survived(step):
                tried.append(f"{path}: step {step} not yet confirmed")
                continue
            bad = nonfinite_entries(ckpt.get("state_dict", {}), self.inf_by_design)
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

    def _check_directory(self, path: Path, survived: Callable[[int], bool]) -> tuple[dict[str, Any] | None, str | None]:
        """The cheap checks of one candidate, on this rank, no collective: its ``meta.pt`` and why it is unusable."""
        if not path.is_dir():
            return None, (
                "a full-state file: under ModelParallelStrategy only distributed checkpoints (directories) are used"
            )
        meta_path = path / META_FILE
        if not meta_path.is_file():
            return None, f"no {META_FILE}"
        try:
            meta = _load(meta_path)
            if not isinstance(meta, dict):
                raise TypeError(f"holds a {type(meta).__name__}, not a dict")
        except Exception as err:
            return None, f"{META_FILE} unreadable ({type(err).__name__}: {str(err)[:200]})"
        if not self._mine(guard_state_in(meta), path):
            return None, "not written by this run"
        step = int(meta.get("global_step", -1))
        if not survived(step):
            return None, f"step {step} not yet confirmed"
        why = _missing_shards(path)
        return (meta, None) if why is None else (None, why)

    def _best_distributed(
        self, trainer: pl.Trainer, survived: Callable[[int], bool], reduce: RankReducer
    ) -> tuple[Snapshot | None, list[str]]:
        tried: list[str] = []
        device = trainer.strategy.root_device
        order = [str(p) for p in self.checkpoints()] if trainer.is_global_zero else None
        order = trainer.strategy.broadcast(order, src=0)  # the same candidates, in the same order, on every rank
        target: _ShardedLoadTarget | None = None
        for name in order or []:
            path = Path(name)
            meta, why = self._check_directory(path, survived)
            if any_rank(reduce, why is not None, device=device)[0]:
                tried.append(f"{path}: {why or 'unusable on another rank'}")
                continue
            if target is None:  # made once, by every rank together (it reads the live state's layout)
                try:
                    target = _ShardedLoadTarget(trainer)
                except Exception as err:  # e.g. host memory exhausted
                    why = f"no room to load it ({type(err).__name__}: {str(err)[:200]})"
                if any_rank(reduce, why is not None, device=device)[0]:
                    tried.append(f"{path}: {why or 'no room to load it on another rank'}")
                    break
            assert meta is not None
            assert target is not None
            why = target.load(path, self.inf_by_design)
            if any_rank(reduce, why is not None, device=device)[0]:
                tried.append(f"{path}: {why or 'unusable on another rank'}")
                continue
            snap: Snapshot | None = None
            try:
                target.apply()
                snap = self._snapshot_of_live_state(trainer, meta, path)
            except Exception as err:
                why = f"could not be applied ({type(err).__name__}: {str(err)[:300]})"
            if any_rank(reduce, why is not None, device=device)[0] or snap is None:
                tried.append(f"{path}: {why or 'unusable on another rank'}")
                continue
            return snap, tried
        return None, tried

    def _snapshot_of_live_state(self, trainer: pl.Trainer, meta: dict[str, Any], path: Path) -> Snapshot:
        """The live state just loaded from ``path`` as a snapshot, with the schedulers' and precision plugin's states
        from its ``meta.pt``."""
        schedulers = list(meta.get("lr_schedulers", []))
        if len(schedulers) != len(trainer.lr_scheduler_configs):
            raise ValueError(f"{len(schedulers)} scheduler states for {len(trainer.lr_scheduler_configs)} schedulers")
        precision_key = type(trainer.precision_plugin).__qualname__
        extra = {"precision": meta[precision_key]} if meta.get(precision_key) else {}
        state = guard_state_in(meta)
        snap = take_snapshot(
            trainer.lightning_module,
            list(trainer.optimizers),
            step=int(meta.get("global_step", -1)),
            extra=extra,
            meta={"lr_scale": float(state.get("lr_scale", 1.0)), "path": str(path)},
        )
        snap.schedulers = clone_state(schedulers)
        return snap
