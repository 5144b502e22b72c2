"""The diagnostic report written when a run is halted for diverging: JSON for tools, a text file for people.

Built from plain data (numbers, strings, lists), so the same report can come from a Lightning callback or a plain
training loop. Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, so the
JSON file is strict JSON (``jq`` and other parsers accept it); :meth:`DivergenceReport.load` turns them back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "numel", lambda: 2)() == 1:
        return _jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return str(obj)


def _from_json(obj: Any) -> Any:
    if isinstance(obj, str) and obj in _NONFINITE:
        return _NONFINITE[obj]
    if isinstance(obj, dict):
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _lrs(lr: list[list[float]]) -> str:
    """``"0.01"``, or ``"optimizer 0: 0.01, 0.001; optimizer 1: 0.1"`` with several optimizers or groups."""
    if len(lr) == 1 and len(lr[0]) == 1:
        return _fmt(float(lr[0][0]))
    return "; ".join(f"optimizer {i}: " + ", ".join(_fmt(float(v)) for v in groups) for i, groups in enumerate(lr))


@dataclass
class DivergenceReport:
    """What a halted run looked like when it was stopped.

    Attributes:
        step: the optimizer step (Trainer ``global_step``) at which the run was halted.
        reason: one readable sentence (why the guard halted).
        cause: the trigger of the last event (``"nonfinite_loss"``, ``"nonfinite_grad"``, ...).
        nonfinite_loss: whether the training loss was non-finite.
        nonfinite_grads: parameters whose gradients were non-finite, in model order (the first ones first).
        nonfinite_params: parameters whose values were non-finite after the step.
        lr: learning rate of each optimizer's param groups (``[[group0, group1], ...]``).
        lr_scale: the cumulative LR factor applied by rollbacks.
        counters: e.g. ``{"skipped_steps": 2, "rollbacks": 3, "amp_overflow_steps": 0}``.
        grad_norm_history: recent ``[step, total gradient norm]`` pairs, oldest first.
        loss_history: recent ``[step, loss]`` pairs, oldest first.
        events: the guard's events (plain dicts), oldest first.
        extra: anything else worth keeping (epoch, batch index, precision, snapshot metadata, ...).
    """

    step: int
    reason: str
    cause: str = ""
    nonfinite_loss: bool = False
    nonfinite_grads: list[str] = field(default_factory=list)
    nonfinite_params: list[str] = field(default_factory=list)
    lr: list[list[float]] = field(default_factory=list)
    lr_scale: float = 1.0
    counters: dict[str, int] = field(default_factory=dict)
    grad_norm_history: list[list[float]] = field(default_factory=list)
    loss_history: list[list[float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as strict-JSON-ready plain data (non-finite floats as strings)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DivergenceReport:
        known = {k: v for k, v in _from_json(data).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DivergenceReport:
        """Read a report written by :meth:`write` (the ``.json`` file)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_text(self, max_rows: int = 20) -> str:
        """A readable summary: what went wrong, where, and the last ``max_rows`` history entries."""

        def names(items: list[str], limit: int = 10) -> str:
            shown = ", ".join(items[:limit])
            return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "") if items else "none"

        lines = [
            f"Training halted at step {self.step}: {self.reason}",
            "",
            f"cause:                    {self.cause or 'unknown'}",
            f"non-finite loss:          {'yes' if self.nonfinite_loss else 'no'}",
            f"non-finite gradients:     {names(self.nonfinite_grads)}",
            f"non-finite parameters:    {names(self.nonfinite_params)}",
            f"learning rate:            {_lrs(self.lr)}",
            f"LR scale from rollbacks:  {_fmt(self.lr_scale)}",
        ]
        lines += [f"{k + ':':<26}{_fmt(v)}" for k, v in self.counters.items()]
        lines += [f"{k + ':':<26}{_fmt(v)}" for k, v in self.extra.items()]
        for title, rows in (("gradient norm", self.grad_norm_history), ("loss", self.loss_history)):
            lines += ["", f"recent {title} (step, value):"]
            lines += [f"  {int(s):>8}  {_fmt(float(v))}" for s, v in rows[-max_rows:]] or ["  (none recorded)"]
        lines += ["", "events:"]
        lines += [
            "  "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in ev.items() if not isinstance(v, (list, dict)))
            + "".join(f", {k}: {', '.join(map(str, v))}" for k, v in ev.items() if isinstance(v, list) and v)
            for ev in self.events[-max_rows:]
        ] or ["  (none)"]
        return "\n".join(lines) + "\n"

    def write(self, directory: str | os.PathLike, stem: str = "divergence_report") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.txt`` into ``directory`` (created if needed).

        Returns:
            The paths of the JSON and the text file.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        json_path, text_path = out / f"{stem}.json", out / f"{stem}.txt"
        json_path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        text_path.write_text(self.to_text())
        return json_path, text_path
