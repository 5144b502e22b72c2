"""Per-layer gradient health: vanishing and exploding layers, detected from per-layer statistics.

Two small stateful detectors, each fed one vector of per-layer values per (logged) step together with the layer
names that vector describes:

- :class:`VanishingDetector`: a layer whose *update ratio* (gradient norm / weight norm) stays below ``threshold``
  for ``patience`` consecutive updates is vanishing. The ratio is the scale-free quantity behind the "update / weight
  ~ 1e-3" rule of thumb (Karpathy, CS231n notes), so one threshold fits layers of any size; a ratio many orders of
  magnitude below that means the layer has effectively stopped learning, the symptom Hochreiter (1991) and Glorot &
  Bengio (2010) describe for deep sigmoid networks.
- :class:`ExplodingDetector`: a layer whose gradient norm exceeds ``factor`` times its own running geometric mean
  (an EMA of the log norm) is exploding at that update. A spike enters the history only up to that bound (as in
  ZClip, arXiv 2504.02507, for the global norm), so one blow-up does not raise the bar for the next.

Both keep their state as device tensors (no host synchronisation in ``update``), treat NaN/inf inputs as "no
information" (they never enter the history and never count as vanishing: non-finite gradients are
:class:`~lightning_gradguard.NaNGuard`'s business), and follow layers by name: when the set of layers changes
(e.g. a parameter had no gradient at one step), the state of the layers that remain is carried over. State dicts hold
CPU tensors, Python numbers and lists of strings only, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.core._arg_checks import check_int, is_number


def _check_positive(name: str, value: Any) -> float:
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _check_values(values: Tensor, names: Sequence[str]) -> Tensor:
    if not isinstance(values, Tensor):
        values = torch.as_tensor(values, dtype=torch.float32)
    values = values.detach().reshape(-1)
    if values.numel() != len(names):
        raise ValueError(f"expected one value per layer: got {values.numel()} values for {len(names)} layer names")
    return values.to(torch.float32)


def _remap(old: Tensor, old_names: list[str], new_names: list[str], fill: float | bool | int) -> Tensor:
    """``old`` re-indexed from ``old_names`` to ``new_names``; layers not seen before get ``fill``."""
    pos = {n: i for i, n in enumerate(old_names)}
    out = torch.full((len(new_names),), fill, dtype=old.dtype, device=old.device)
    src = [pos[n] for n in new_names if n in pos]
    if src:
        dst = [i for i, n in enumerate(new_names) if n in pos]
        out[torch.tensor(dst, device=old.device)] = old[torch.tensor(src, device=old.device)]
    return out


def _load(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor) or value.shape != like.shape:
        return like
    return value.detach().clone().to(dtype=like.dtype)


class _LayerDetector:
    """Shared bookkeeping: the layer names the state vectors describe, kept aligned with the input."""

    _fields: tuple[tuple[str, Any, torch.dtype], ...] = ()  # (attribute, fill value, dtype)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all layers and their history."""
        self.names: list[str] = []
        for attr, _, dtype in self._fields:
            setattr(self, attr, torch.zeros(0, dtype=dtype))

    def _align(self, values: Tensor, names: Sequence[str]) -> None:
        names = list(names)
        device = values.device
        if names != self.names:
            for attr, fill, _ in self._fields:
                setattr(self, attr, _remap(getattr(self, attr), self.names, names, fill))
            self.names = names
        for attr, _, _ in self._fields:
            t = getattr(self, attr)
            if t.device != device:
                setattr(self, attr, t.to(device))

    def flagged_names(self) -> list[str]:
        """Names of the layers :meth:`compute` flags (synchronises with the host)."""
        flags = self.compute().cpu().tolist()  # type: ignore[attr-defined]
        return [n for n, f in zip(self.names, flags) if f]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"names": list(self.names)}
        for attr, _, _ in self._fields:
            state[attr.lstrip("_")] = getattr(self, attr).detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        names = state.get("names")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            return
        self.names = list(names)
        for attr, fill, dtype in self._fields:
            like = torch.full((len(self.names),), fill, dtype=dtype)
            setattr(self, attr, _load(state, attr.lstrip("_"), like))


