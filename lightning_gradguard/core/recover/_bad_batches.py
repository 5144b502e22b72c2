"""The bad-batch record: every batch the guard skipped or blamed, kept so that a resumed or rolled-back run skips it.

Large-scale trainers remember their bad batches. PaLM (Chowdhery et al., 2022, section 5.1) restarted about 100 steps
before each loss spike and skipped 200-500 batches around it; Megatron-LM keeps the iterations that failed twice and
skips them after a restart; Lightning's ``SpikeDetection`` writes ``skip_batches.json`` but never reads it back.
:class:`BadBatchRecord` keeps one :class:`BadBatch` per blamed batch (step, epoch, batch index, a fingerprint of its
contents, cause, diagnosis), writes it as JSON lines to the run directory, travels in the callback's checkpoint state,
and answers :meth:`BadBatchRecord.match` for each new batch.

A batch is recognised by where the loader put it (its batch index, which a loader that does not shuffle repeats in
every epoch and after a resume) *and* by what it holds: the fingerprint (:func:`fingerprint`, computed only for a
batch at a recorded index, never on a healthy step) must agree, so a shuffled epoch that puts other samples at that
index is not skipped. A skip window (``window`` batches after a rollback's fault, off by default) skips the batches
that followed it in the same epoch as well, PaLM's recipe for data that spoils a stretch of training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

#: the record's file name in the run directory
RECORD_FILE = "gradguard_bad_batches.jsonl"


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def fingerprint(batch: Any) -> str:
    """A short digest of a batch's tensors: shapes, dtypes and float64 sums of the values and of their positions'
    weights (two sums, so that a permutation of the same values reads differently). NaN/inf values are counted, not
    summed. Computed only for batches whose position is on the record (one host read each).

    Example:
        >>> a = fingerprint((torch.tensor([1.0, 2.0]), torch.tensor([0])))
        >>> a == fingerprint((torch.tensor([1.0, 2.0]), torch.tensor([0]))), a == fingerprint(torch.tensor([2.0, 1.0]))
        (True, False)
    """
    parts = []
    with torch.no_grad():
        for t in _tensors(batch):
            v = t.detach().reshape(-1).to(torch.float64)
            finite = torch.isfinite(v)
            clean = torch.where(finite, v, torch.zeros_like(v))
            weights = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
            sums = torch.stack([clean.sum(), (clean * weights).sum(), (~finite).sum().to(torch.float64)]).cpu()
            s, w, bad = (float(x) for x in sums)
            parts.append(f"{tuple(t.shape)}{str(t.dtype).removeprefix('torch.')}:{s:.10g}:{w:.10g}:{int(bad)}")
    return "|".join(parts)


def short_digest(fp: str) -> str:
    """12 hex digits of a fingerprint's SHA-256: small enough to travel between ranks as one float64 (48 bits)."""
    return hashlib.sha256(fp.encode()).hexdigest()[:12]


