"""FaultDrill: inject faults into your own training run and check that the gradguard callbacks handle each one.

Megatron's ``RerunErrorInjector`` and NVIDIA's resiliency extension inject faults to check that their diagnosis
works. :class:`FaultDrill` does the same for *your* model, data pipeline, precision and strategy: add it next to the
gradguard callbacks for a short rehearsal run, name the faults and the steps, and read the table it prints at the end
of the fit: what the guard did at each fault, and whether the loss was back to its pre-fault level ``recovery_steps``
later.

The recovery verdict compares means, never single losses: the mean finite loss of the ``recovery_steps // 5`` steps
(at least 5) before the fault (the *before* window) with the mean of as many steps ending ``recovery_steps`` after
the fault's last step (the *after* window). A fault is *recovered* when the after-mean is finite and at most
``tolerance`` x the before-mean, or no higher than the before-window's largest loss (its noise: on a converged run a
loss of 0.002 next to one of 0.004 is no setback). Steps where a fault was injected are left out of both windows.

**Several processes** (DDP, FSDP2 through ``ModelParallelStrategy``): faults are injected on every rank
(``rank=None``) or on one rank only (``rank=r``: a bit flip or a bad sample happens on one device; the guard agrees
across ranks, so every rank acts). The windows hold each rank's own losses during the fit; at the end of the fit one
all-reduce turns them into means over the ranks (and tells every rank which faults were injected somewhere), so the
verdicts, like the guard's events they are read from, are the same on every rank, and rank zero prints the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradguard.core._arg_checks import check_bool, check_int, check_number, is_integer, prefix

__all__ = ["FAULTS", "FaultDrill", "check_faults", "recovery_verdict"]

_OWNER = "FaultDrill"

#: the faults a drill can inject, with what each does (in the order the table lists them)
FAULTS: dict[str, str] = {
    "nan_batch": "NaN written into the first sample of every floating-point tensor of the batch (on_train_batch_start)",
    "inf_loss": "the loss returned by training_step multiplied by inf (once; a rerun of the step sees a clean loss)",
    "spike": "the loss returned by training_step multiplied by 1e4 (once)",
    "nan_weight": "NaN written in place into one element of the first trainable floating-point parameter (a sharded "
    "parameter: the first element of this rank's shard of the first parameter whose shard here is not empty)",
    "transient": "the first module with parameters outputs NaN once, in the step's own forward only (a bit flip)",
    "bad_batches": "NaN batches (as nan_batch) on several consecutive steps",
    "scale_collapse": "the fp16 GradScaler's loss scale set to 2**-30 (only with a GradScaler: precision '16-mixed')",
}

#: what a guard that works should do with each fault: (actions that handle it, the rerun diagnosis expected)
EXPECTED: dict[str, tuple[tuple[str, ...], str | None]] = {
    "nan_batch": (("skip",), "data"),
    "inf_loss": (("skip",), "transient"),
    "spike": (("clip", "skip", "rollback"), None),
    "nan_weight": (("rollback",), "state"),
    "transient": (("skip",), "transient"),
    "bad_batches": (("skip", "rollback"), "data"),
    "scale_collapse": (("skip", "rollback"), None),
}

SPIKE_FACTOR = 1e4
_NOT_DIAGNOSED = "not diagnosed"
_ELSEWHERE = "injected on rank "  # ``fired`` on the ranks that leave the injection to the drill's rank
#: the guard's event causes, root first: where ranks saw a fault differently (the rank with the NaN batch sees a
#: non-finite loss, the others the all-reduced non-finite gradients), the table names the first one any rank saw
CAUSE_ORDER = (
    "nonfinite_params",
    "nonfinite_buffers",
    "nonfinite_loss",
    "nonfinite_grad",
    "amp_scale_collapse",
    "loss_spike",
    "loss_divergence",
    "grad_divergence",
    "lr_too_high",
    "instability",
    "known_bad_batch",
    "dead_network",
    "other_rank",
)
COLLAPSED_SCALE = 2.0**-30  # below NaNGuard's default amp_scale_floor (2**-24)


def check_faults(faults: Any) -> dict[str, tuple[int, ...]]:
    """Validate a drill's ``faults`` argument; return ``{fault: steps}`` with sorted step tuples.

    Each key is a name from :data:`FAULTS`; each value an optimizer step (an int >= 0) or a sequence of steps.
    ``bad_batches`` takes consecutive steps (at least two; an int ``k`` means ``(k, k + 1, k + 2)``) and is one
    episode; the other faults are injected once at each step given. No two faults may share a step (the table would
    not know which the guard answered), and ``scale_collapse`` needs a step >= 1 (the GradScaler's scale exists from
    the first step on).

    Raises:
        TypeError: ``faults`` is not a mapping, a key is not a string, or a step is not an int.
        ValueError: an unknown fault name, no faults, a negative step, an empty or non-consecutive ``bad_batches``,
            or two faults at one step.

    Example:
        >>> check_faults({"nan_batch": 30, "transient": [50, 90], "bad_batches": 60})
        {'nan_batch': (30,), 'transient': (50, 90), 'bad_batches': (60, 61, 62)}
        >>> check_faults({"nan": 3})
        Traceback (most recent call last):
        ...
        ValueError: FaultDrill: faults has an unknown fault 'nan'; the faults are 'nan_batch', 'inf_loss', 'spike', \