class VanishingDetector(_LayerDetector):
    """Flags layers whose update ratio stays below ``threshold`` for ``patience`` consecutive updates.

    Each :meth:`update` extends a per-layer streak where ``0 <= ratio < threshold`` and resets it otherwise (a NaN/inf
    ratio also resets it). :meth:`compute` is the bool vector ``streak >= patience``.

    Args:
        threshold: update ratio (gradient norm / weight norm) below which a layer counts as vanishing (> 0).
        patience: how many consecutive updates below ``threshold`` flag a layer (>= 1).

    Example:
        >>> det = VanishingDetector(threshold=1e-6, patience=2)
        >>> for ratios in ([1e-9, 1e-2], [1e-8, 1e-3]):
        ...     det.update(torch.tensor(ratios), ["fc1", "fc2"])
        >>> det.flagged_names()
        ['fc1']
    """

    _fields = (("_streak", 0, torch.long),)
    _streak: Tensor

    def __init__(self, threshold: float = 1e-7, patience: int = 3) -> None:
        self.threshold = _check_positive("threshold", threshold)
        self.patience = check_int("patience", patience, 1)
        super().__init__()

    @property
    def streak(self) -> Tensor:
        """Long vector: consecutive updates below the threshold, per layer."""
        return self._streak

    def update(self, update_ratio: Tensor, names: Sequence[str]) -> None:
        """Add one update ratio per layer (``names`` says which layer each value belongs to)."""
        values = _check_values(update_ratio, names)
        self._align(values, names)
        low = torch.isfinite(values) & (values < self.threshold)
        self._streak = torch.where(low, self._streak + 1, 0)

    def compute(self) -> Tensor:
        """Bool vector: is each layer (in :attr:`names` order) vanishing now."""
        return self._streak >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "patience": self.patience, **super().state_dict()}


class ExplodingDetector(_LayerDetector):
    """Flags layers whose gradient norm jumps out of their own band: above ``factor`` times their running geometric
    mean, and above ``z`` standard deviations of their own log norm.

    Per layer, the history is an EMA of ``log(norm)`` and an EMA of its squared deviation (weight ``1 - ema_decay``
    on the newest value, warm-started: the first value is taken as is, with no spread). The band above the mean is
    ``max(log(factor), z * std)``: a layer whose norm routinely varies 10x from one log to the next (the hard batches
    of a network near convergence, Adam on a deep plain CNN) is not exploding when it does so again; a layer that
    is steady is flagged at the first ``factor`` x jump. At each :meth:`update`, a layer is flagged when it has at
    least ``warmup`` values of history and its log norm is above the band. The history is then updated with the
    value capped at the band (as in ZClip, arXiv 2504.02507, for the global norm), so one blow-up neither raises the
    bar for the next nor widens the band by more than one band's worth. Norms that are NaN, inf or exactly zero
    (frozen or unused layers) leave that layer's history unchanged and are not flagged.

    Args:
        factor: the least jump over the running (geometric mean) norm that counts as exploding (> 1).
        ema_decay: weight of the past in the EMAs of the log norm and of its spread, in (0, 1).
        warmup: updates of history a layer needs before it can be flagged (>= 1).
        z: the band is also at least this many standard deviations of the layer's log norm (>= 0; 0: ``factor``
            alone).

    Example:
        >>> det = ExplodingDetector(factor=10.0, warmup=2)
        >>> for norms in ([1.0, 2.0], [1.1, 2.1], [1.0, 500.0]):
        ...     det.update(torch.tensor(norms), ["fc1", "fc2"])
        >>> det.flagged_names()
        ['fc2']
    """

    _fields = (
        ("_log_mean", 0.0, torch.float32),
        ("_log_var", 0.0, torch.float32),
        ("_count", 0, torch.long),
        ("_flags", False, torch.bool),
    )
    _log_mean: Tensor
    _log_var: Tensor
    _count: Tensor
    _flags: Tensor

    def __init__(self, factor: float = 10.0, ema_decay: float = 0.9, warmup: int = 5, z: float = 3.0) -> None:
        factor = _check_positive("factor", factor)
        if factor <= 1.0:
            raise ValueError(f"factor must be finite and > 1, got {factor!r}")
        self.factor = factor
        if not is_number(ema_decay):
            raise TypeError(f"ema_decay must be a float in (0, 1), got {type(ema_decay).__name__} ({ema_decay!r})")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in the open interval (0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.warmup = check_int("warmup", warmup, 1)
        if not is_number(z):
            raise TypeError(f"z must be a number >= 0, got {type(z).__name__} ({z!r})")
        if not (z >= 0 and math.isfinite(z)):
            raise ValueError(f"z must be finite and >= 0, got {z!r}")
        self.z = float(z)
        super().__init__()

    @property
    def count(self) -> Tensor:
        """Long vector: finite, non-zero norms seen per layer."""
        return self._count

    def running_norm(self) -> Tensor:
        """Float32 vector: each layer's running geometric-mean norm (NaN before its first value)."""
        # exp in float64, then clamped: the log of a norm at float32's largest value rounds up by an ulp, and its
        # float32 exp is inf (a hypothesis case: 3.4028117e38)
        norm = self._log_mean.double().exp().clamp(max=torch.finfo(torch.float32).max).float()
        return torch.where(self._count > 0, norm, math.nan)

    def update(self, norms: Tensor, names: Sequence[str]) -> None:
        """Add one gradient norm per layer; flags are those of this update (see :meth:`compute`)."""
        values = _check_values(norms, names)
        self._align(values, names)
        valid = torch.isfinite(values) & (values > 0)
        log_norm = torch.where(valid, values, 1.0).log()
        band = torch.clamp(self._log_var.sqrt() * self.z, min=math.log(self.factor))
        bound = self._log_mean + band
        seen = self._count > 0
        self._flags = valid & (self._count >= self.warmup) & (log_norm > bound)
        capped = torch.minimum(log_norm, bound)
        dev = capped - self._log_mean
        decay = self.ema_decay
        mean = torch.where(seen, self._log_mean + (1.0 - decay) * dev, log_norm)
        var = torch.where(seen, decay * (self._log_var + (1.0 - decay) * dev * dev), 0.0)
        self._log_mean = torch.where(valid, mean, self._log_mean)
        self._log_var = torch.where(valid, var, self._log_var)
        self._count = self._count + valid.long()

    def compute(self) -> Tensor:
        """Bool vector: was each layer (in :attr:`names` order) exploding at the latest update."""
        return self._flags

    def state_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "ema_decay": self.ema_decay,
            "warmup": self.warmup,
            "z": self.z,
            **super().state_dict(),
        }