@dataclass
class BadBatch:
    """One blamed batch.

    Attributes:
        step: the optimizer step it was met at.
        epoch, batch_idx: where the loader put it.
        fingerprint: :func:`fingerprint` of its contents ("" when unknown: matched by position alone).
        cause: why the guard flagged it (a ``GuardCause`` value).
        diagnosis: the rerun diagnosis (``transient``, ``data``, ``state``, ``reproducible``) or "".
        action: what the guard did (``skip``, ``rollback``, ...).
        window: how many batches after it (same epoch) are skipped with it (-1: the record's ``window``).
        sample_indices: the dataset indices of its samples, where the sampler exposed them.
        ranks: with several processes, the ranks whose batch at this position was at fault, each with the
            :func:`short_digest` of its fingerprint (None: one process, ``fingerprint`` is the batch's). The record
            is the same on every rank (positions, so that every rank asks at the same steps); a rank whose own
            batch there was not at fault never matches it (the others' do, and every rank skips with them).
    """

    step: int
    epoch: int
    batch_idx: int
    fingerprint: str = ""
    cause: str = ""
    diagnosis: str = ""
    action: str = ""
    window: int = -1
    sample_indices: list[int] | None = None
    ranks: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BadBatch:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class BadBatchRecord:
    """The blamed batches of a run (see the module docstring).

    Args:
        window: batches after a blamed one (same epoch) to skip as well after a resume or rollback (0: only it).
        transient: also record batches whose fault did not reproduce (default False: a transient fault says
            nothing about the batch).

    Example:
        >>> record = BadBatchRecord()
        >>> batch = torch.tensor([1.0, float("nan")])
        >>> record.add(BadBatch(12, epoch=0, batch_idx=12, fingerprint=fingerprint(batch), cause="nonfinite_loss"))
        True
        >>> record.match(0, 12, lambda: fingerprint(batch)) is not None, record.match(0, 13, lambda: "") is None
        (True, True)
    """

    def __init__(self, window: int = 0, transient: bool = False) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"BadBatchRecord: window must be an int >= 0, got {window!r}")
        self.window = window
        self.transient = transient
        self.entries: list[BadBatch] = []
        self._by_epoch: dict[int, list[BadBatch]] = {}
        self._by_index: dict[int, list[BadBatch]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: BadBatch) -> bool:
        """Record ``entry`` (its window from :attr:`window` unless given); False when it is not worth keeping
        (a transient fault, unless :attr:`transient`) or it is already on the record."""
        if entry.diagnosis == "transient" and not self.transient:
            return False
        for old in self._by_index.get(entry.batch_idx, []):
            if old.fingerprint == entry.fingerprint and old.ranks == entry.ranks:
                return False
        if entry.window < 0:
            entry.window = self.window
        self.entries.append(entry)
        self._by_epoch.setdefault(entry.epoch, []).append(entry)
        self._by_index.setdefault(entry.batch_idx, []).append(entry)
        return True

    def covers(self, epoch: int, batch_idx: int) -> bool:
        """Whether a recorded batch sits at ``batch_idx`` (in any epoch: a loader that does not shuffle brings the
        same batch back every epoch), or a recorded rollback's window covers it in ``epoch``: a test of positions
        only, cheap and the same on every rank (each rank records its own batch of a flagged step at the same
        position)."""
        if batch_idx in self._by_index:
            return True
        return any(e.batch_idx < batch_idx <= e.batch_idx + e.window for e in self._by_epoch.get(epoch, ()))

    def match(self, epoch: int, batch_idx: int, digest: Any, rank: int = 0) -> BadBatch | None:
        """The record entry that says to skip the batch at (``epoch``, ``batch_idx``), or None. ``digest()`` gives
        the batch's fingerprint; it is called only when a recorded batch sits at that index, whose contents must
        then be the same (a shuffled epoch puts other samples there: not skipped). ``rank``: this process's rank
        (entries recorded by several processes hold each faulty rank's own digest)."""
        exact = self._by_index.get(batch_idx)
        if exact:
            fp = digest()
            for e in exact:
                if e.ranks is not None:
                    mine = e.ranks.get(str(rank))
                    if mine is not None and (not mine or mine == short_digest(fp)):
                        return e
                elif not e.fingerprint or e.fingerprint == fp:
                    return e
        for e in self._by_epoch.get(epoch, ()):
            if e.batch_idx < batch_idx <= e.batch_idx + e.window:
                return e
        return None

    # ------------------------------------------------------------------ persistence
    def write(self, directory: str | Path) -> Path:
        """Write the record as JSON lines (one entry per line) to ``directory/gradguard_bad_batches.jsonl``."""
        path = Path(directory) / RECORD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(e.to_dict(), sort_keys=True) + "\n" for e in self.entries))
        tmp.replace(path)
        return path

    def read(self, path: str | Path) -> int:
        """Add the entries of a record file (a run directory or the file itself); returns how many were new. Lines
        that are not valid entries are passed over (a file cut short by a crash still gives its complete lines)."""
        path = Path(path)
        if path.is_dir():
            path = path / RECORD_FILE
        if not path.is_file():
            return 0
        added = 0
        for line in path.read_text().splitlines():
            try:
                entry = BadBatch.from_dict(json.loads(line))
            except (ValueError, TypeError):
                continue
            added += self.add(entry)
        return added

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "entries": [e.to_dict() for e in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries, self._by_epoch, self._by_index = [], {}, {}
        for d in state.get("entries") or []:
            self.add(BadBatch.from_dict(d))


def sample_indices_of(loader: Any, batch_idx: int) -> list[int] | None:
    """The dataset indices of batch ``batch_idx`` of ``loader`` where its batch sampler can be listed without
    drawing random numbers (a sequential sampler); None otherwise (a shuffling sampler's order is not replayable
    without consuming the run's random numbers)."""
    sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(sampler, "sampler", None)
    if inner is None or type(inner).__name__ != "SequentialSampler":
        return None
    size = getattr(sampler, "batch_size", None)
    n = len(inner)
    if not isinstance(size, int) or size <= 0:
        return None
    start = batch_idx * size
    if start >= n:
        return None
    return list(range(start, min(start + size, n)))