'nan_weight', 'transient', 'bad_batches', 'scale_collapse'
    """
    allowed = ", ".join(repr(n) for n in FAULTS)
    if not isinstance(faults, Mapping):
        raise TypeError(
            f"{prefix(_OWNER)}faults must be a mapping of fault name to step(s), e.g. {{'nan_batch': 30, "
            f"'bad_batches': (180, 181, 182)}}, got {type(faults).__name__} ({faults!r})"
        )
    if not faults:
        raise ValueError(f"{prefix(_OWNER)}faults is empty; name at least one of {allowed}")
    out: dict[str, tuple[int, ...]] = {}
    owner_of: dict[int, str] = {}
    for name, value in faults.items():
        if not isinstance(name, str):
            raise TypeError(f"{prefix(_OWNER)}faults keys must be fault names (str), got {type(name).__name__}")
        if name not in FAULTS:
            raise ValueError(f"{prefix(_OWNER)}faults has an unknown fault {name!r}; the faults are {allowed}")
        where = f"faults[{name!r}]"
        if is_integer(value):
            steps = [int(value)] if name != "bad_batches" else [int(value) + i for i in range(3)]
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            if not value:
                raise ValueError(f"{prefix(_OWNER)}{where} must name at least one step, got {value!r}")
            bad = [v for v in value if not is_integer(v)]
            if bad:
                raise TypeError(
                    f"{prefix(_OWNER)}{where} must hold int steps, got {type(bad[0]).__name__} ({bad[0]!r})"
                )
            steps = sorted(int(v) for v in value)
        else:
            raise TypeError(
                f"{prefix(_OWNER)}{where} must be a step (an int >= 0) or a list of steps, got "
                f"{type(value).__name__} ({value!r})"
            )
        low = 1 if name == "scale_collapse" else 0
        if steps[0] < low:
            why = " (the GradScaler's scale exists from the first step on)" if low else ""
            raise ValueError(f"{prefix(_OWNER)}{where} steps must be >= {low}{why}, got {steps[0]}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"{prefix(_OWNER)}{where} names a step twice: {value!r}")
        if name == "bad_batches" and (len(steps) < 2 or steps != list(range(steps[0], steps[0] + len(steps)))):
            raise ValueError(
                f"{prefix(_OWNER)}{where} must be at least two consecutive steps (or one int k: k, k+1, k+2), "
                f"got {value!r}"
            )
        for s in steps:
            if s in owner_of:
                raise ValueError(
                    f"{prefix(_OWNER)}faults {owner_of[s]!r} and {name!r} are both at step {s}; give each fault its "
                    "own step (the table could not tell which one the guard answered)"
                )
            owner_of[s] = name
        out[name] = tuple(steps)
    return out


def recovery_bar(before: Sequence[float], tolerance: float) -> float | None:
    """The loss a recovered run is back under: the larger of ``tolerance`` x the mean of ``before`` and the largest
    value of ``before`` (its own noise: a window of losses is as high as its worst step), finite values only; None
    without any.

    Example:
        >>> recovery_bar([1.0, 0.8], tolerance=1.1), recovery_bar([0.002, 0.006], tolerance=1.1)
        (1.0, 0.006)
    """
    clean = [v for v in before if math.isfinite(v)]
    if not clean:
        return None
    return max(tolerance * sum(clean) / len(clean), max(clean))


def recovery_verdict(before: Sequence[float], after: Sequence[float], tolerance: float) -> bool | None:
    """Whether the loss came back: the mean of ``after`` is finite and at most :func:`recovery_bar` of ``before``
    (any non-finite value in ``after`` is not recovered).

    Returns None when either window is empty (the run ended too early, or began too late, to tell).

    Example:
        >>> recovery_verdict([1.0, 0.8], [0.7, 0.9], tolerance=1.1), recovery_verdict([1.0, 0.8], [1.2, 1.1], 1.1)
        (True, False)
        >>> recovery_verdict([1.0, 0.8], [0.7, float("nan")], tolerance=1.1), recovery_verdict([1.0], [], 1.1)
        (False, None)
    """
    bar = recovery_bar(before, tolerance)
    if bar is None or not after:
        return None
    if not all(math.isfinite(v) for v in after):
        return False
    return sum(after) / len(after) <= bar


@dataclass
class DrillRow:
    """One injected fault and what came of it (a row of :meth:`FaultDrill.table`, as a dict).

    Attributes:
        fault: the fault's name (:data:`FAULTS`).
        step: the optimizer step it was injected at (the first one for ``bad_batches``).
        steps: every step it was injected at.
        injected: whether it was injected (False: the run ended first, or it does not apply; see ``note``).
        guard: what the guard did, e.g. ``"skip (nonfinite_loss, diagnosis data)"``; "clipped x3.1e-05" for a
            spike the clipper cut; "nothing" when no event and no clip.
        kinds: the NaNGuard event kinds at the fault's steps (``"clip"`` added when the clipper clipped there).
        cause, diagnosis: of the first NaNGuard event at the fault's steps (None: none).
        expected: what a working guard does: the actions and the diagnosis (:data:`EXPECTED`).
        as_expected: the guard acted as expected (None: not injected, or no diagnosis to compare: rerun off, or the
            right action without a diagnosis; the table then says "not diagnosed").
        loss_before, loss_after: the two window means (None: unknown).
        loss_bar: the after-mean a recovered run is under (:func:`recovery_bar`).
        recovered: :func:`recovery_verdict` (None: the run ended before the after-window).
        handled: injected, acted on (an event or a clip at every injected step) and recovered.
        note: why not injected, or anything else to know.
    """

    fault: str
    step: int
    steps: tuple[int, ...]
    injected: bool = False
    guard: str = "nothing"
    kinds: tuple[str, ...] = ()
    cause: str | None = None
    diagnosis: str | None = None
    expected: str = ""
    as_expected: bool | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    loss_bar: float | None = None
    recovered: bool | None = None
    handled: bool = False
    note: str = ""


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def _as_expected_cell(row: Mapping[str, Any]) -> str:
    if row["as_expected"] is None and str(row.get("note", "")).startswith(_NOT_DIAGNOSED):
        return _NOT_DIAGNOSED
    return _yes_no(row["as_expected"])


def _loss_cell(before: float | None, after: float | None, bar: float | None) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:.3g} -> {after:.3g} (bar {bar:.3g})" if bar is not None else f"{before:.3g} -> {after:.3g}"


def format_table(
    rows: Sequence[Mapping[str, Any]], recovery_steps: int, other_events: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The drill's rows as a plain-text table (what :meth:`FaultDrill.report` returns), with notes under it and a
    line on the guard's events at steps without a fault (``other_events``)."""
    header = ("fault", "step", "guard did", "expected", "as expected", f"loss before -> +{recovery_steps}", "recovered")
    lines, notes = [], []
    for r in rows:
        steps = r["steps"]
        step = str(r["step"]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        if r["note"]:
            notes.append(f"  {r['fault']} at {step}: {r['note']}")
        lines.append(
            (
                r["fault"],
                step,
                r["guard"] if r["injected"] else "not injected (see below)",
                r["expected"],
                _as_expected_cell(r),
                _loss_cell(r["loss_before"], r["loss_after"], r.get("loss_bar")),
                _yes_no(r["recovered"]) if r["injected"] else "-",
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row).rstrip() for row in lines]
    handled = sum(1 for r in rows if r["handled"])
    injected = sum(1 for r in rows if r["injected"])
    out.append(
        f"{handled} of {injected} injected faults handled (the guard acted at the fault and the loss was back "
        f"within {recovery_steps} steps)"
    )
    out += notes
    if other_events:
        shown = ", ".join(f"{e.get('step')} {e.get('kind')} ({e.get('cause')})" for e in other_events[:5])
        more = f" and {len(other_events) - 5} more" if len(other_events) > 5 else ""
        out.append(f"The guard also acted at {len(other_events)} steps without an injected fault: {shown}{more}")
    return "\n".join(out)


class FaultDrill(Callback):
    r"""Inject faults into this training run at chosen steps, and report what the gradguard callbacks did.

    Use it for a short rehearsal before a long run, with the callbacks, model, data, precision and strategy of the
    real one. Faults (:data:`FAULTS`):

    | Fault | What is injected |
    |---|---|
    | ``nan_batch`` | NaN in the first sample of each floating-point tensor of the batch (written in place) |
    | ``inf_loss`` | the loss from ``training_step`` x inf, once (a rerun sees the clean loss) |
    | ``spike`` | the loss from ``training_step`` x 1e4, once |
    | ``nan_weight`` | NaN written into one element of the first trainable floating-point parameter |
    | ``transient`` | the first module with parameters outputs NaN once, in the step's own forward only |
    | ``bad_batches`` | NaN batches on consecutive steps |
    | ``scale_collapse`` | the GradScaler's scale set to 2**-30; skipped with a warning without a GradScaler |

    The loss faults wrap the module's ``training_step`` for the fit (an instance attribute, removed at teardown);
    the others act in ``on_train_batch_start`` of the first micro-batch of the fault step. After the fit (or when it
    stops with an exception) :meth:`table` holds one row per fault (:class:`DrillRow` as a dict) and, with
    ``print_report``, rank zero prints :meth:`report`. A fault is *handled* when the guard acted at each of its
    steps (a NaNGuard event, or for any fault a clip by AdaptiveGradientClipping) and the loss was back to its
    pre-fault level ``recovery_steps`` later (:func:`recovery_verdict`). The row also says whether the action and the
    guard's rerun diagnosis are the expected ones (a NaN batch: skipped, *data*; a NaN weight: rolled back, *state*;
    a transient corruption or an inf loss: skipped, *transient*).

    The batch is written in place: a DataLoader's collate makes fresh tensors, but a dataset that hands out views of
    its own storage (``batch_size=None`` over an in-memory tensor) keeps the NaN. The drill reads one loss per step
    only in the windows it compares (a host read there, none elsewhere).

    Under DDP or FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), ``rank=None`` injects each fault on every
    rank and ``rank=r`` on rank ``r`` only (the batch, the loss, the forward hook and the weight of that rank; a
    sharded weight gets its NaN in that rank's local shard). The guard agrees across ranks, so every rank acts at
    the fault either way. At the end of the fit the ranks agree in one all-reduce: the window means are means over
    the ranks' losses, a fault counts as injected when a rank injected it, and where the ranks' guards name the
    cause differently (a non-finite loss on the faulty rank, non-finite gradients on the others) the root one is
    kept (:data:`CAUSE_ORDER`); the table is then the same on every rank. A fit that stops with an exception builds
    its table from this rank's own values (no collective there).

    Args:
        faults: ``{fault: step or list of steps}``; see :func:`check_faults` (e.g.
            ``{"nan_batch": 30, "inf_loss": 60, "spike": 90, "nan_weight": 120, "transient": 150,
            "bad_batches": [180, 181, 182]}``). Steps are the Trainer's ``global_step``.
        recovery_steps: N: the loss N steps after a fault is compared with the loss before it (>= 5).
        tolerance: the after-mean may be this many times the before-mean (or as high as the before-window's largest
            loss) and still count as recovered (>= 1); see :func:`recovery_bar`.
        print_report: print the table on rank zero at the end of the fit.
        rank: inject on this global rank only (an int >= 0, below the world size); None: on every rank.

    Raises:
        TypeError, ValueError: a bad argument (at construction), naming it and the allowed fault names.

    Example:
        >>> drill = FaultDrill({"nan_batch": 30, "transient": 60, "bad_batches": (90, 91, 92)})
        >>> drill.faults
        {'nan_batch': (30,), 'transient': (60,), 'bad_batches': (90, 91, 92)}
        >>> drill.table()[0]["fault"], drill.table()[0]["injected"]
        ('nan_batch', False)
    """

    def __init__(
        self,
        faults: dict[str, int | list[int]],
        recovery_steps: int = 50,
        tolerance: float = 1.1,
        print_report: bool = True,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        self.faults = check_faults(faults)
        if not is_integer(recovery_steps):
            raise TypeError(
                f"{prefix(_OWNER)}recovery_steps must be an int >= 5, got {type(recovery_steps).__name__} "
                f"({recovery_steps!r})"
            )
        if recovery_steps < 5:
            raise ValueError(f"{prefix(_OWNER)}recovery_steps must be an int >= 5, got {recovery_steps!r}")
        self.recovery_steps = int(recovery_steps)
        self.tolerance: float = check_number("tolerance", tolerance, low=1.0, owner=_OWNER)  # type: ignore[assignment]
        self.print_report = check_bool("print_report", print_report, owner=_OWNER)
        self.rank: int | None = check_int("rank", rank, 0, True, owner=_OWNER)
        self._at: dict[int, str] = {s: name for name, steps in self.faults.items() for s in steps}
        #: the table's rows in step order: (fault, steps); bad_batches is one episode, the others one row per step
        self.episodes: list[tuple[str, tuple[int, ...]]] = sorted(
            [(name, steps) for name, steps in self.faults.items() if name == "bad_batches"]
            + [(name, (s,)) for name, steps in self.faults.items() if name != "bad_batches" for s in steps],
            key=lambda e: e[1][0],
        )
        self._window = max(5, self.recovery_steps // 5)
        self._wanted = self._loss_steps()
        self.losses: dict[int, float] = {}  # step -> loss, only in the compared windows
        self.fired: dict[int, str] = {}  # step -> what was done ("" = injected; else why not)
        self.clips: dict[int, float] = {}  # fault step -> the clipper's coefficient there (clipped steps only)
        self._sums: dict[int, float] = {}
        self._step = -1
        self._original_step: Callable[..., Any] | None = None
        self._module: pl.LightningModule | None = None
        self._hook: Any = None
        self._skip_collapse = ""
        self._guard: Any = None
        self._clipper: Any = None
        self._rows: list[dict[str, Any]] | None = None
        self._last_step = -1
        self._here = True  # this process injects (rank None, or this is the drill's rank)
        #: after the end-of-fit all-reduce: the window losses (means over ranks) and the steps injected on some rank
        self._agreed: tuple[dict[int, float], set[int], dict[int, str]] | None = None

    # ------------------------------------------------------------------ the windows
    def _loss_steps(self) -> set[int]:
        """The steps whose loss the table compares (read from the host there only)."""
        wanted: set[int] = set()
        for _, steps in self.episodes:
            before, after = self._windows(steps)
            wanted.update(before, after)
        return wanted

    def _windows(self, steps: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """The before- and after-window of a fault at ``steps`` (fault steps left out)."""
        n, w = self.recovery_steps, self._window
        before = [s for s in range(max(0, steps[0] - w), steps[0]) if s not in self._at]
        after = [s for s in range(steps[-1] + n - w + 1, steps[-1] + n + 1) if s not in self._at]
        return before, after

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(faults=sorted(self.faults.items()))

    def state_dict(self) -> dict[str, Any]:
        return {"losses": dict(self.losses), "fired": dict(self.fired), "clips": dict(self.clips)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = {int(k): float(v) for k, v in state_dict.get("losses", {}).items()}
        self.fired = {int(k): str(v) for k, v in state_dict.get("fired", {}).items()}
        self.clips = {int(k): float(v) for k, v in state_dict.get("clips", {}).items()}

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_gradguard.callbacks.adaptive_gradient_clipping import AdaptiveGradientClipping
        from lightning_gradguard.callbacks.nan_guard import NaNGuard

        world = int(getattr(trainer, "world_size", 1) or 1)
        if self.rank is not None and self.rank >= world:
            raise ValueError(
                f"{prefix(_OWNER)}rank must be below the world size ({world}) or None (every rank), got {self.rank}"
            )
        self._here = self.rank is None or int(trainer.global_rank) == self.rank
        if not getattr(pl_module, "automatic_optimization", True):
            raise ValueError(
                f"{prefix(_OWNER)}needs automatic optimization: under manual optimization "
                "(automatic_optimization=False) training_step has already run its backward and optimizer steps when "
                "it returns, so the drill's loss faults (inf_loss, spike) would never reach the gradients, and its "
                "windows count optimizer steps that advance by one per optimizer. Drill a copy of the module with "
                "automatic optimization, or inject faults in your own training_step."
            )
        callbacks = getattr(trainer, "callbacks", [])
        self._guard = next((cb for cb in callbacks if isinstance(cb, NaNGuard)), None)
        self._clipper = next((cb for cb in callbacks if isinstance(cb, AdaptiveGradientClipping)), None)
        if self._guard is None:
            rank_zero_warn(
                "FaultDrill: no NaNGuard among the Trainer's callbacks; the drill injects faults that nothing will "
                "handle (add lightning_gradguard.default_callbacks() or a NaNGuard)."
            )
        if any(name in self.faults for name in ("inf_loss", "spike")):
            self._wrap_training_step(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = self._agreed = None
        self._skip_collapse = ""
        if "scale_collapse" in self.faults and self._scaler(trainer) is None:
            self._skip_collapse = (
                f"no GradScaler (precision {trainer.precision!r}); a loss-scale collapse needs precision='16-mixed' "
                "(on CPU also plugins=[MixedPrecision('16-mixed', 'cpu')])"
            )
            rank_zero_warn(f"FaultDrill: scale_collapse is skipped: {self._skip_collapse}.")
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps >= 0:
            late = [f"{name} at {s}" for s, name in sorted(self._at.items()) if s >= max_steps]
            short = [
                name for name, steps in self.faults.items() if steps[-1] < max_steps <= steps[-1] + self.recovery_steps
            ]
            if late:
                rank_zero_warn(f"FaultDrill: max_steps={max_steps} ends the fit before {', '.join(late)}.")
            if short:
                rank_zero_warn(
                    f"FaultDrill: max_steps={max_steps} ends the fit within recovery_steps={self.recovery_steps} of "
                    f"{', '.join(short)}: their recovery cannot be judged."
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap_training_step()
        self._remove_hook()

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    # ------------------------------------------------------------------ the loss faults: a training_step wrapper
    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        if self._original_step is not None:
            return
        original = pl_module.training_step
        drill = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            factor = drill._loss_factor(pl_module)
            return out if factor is None else _scale_loss(out, factor)

        self._original_step, self._module = original, pl_module
        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _unwrap_training_step(self) -> None:
        module = self._module
        if module is not None and "training_step" in module.__dict__:
            del module.training_step
        self._original_step = self._module = None

    def _loss_factor(self, pl_module: pl.LightningModule) -> float | None:
        """The factor for this call of training_step: once per fault step (its first call; never a rerun's)."""
        step = pl_module.trainer.global_step if pl_module._trainer is not None else -1
        name = self._at.get(step)
        if name not in ("inf_loss", "spike") or step in self.fired:
            return None
        if not self._here:
            self.fired[step] = self._elsewhere()
            return None
        self.fired[step] = ""
        return math.inf if name == "inf_loss" else SPIKE_FACTOR

    def _elsewhere(self) -> str:
        """What ``fired`` holds on a rank that leaves the injection to the drill's rank."""
        return f"{_ELSEWHERE}{self.rank}"

    # ------------------------------------------------------------------ the other faults, before the forward
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        step = trainer.global_step
        if step != self._step:
            self._step = step
            self._sums.pop(step, None)
        name = self._at.get(step)
        if name is None or name in ("inf_loss", "spike") or step in self.fired:
            return
        if name == "scale_collapse" and self._skip_collapse:
            self.fired[step] = self._skip_collapse  # the same reason on every rank
        elif not self._here:
            self.fired[step] = self._elsewhere()
        elif name in ("nan_batch", "bad_batches"):
            self.fired[step] = "" if _nan_into_batch(batch) else "the batch holds no floating-point tensor"
        elif name == "nan_weight":
            self.fired[step] = (
                "" if _nan_into_weight(pl_module) else "no trainable floating-point parameter (with elements here)"
            )
        elif name == "transient":
            self.fired[step] = "" if self._arm_transient(pl_module) else "no module with parameters"
        elif name == "scale_collapse":
            self.fired[step] = self._collapse_scale(trainer)

    def _arm_transient(self, pl_module: pl.LightningModule) -> bool:
        target = next((m for m in pl_module.modules() if m is not pl_module and _own_params(m)), None)
        if target is None:
            target = pl_module if _own_params(pl_module) else None
        if target is None:
            return False

        def corrupt_once(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            if not torch.is_grad_enabled():  # a no-grad replay (the guard's fault trace) is not the step's forward
                return output
            self._remove_hook()
            return apply_to_collection(output, torch.Tensor, _nan_like)

        self._remove_hook()
        self._hook = target.register_forward_hook(corrupt_once)
        return True

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _collapse_scale(self, trainer: pl.Trainer) -> str:
        if self._skip_collapse:
            return self._skip_collapse
        scaler = self._scaler(trainer)
        if scaler is None or getattr(scaler, "_scale", None) is None:
            return "the GradScaler has no scale yet"
        scaler.update(new_scale=COLLAPSED_SCALE)  # as a run of overflows would leave it
        return ""

    # ------------------------------------------------------------------ after the step
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hook()  # a transient corruption never outlives its step
        step = self._step
        self._last_step = max(self._last_step, step)
        if step in self._at and self._clipper is not None:
            record = self._clipper.last.get(0)
            if record is not None and bool(record.clipped) and record.coefficient is not None:
                self.clips[step] = float(record.coefficient)
        if step not in self._wanted:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._sums[step] = self._sums.get(step, 0.0) + float(loss.detach().float())  # host read: windows only
            self.losses[step] = self._sums[step]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._agree(trainer)
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(trainer)  # no collective: the other ranks may not be here; this rank's own values

    def _agree(self, trainer: pl.Trainer) -> None:
        """Every rank's window losses and injections, agreed in one all-reduce (every rank reaches the end of the
        fit at the same step): each window loss becomes the mean over the ranks that have it (NaN anywhere: NaN),
        a fault step counts as injected when some rank injected it, and each fault's cause is the first of
        :data:`CAUSE_ORDER` that a rank's guard gave it. Without several processes: as they are."""
        steps, faults = sorted(self._wanted), sorted(self._at)
        firsts = [self._first_event(episode) for _, episode in self.episodes]
        causes = [(e or {}).get("cause") for e in firsts]
        values = [self.losses.get(s, 0.0) for s in steps]
        values += [float(s in self.losses) for s in steps] + [float(self.fired.get(s) == "") for s in faults]
        values += [float(c == known) for c in causes for known in CAUSE_ORDER]
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
            local = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
            values = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        n, k = len(steps), len(faults)
        sums, counts, injected = values[:n], values[n : 2 * n], values[2 * n : 2 * n + k]
        seen = values[2 * n + k :]
        losses = {s: v / c for s, v, c in zip(steps, sums, counts) if c > 0}
        agreed_causes = {}
        for i, cause in enumerate(causes):
            row = seen[i * len(CAUSE_ORDER) : (i + 1) * len(CAUSE_ORDER)]
            agreed = next((known for known, count in zip(CAUSE_ORDER, row) if count > 0), cause)
            if agreed:
                agreed_causes[self.episodes[i][1][0]] = agreed
        self._agreed = losses, {s for s, v in zip(faults, injected) if v > 0}, agreed_causes

    def _first_event(self, steps: tuple[int, ...]) -> dict[str, Any] | None:
        """The guard's first event (warnings aside) at one of ``steps``; None: none."""
        events = getattr(self._guard, "events", None) or []
        return next((e for e in events if e.get("step") in steps and e.get("kind") != "warn"), None)

    def _finish(self, trainer: pl.Trainer) -> None:
        self._rows = self._build_rows()
        if self.print_report and trainer.is_global_zero:
            print("\n" + self.report(), flush=True)

    # ------------------------------------------------------------------ the table
    def _build_rows(self) -> list[dict[str, Any]]:
        events = list(getattr(self._guard, "events", []) or [])
        rows = []
        rerun = getattr(self._guard, "rerun", True)
        causes: dict[int, str] = {}
        if self._agreed is not None:
            losses, injected, causes = self._agreed
        else:  # during the fit, or after an exception: this rank's own values
            losses = self.losses
            injected = {s for s, why in self.fired.items() if why == "" or why.startswith(_ELSEWHERE)}
        for name, steps in self.episodes:
            row = DrillRow(fault=name, step=steps[0], steps=steps)
            actions, diagnosis = EXPECTED[name]
            row.expected = "/".join(actions) + (f", {diagnosis}" if diagnosis else "")
            done = [s for s in steps if s in injected]
            row.injected = bool(done)
            if not row.injected:
                why = [
                    self.fired[s] if not self.fired[s].startswith(_ELSEWHERE) else f"rank {self.rank} did not inject it"
                    for s in steps
                    if s in self.fired
                ]
                row.note = (
                    why[0] if why else (self._skip_collapse or "not reached (the fit ended first, or has not begun)")
                )
                rows.append(asdict(row))
                continue
            if len(done) < len(steps):
                row.note = f"injected at {len(done)} of {len(steps)} steps"
            at = [e for e in events if e.get("step") in done and e.get("kind") != "warn"]
            clipped = [s for s in done if s in self.clips]
            acted = all(any(e["step"] == s for e in at) or s in self.clips for s in done)
            kinds = list(dict.fromkeys(e["kind"] for e in at))
            if clipped:
                kinds.append("clip")
            row.kinds = tuple(kinds)
            parts = []
            if at:
                first = at[0]
                row.cause = causes.get(steps[0]) or first.get("cause") or None
                row.diagnosis = first.get("diagnosis")
                extras = (
                    row.cause,
                    f"diagnosis {row.diagnosis}" if row.diagnosis else "",
                    f"to step {first['snapshot_step']}" if first.get("snapshot_step") is not None else "",
                    f"lr_scale {first['lr_scale']:.3g}" if first.get("lr_scale", 1.0) != 1.0 else "",
                )
                detail = ", ".join(x for x in extras if x)
                counted = "" if len(at) == 1 else f" x{len(at)}"
                parts.append(f"{first['kind']}{counted} ({detail})" if detail else first["kind"] + counted)
            if clipped:
                parts.append(f"clipped x{min(self.clips[s] for s in clipped):.2g}")
            row.guard = "; ".join(parts) or ("nothing" if self._guard is not None else "nothing (no NaNGuard)")
            if not kinds:
                row.as_expected = False
            elif diagnosis is not None and row.diagnosis is None and not rerun:
                row.as_expected = None  # the guard's rerun diagnosis is off: nothing to compare
                row.note = "NaNGuard(rerun=False): no diagnosis to compare"
            elif diagnosis is not None and row.diagnosis is None and any(k in actions for k in kinds):
                # the right action, but no diagnosis (a rerun that could not run): nothing to compare
                row.as_expected = None
                row.note = f"{_NOT_DIAGNOSED}: the right action, but the guard gave no diagnosis ({diagnosis} expected)"
            else:
                row.as_expected = any(k in actions for k in kinds) and diagnosis in (None, row.diagnosis)
            before, after = self._windows(tuple(done))
            before_v = [losses[s] for s in before if s in losses]
            after_v = [losses[s] for s in after if s in losses]
            if len(after_v) < len(after):
                after_v = []  # the run ended inside the window: not enough to judge
            row.recovered = recovery_verdict(before_v, after_v, self.tolerance)
            finite_before = [v for v in before_v if math.isfinite(v)]
            row.loss_before = sum(finite_before) / len(finite_before) if finite_before else None
            row.loss_after = sum(after_v) / len(after_v) if after_v else None
            row.loss_bar = recovery_bar(before_v, self.tolerance)
            if row.recovered is None and not row.note:
                row.note = "the fit ended before the loss could be compared"
            row.handled = acted and row.recovered is True
            rows.append(asdict(row))
        return rows

    def table(self) -> list[dict[str, Any]]:
        """One row per fault (:class:`DrillRow` fields as a dict), in the order of ``faults``; before the end of the
        fit, the rows so far (faults not yet reached say ``injected: False``)."""
        return self._rows if self._rows is not None else self._build_rows()

    def other_events(self) -> list[dict[str, Any]]:
        """The guard's events (warnings aside) at steps where the drill injected nothing: false alarms, or the
        aftermath of a fault (a rollback's LR cut later undone, a batch the guard keeps skipping)."""
        events = getattr(self._guard, "events", None) or []
        return [e for e in events if e.get("step") not in self._at and e.get("kind") != "warn"]

    def report(self) -> str:
        """The table as printable text: a row per fault, a line counting the handled ones, notes, and the guard's
        events at steps without a fault."""
        return "FaultDrill: what the guard did with each injected fault\n" + format_table(
            self.table(), self.recovery_steps, self.other_events()
        )

    @property
    def all_handled(self) -> bool:
        """Every fault that was injected was handled, and at least one was injected."""
        rows = [r for r in self.table() if r["injected"]]
        return bool(rows) and all(r["handled"] for r in rows)


def _own_params(module: torch.nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return t * math.nan if t.is_floating_point() else t


def _nan_into_batch(batch: Any) -> bool:
    """Write NaN into the first sample of every floating-point tensor of ``batch`` (in place); whether any was."""
    written = []

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.numel():
            with torch.no_grad():
                (t[0] if t.dim() else t).fill_(math.nan)
            written.append(True)
        return t

    apply_to_collection(batch, torch.Tensor, poison)
    return bool(written)


def _nan_into_weight(pl_module: pl.LightningModule) -> bool:
    """NaN into the first element of the first trainable floating-point parameter (in place). A sharded parameter
    (an FSDP2 ``DTensor``) gets it in this rank's local shard: the first parameter whose shard here is not empty
    (an uneven split leaves some ranks an empty piece), its first local element; the next forward gathers it."""
    for p in pl_module.parameters():
        if not (p.requires_grad and p.is_floating_point()):
            continue
        to_local = getattr(p, "to_local", None)  # a DTensor's own piece (a view of the sharded storage)
        local = to_local() if callable(to_local) else p
        if local.numel():
            with torch.no_grad():
                local[(0,) * local.dim()] = math.nan
            return True
    return False


def _scale_loss(out: Any, factor: float) -> Any:
    """``training_step``'s output with its loss multiplied by ``factor`` (a tensor, or a mapping with ``"loss"``)."""
    if isinstance(out, torch.Tensor):
        return out * factor
    if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        return {**out, "loss": out["loss"] * factor}
    return out
