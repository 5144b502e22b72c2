"""In-memory training snapshots: model, optimizers, LR schedulers and AMP scaler state, and a store of recent ones.

Two aliasing traps make a naive snapshot silently wrong. ``module.state_dict()`` and ``optimizer.state_dict()``
return the *live* tensors, so a snapshot that keeps them changes with every later step. And
``optimizer.load_state_dict(snap)`` moves the snapshot's own tensors into the live state (``.to()`` to the same
device and dtype does not copy), as ``scheduler.load_state_dict`` does with its lists: restoring twice from one
snapshot would then restore the second time to whatever the first restore turned into. :func:`take_snapshot`
therefore copies everything to the CPU, and :func:`restore_snapshot` hands out fresh copies on every restore (model
tensors are copied in place by ``Module.load_state_dict``, so they need no second copy).

:class:`SnapshotStore` keeps the last few snapshots and tells which one can be trusted: a snapshot only counts as
good after it has survived ``confirm_steps`` healthy optimizer steps, since the state at a step can already carry
the seed of a divergence that shows up a few steps later.

Pure PyTorch: these functions take modules, optimizers and schedulers, never a Trainer. Pass the raw torch
optimizers (Lightning's ``LightningOptimizer`` wrapper swallows ``load_state_dict``).
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_gradguard.core.measure._grad_stats import norms_of
from lightning_gradguard.core.recover._replica_shards import ReplicaSharding, ShardedState, same_memory


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a nested state (dicts, lists, tuples), in walk order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes this process holds for ``t``: a sharded ``DTensor`` counts its local piece (its ``numel`` is the
    global tensor's)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def clone_state(obj: Any, device: torch.device | str | None = "cpu") -> Any:
    """A deep copy of a nested state (dicts, lists, tuples, tensors, plain values) sharing no tensor with ``obj``.

    Tensors are detached and copied to ``device`` (``None`` keeps each tensor's device); other leaves are deep-copied.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = clone_state(v, device)
        metadata = getattr(obj, "_metadata", None)  # Module.state_dict's per-module versions
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [clone_state(v, device) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(clone_state(v, device) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """A copy of the training state after optimizer step ``step`` (on the CPU unless taken with another device).

    Attributes:
        step: the number of optimizer steps taken when the snapshot was made (e.g. the Trainer's ``global_step``).
        model: the module's ``state_dict`` (parameters and buffers), copied.
        optimizers: each optimizer's ``state_dict``, copied.
        schedulers: each LR scheduler's ``state_dict``, copied.
        extra: further state (e.g. the AMP GradScaler's ``state_dict``), copied.
        meta: plain metadata kept with the snapshot (e.g. the LR scale in force when it was taken).
        healthy_steps: healthy optimizer steps survived since it was taken (maintained by :class:`SnapshotStore`).
        sharded: this rank's part of a state replicated over data-parallel ranks
            (:mod:`~lightning_gradguard.core.recover._replica_shards`); ``model``, ``optimizers``, ``schedulers``
            and ``extra`` are then empty until :meth:`whole` gathers them (a collective).
    """

    step: int
    model: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    healthy_steps: int = 0
    sharded: ShardedState | None = None

    def whole(self) -> Snapshot:
        """The snapshot with every tensor present: itself, or for a split one (:attr:`sharded`) a new snapshot
        gathered from every rank's part. A collective for a split snapshot: every rank calls it at the same time."""
        if self.sharded is None:
            return self
        model, optimizers, schedulers, extra = self.sharded.gather()
        return Snapshot(self.step, model, optimizers, schedulers, extra, copy.deepcopy(self.meta), self.healthy_steps)

    def whole_model(self) -> dict[str, torch.Tensor]:
        """The model's state: :attr:`model`, or for a split snapshot the model's part alone gathered from every rank
        (a collective; the optimizer state does not travel)."""
        if self.sharded is None:
            return self.model
        return self.sharded.gather(part=0)

    def nbytes(self) -> int:
        """Bytes held by this rank for the snapshot's tensors (a split snapshot: this rank's part), counted once: a
        snapshot is never changed after it is taken."""
        cached = self.__dict__.get("_nbytes")
        if cached is not None:
            return int(cached)
        total = self.sharded.nbytes if self.sharded is not None else 0
        total += sum(local_nbytes(t) for t in tensors_in([self.model, self.optimizers, self.schedulers, self.extra]))
        self.__dict__["_nbytes"] = total
        return total

    def describe(self) -> dict[str, Any]:
        """Plain metadata (step, healthy steps, size, ``meta``), for callback state and reports."""
        return {"step": self.step, "healthy_steps": self.healthy_steps, "nbytes": self.nbytes(), **self.meta}

    def state_dict(self) -> dict[str, Any]:
        """The whole snapshot as nested dicts, lists, numbers and (CPU) tensors, for a checkpoint: a resumed run that
        loads it back (:meth:`from_state_dict`) rolls back to exactly the state the uninterrupted run would have
        restored. Copies: later changes to the snapshot do not reach it, nor the other way round. Loadable with
        ``torch.load(weights_only=True)``. A split snapshot is gathered first (a collective)."""
        if self.sharded is not None:
            return self.whole().state_dict()
        return {
            "step": self.step,
            "model": clone_state(self.model),
            "optimizers": clone_state(self.optimizers),
            "schedulers": clone_state(self.schedulers),
            "extra": clone_state(self.extra),
            "meta": copy.deepcopy(self.meta),
            "healthy_steps": self.healthy_steps,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Snapshot:
        """A snapshot from :meth:`state_dict` (copied again: the checkpoint's dict is not kept)."""
        return cls(
            step=int(state["step"]),
            model=clone_state(state["model"]),
            optimizers=clone_state(list(state.get("optimizers", []))),
            schedulers=clone_state(list(state.get("schedulers", []))),
            extra=clone_state(dict(state.get("extra") or {})),
            meta=copy.deepcopy(dict(state.get("meta") or {})),
            healthy_steps=int(state.get("healthy_steps", 0)),
        )


def stray_parameters(
    module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> list[tuple[int, list[torch.Tensor]]]:
    """The tensors each optimizer updates that are not ``module``'s parameters, as ``(optimizer index, tensors)``.

    A snapshot holds the module's state and the optimizers' states; an optimizer's state names its tensors but does
    not hold their values, so a rollback would leave these tensors as the fault left them.
    """
    own = {id(p) for p in module.parameters()}
    found = []
    for i, opt in enumerate(optimizers):
        strays = [p for group in opt.param_groups for p in group["params"] if id(p) not in own]
        if strays:
            found.append((i, strays))
    return found


def check_snapshot_covers(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], owner: str) -> None:
    """``ValueError`` naming ``owner`` when an optimizer updates tensors outside ``module`` (a rollback would not
    restore them)."""
    for i, strays in stray_parameters(module, optimizers):
        where = f"optimizers[{i}]" if len(optimizers) > 1 else "the optimizer"
        shapes = ", ".join(str(tuple(p.shape)) for p in strays[:3]) + (", ..." if len(strays) > 3 else "")
        raise ValueError(
            f"{owner}: {where} ({type(optimizers[i]).__name__}) updates {len(strays)} tensor(s) that are not "
            f"parameters of the model (shapes {shapes}): a snapshot holds the model's parameters, so a rollback would "
            "leave these as the fault left them. Register them on the model (an nn.Parameter attribute of a module) "
            "or guard the model that owns them."
        )


def take_snapshot(
    module: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
    step: int = 0,
    extra: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    device: torch.device | str | None = "cpu",
    sharding: ReplicaSharding | None = None,
) -> Snapshot:
    """Copy the state of ``module``, ``optimizers`` and ``schedulers`` (and ``extra``) into a :class:`Snapshot`.

    Args:
        module: the model; its ``state_dict()`` (parameters and persistent buffers) is copied.
        optimizers: raw torch optimizers.
        schedulers: LR schedulers (anything with ``state_dict``/``load_state_dict``).
        step: the step count to record.
        extra: further state dicts to copy (e.g. ``{"precision": scaler.state_dict()}``).
        meta: plain metadata stored as is (copied).
        device: where to copy tensors (``"cpu"`` by default, ``None`` keeps each tensor's device).
        sharding: the state is the same on every rank of a data-parallel group: keep only this rank's part of it
            (always on the CPU; see :mod:`~lightning_gradguard.core.recover._replica_shards`). None, or a group of
            one rank: a whole copy.
    """
    if sharding is not None and sharding.world > 1:
        state = [
            module.state_dict(),
            [opt.state_dict() for opt in optimizers],
            [sch.state_dict() for sch in schedulers],
            dict(extra or {}),
        ]
        part = ShardedState.take(state, sharding)
        return Snapshot(int(step), {}, [], [], {}, copy.deepcopy(dict(meta or {})), sharded=part)
    return Snapshot(
        step=int(step),
        model=clone_state(module.state_dict(), device),
        optimizers=[clone_state(opt.state_dict(), device) for opt in optimizers],
        schedulers=[clone_state(sch.state_dict(), device) for sch in schedulers],
        extra=clone_state(dict(extra or {}), device),
        meta=copy.deepcopy(dict(meta or {})),
    )


def state_nbytes(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
    """Bytes of the tensors a whole snapshot of ``module`` and ``optimizers`` would copy (nothing is copied: the
    live tensors are only counted; a tensor met twice, e.g. tied weights, counts once)."""
    seen: dict[Any, int] = {}
    for t in tensors_in([module.state_dict(), [opt.state_dict()["state"] for opt in optimizers]]):
        seen.setdefault(same_memory(t) or id(t), local_nbytes(t))
    return sum(seen.values())


def memory_budget(local_processes: int = 1) -> float:
    """The default host-memory budget of one process's snapshots: a quarter of this machine's physical memory,
    shared by the ``local_processes`` training processes on it (infinite where the size cannot be read)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name
        return math.inf
    return total / 4 / max(int(local_processes), 1) if total > 0 else math.inf


def restore_snapshot(
    snapshot: Snapshot,
    module: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
    strict: bool = True,
) -> dict[str, Any]:
    """Load ``snapshot`` into ``module``, ``optimizers`` and ``schedulers``; the snapshot itself stays untouched.

    Every optimizer and scheduler state is deep-copied before loading, so the live objects never share a tensor or a
    list with the snapshot and the same snapshot can be restored again later. Optimizer state is moved by torch to
    each parameter's device and dtype.

    Returns:
        A fresh copy of ``snapshot.extra`` for the caller to load where it belongs (e.g. a GradScaler).

    A split snapshot (:attr:`Snapshot.sharded`) is gathered first: a collective, every rank restores together.

    Raises:
        ValueError: if the number of optimizers or schedulers differs from the snapshot's.
    """
    private = snapshot.sharded is not None  # gathered just now, for this restore only: no second copy needed
    snapshot = snapshot.whole()
    if len(optimizers) != len(snapshot.optimizers):
        raise ValueError(f"snapshot holds {len(snapshot.optimizers)} optimizer states, got {len(optimizers)}")
    if len(schedulers) != len(snapshot.schedulers):
        raise ValueError(f"snapshot holds {len(snapshot.schedulers)} scheduler states, got {len(schedulers)}")
    module.load_state_dict(snapshot.model, strict=strict)  # copies into the live tensors
    for opt, state in zip(optimizers, snapshot.optimizers):
        opt.load_state_dict(state if private else clone_state(state, device=None))
    for sch, state in zip(schedulers, snapshot.schedulers):
        sch.load_state_dict(state if private else clone_state(state, device=None))
    return snapshot.extra if private else clone_state(snapshot.extra, device=None)


def nonfinite_entries(state: dict[str, Any], inf_by_design: frozenset[str] = frozenset()) -> list[str]:
    """Keys of the floating (and complex) tensors of ``state`` (a ``state_dict``) that hold NaN/inf, in order; a key of
    ``inf_by_design`` (:func:`inf_by_design`: a buffer that held infinities from the start, an attention mask) only
    where it holds NaN.

    One multi-tensor norm over all of them (a NaN/inf element makes its tensor's norm non-finite), so the cost is
    one pass over the values, paid only where it is called: before a snapshot is trusted, and on faults.
    """
    tensors = [(k, t) for k, t in state.items() if isinstance(t, torch.Tensor) and t.numel()]
    keys = [k for k, t in tensors if t.is_floating_point()]
    # complex tensors (a complex-valued layer's weights) too: finite when both parts are; one check each
    complex_keys = {k for k, t in tensors if t.is_complex()}
    if not keys and not complex_keys:
        return []
    with torch.no_grad():
        bad_set: set[str] = set()
        if keys:
            norms = norms_of([state[k].detach() for k in keys], 2.0, dtype=torch.float64)
            bad_set.update(keys[i] for i in (~torch.isfinite(norms)).nonzero().flatten().tolist())
        bad_set.update(k for k in complex_keys if not bool(torch.isfinite(state[k].detach()).all()))
        bad = [k for k, _ in tensors if k in bad_set]
        if inf_by_design:
            bad = [k for k in bad if k not in inf_by_design or bool(torch.isnan(state[k].detach()).any())]
    return bad


def inf_by_design(module: torch.nn.Module) -> frozenset[str]:
    """The state-dict keys of ``module``'s floating buffers that hold +-inf and no NaN: read when the guard first
    sees the model, they are the model's own, not a fault. An additive causal mask is one
    (``nn.Transformer.generate_square_subsequent_mask`` registered as a buffer, persistent by default): its -inf made
    every snapshot look damaged, and the guard halted every such run at step 0 ("no finite snapshot to roll back
    to"). Those buffers are checked for NaN only from then on; NaN is never by design.

    The buffers are read directly (``named_buffers``: their names are their state-dict keys), not through the
    module's ``state_dict``, which user code may override; nothing here raises (a buffer that cannot be read is
    not by design)."""
    try:
        state = {name: buf for name, buf in module.named_buffers()}
        found = []
        with torch.no_grad():
            for key in nonfinite_entries(state):
                if not bool(torch.isnan(state[key].detach()).any()):
                    found.append(key)
        return frozenset(found)
    except Exception:  # a buffer this process cannot read (meta, a subclass): none known to be by design
        return frozenset()


def nonfinite_weights_and_buffers(
    module: torch.nn.Module, inf_by_design: frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """Names of ``module``'s non-finite parameters and of its non-finite buffers (state-dict keys), in order (the
    buffers of ``inf_by_design`` only where they hold NaN)."""
    bad = nonfinite_entries(module.state_dict(), inf_by_design)
    params = {n for n, _ in module.named_parameters()}
    return [n for n in bad if n in params], [n for n in bad if n not in params]


class BufferCopy:
    """A copy of a module's buffers (e.g. BatchNorm running statistics and batch counts), to undo a forward pass.

    Buffers change in the forward pass, before any gradient exists: a skipped update leaves them as the bad batch
    made them. :meth:`save` before the forward (one multi-tensor copy into preallocated storage) and :meth:`restore`
    when the step is skipped bring them back bit for bit. The list of buffers is found once (walking the module tree
    costs more than the copy) and again after :meth:`clear`; a model without buffers costs nothing per step.

    Every dense buffer counts, whatever its dtype (floating, complex, integer, bool). Each is held by its place (its
    module's buffer table and name), so a buffer that the forward *reassigns* (``self.mu = new`` instead of an
    in-place update) is followed: :meth:`save` finds the buffers again when one was replaced since, and
    :meth:`restore` puts the saved values back in their places, replacing a tensor the forward swapped in (before,
    the copy went into the old tensor, the bad forward's one stayed, and a NaN batch that should have been skipped
    left a non-finite buffer: a rollback with an LR cut instead).
    """

    def __init__(self) -> None:
        self._owner: int | None = None
        self._slots: list[tuple[dict[str, Any], str]] = []  # (a module's _buffers, the buffer's name)
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def _find(self, module: torch.nn.Module) -> None:
        self._owner = id(module)
        seen: set[int] = set()
        self._slots, self._live = [], []
        for sub in module.modules():
            table = sub._buffers
            for name, buf in table.items():
                if isinstance(buf, torch.Tensor) and buf.layout == torch.strided and id(buf) not in seen:
                    seen.add(id(buf))
                    self._slots.append((table, name))
                    self._live.append(buf)
        self._saved = [b.detach().clone() for b in self._live]

    def _replaced(self) -> bool:
        return any(table.get(name) is not buf for (table, name), buf in zip(self._slots, self._live))

    def save(self, module: torch.nn.Module) -> None:
        if self._owner != id(module) or (self._live and self._replaced()):
            self._find(module)
            return
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._saved, [b.detach() for b in self._live])

    def restore(self) -> bool:
        """Copy the saved values back (into the buffers' places); returns whether there was anything to restore."""
        if not self._live:
            return False
        with torch.no_grad():
            if self._replaced():  # the forward swapped tensors in: the saved values go back in their places
                for i, ((table, name), saved) in enumerate(zip(self._slots, self._saved)):
                    current = table.get(name)
                    if current is self._live[i]:
                        current.copy_(saved)
                    else:
                        table[name] = self._live[i]
                        self._live[i].copy_(saved)
                return True
            torch._foreach_copy_([b.detach() for b in self._live], self._saved)
        return True

    def clear(self) -> None:
        """Forget the module (its buffers are found again at the next :meth:`save`)."""
        self._owner, self._slots, self._live, self._saved = None, [], [], []


class SnapshotStore:
    """The last few snapshots, with the rule that a snapshot is *good* once it survived ``confirm_steps`` healthy steps.

    Call :meth:`update` with a new snapshot, :meth:`step_healthy` after every healthy optimizer step, and
    :meth:`compute` for the newest good snapshot. The oldest snapshots are dropped beyond ``capacity``, except the
    newest good one, which is always kept, so a good snapshot remains available even when ``confirm_steps`` is
    longer than the interval between snapshots.

    Args:
        capacity: how many snapshots to keep (>= 1).
        confirm_steps: healthy steps a snapshot must survive to be good (>= 0).

    Raises:
        ValueError: for a capacity < 1 or a negative ``confirm_steps``.

    Example:
        >>> import torch
        >>> store = SnapshotStore(capacity=2, confirm_steps=2)
        >>> store.update(take_snapshot(torch.nn.Linear(1, 1), step=0))
        >>> store.compute() is None
        True
        >>> store.step_healthy(); store.step_healthy()
        >>> store.compute().step
        0
    """

    def __init__(self, capacity: int = 2, confirm_steps: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(confirm_steps, int) or confirm_steps < 0:
            raise ValueError(f"confirm_steps must be an int >= 0, got {confirm_steps!r}")
        self.capacity = capacity
        self.confirm_steps = confirm_steps
        self.snapshots: list[Snapshot] = []

    def is_good(self, snapshot: Snapshot) -> bool:
        return snapshot.healthy_steps >= self.confirm_steps

    def update(self, snapshot: Snapshot, trusted: bool = False) -> None:
        """Add ``snapshot`` (newest); ``trusted=True`` marks it good at once (e.g. the state a run starts from)."""
        if trusted:
            snapshot.healthy_steps = max(snapshot.healthy_steps, self.confirm_steps)
        self.snapshots.append(snapshot)
        while len(self.snapshots) > self.capacity:
            keep = self.compute()
            victim = next(s for s in self.snapshots if s is not keep)
            self.snapshots.remove(victim)

    def step_healthy(self, n: int = 1) -> None:
        """Count ``n`` healthy steps for every stored snapshot."""
        for s in self.snapshots:
            s.healthy_steps += n

    def compute(self, before: int | None = None) -> Snapshot | None:
        """The newest good snapshot (taken at step ``before`` or earlier, when given), or None."""
        for s in reversed(self.snapshots):
            if self.is_good(s) and (before is None or s.step <= before):
                return s
        return None

    def discard_after(self, snapshot: Snapshot) -> None:
        """Drop the snapshots newer than ``snapshot`` (taken on a trajectory that was rolled back)."""
        if snapshot in self.snapshots:
            self.snapshots = self.snapshots[: self.snapshots.index(snapshot) + 1]

    def reset(self) -> None:
        self.snapshots = []

    def state_dict(self, with_snapshots: bool = False) -> dict[str, Any]:
        """Settings and metadata of the stored snapshots; with ``with_snapshots``, the snapshots themselves too
        (``"saved"``, :meth:`Snapshot.state_dict` each, with their confirmation counts), so that a run resumed from a
        checkpoint holding them rolls back to what the uninterrupted run would have (its own state at the resume is
        then no snapshot of it)."""
        state = {
            "capacity": self.capacity,
            "confirm_steps": self.confirm_steps,
            "snapshots": [s.describe() for s in self.snapshots],
        }
        if with_snapshots:
            state["saved"] = [s.state_dict() for s in self.snapshots]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the settings, and the snapshots when the state holds them (``"saved"``); otherwise (metadata
        only) the store starts empty."""
        self.capacity = int(state.get("capacity", self.capacity))
        self.confirm_steps = int(state.get("confirm_steps", self.confirm_steps))
        self.snapshots = [Snapshot.from_state_dict(s) for s in state.get("saved") or []]

    def __len__(self) -> int:
        return len(self.snapshots)