class LayerHealthChanges:
    """Which layers became vanishing or exploding (or recovered) since the previous logged step, per optimizer.

    Feed :meth:`update` the sets flagged at a logged step (names in layer order); it returns the changes as
    ``{"vanishing": [...], "exploding": [...], "recovered": [...]}`` (recovered: vanishing before, not now) and
    which of the new ones were never reported before (``first``: each layer is announced once per run).

    Example:
        >>> changes = LayerHealthChanges()
        >>> changes.update(0, ["a", "b"], vanishing={"a"}, exploding=set())
        ({'vanishing': ['a'], 'exploding': [], 'recovered': []}, [('vanishing', 'a')])
        >>> changes.update(0, ["a", "b"], vanishing=set(), exploding={"b"})
        ({'vanishing': [], 'exploding': ['b'], 'recovered': ['a']}, [('exploding', 'b')])
        >>> changes.flagged("exploding")
        {'b'}
    """

    KINDS = ("vanishing", "exploding", "recovered")

    def __init__(self) -> None:
        self._now: dict[int, dict[str, set[str]]] = {}
        self._reported: dict[str, set[str]] = {"vanishing": set(), "exploding": set()}

    def flagged(self, kind: str) -> set[str]:
        """Layers of every optimizer flagged ``kind`` at their latest logged step."""
        return set().union(*(now[kind] for now in self._now.values()))

    def update(
        self, optimizer: int, order: Sequence[str], vanishing: set[str], exploding: set[str]
    ) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
        before = self._now.get(optimizer, {"vanishing": set(), "exploding": set()})
        changes = {
            "vanishing": [n for n in order if n in vanishing - before["vanishing"]],
            "exploding": [n for n in order if n in exploding - before["exploding"]],
            "recovered": [n for n in order if n in before["vanishing"] - vanishing],
        }
        self._now[optimizer] = {"vanishing": set(vanishing), "exploding": set(exploding)}
        first = []
        for kind in ("vanishing", "exploding"):
            for name in changes[kind]:
                if name not in self._reported[kind]:
                    self._reported[kind].add(name)
                    first.append((kind, name))
        return changes, first

    def state_dict(self) -> dict[str, Any]:
        return {
            "now": {idx: {k: sorted(v) for k, v in now.items()} for idx, now in sorted(self._now.items())},
            "reported": {k: sorted(v) for k, v in self._reported.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for idx, now in (state.get("now") or {}).items():
            self._now[int(idx)] = {k: set(now.get(k) or ()) for k in ("vanishing", "exploding")}
        for kind, names in (state.get("reported") or {}).items():
            self._reported.setdefault(kind, set()).update(names)
