"""Gradient-health summary of finished runs, read back from their TensorBoard event files.

:func:`summarize` walks every run under a log directory (every folder that holds ``events.out.tfevents.*``) and
collects, for runs with and without gradguard alike, the training loss and the last value of every other metric, so
a guarded and an unguarded run sit side by side. From the gradguard tags it reads:

- ``gradguard/grad_norm`` (:class:`~lightning_gradguard.GradientNormMonitor`): percentiles of the pre-clip global
  norm at the logged steps (``gradguard/grad_norm_clipped`` when only the clipper ran), and
  ``gradguard/grad_norm_max``, the maximum over *every* step between two writes: the report's maximum is the true
  one even when a spike fell between two logged steps;
- ``gradguard/clipped_steps`` (count since the previous write; else the mean of ``gradguard/clip_fraction``) and
  ``gradguard/clip_threshold`` (:class:`~lightning_gradguard.AdaptiveGradientClipping`);
- ``gradguard/vanishing_layers``, ``gradguard/exploding_layers`` and the ``gradguard/layer_health_events`` text;
- ``gradguard/skipped_steps``, ``gradguard/rollbacks``, ``gradguard/flagged_steps``, ``gradguard/loss_max`` and the
  ``gradguard/nan_guard_events`` text (:class:`~lightning_gradguard.NaNGuard`), and the guard's halt report
  (``nan_guard_report.json``) when the run was halted;
- ``gradguard/spike_score`` (``gradguard/spike_score_opt<i>`` for further optimizers), the guard's spike score: the
  share of judged steps whose loss or gradient norm lay more than 6 standard deviations above the mean of the previous
  128 values (:mod:`lightning_gradguard.core.measure._spike_score`; a finite step is judged once 128 earlier values
  exist, a non-finite one always, as a spike).
  The score is cumulative, so the report takes its last logged value.

:func:`format_summary` renders it as text; :func:`plot_report` draws, per run, the overview figure the guard writes to
TensorBoard live (:mod:`lightning_gradguard.overview`): the gradient norm (its interval maximum too) against the clip
threshold, the loss (with ``gradguard/loss_max``, the largest loss between two logs, so a blow-up between them is
drawn), the learning rate and the clipped share, every guard event a coloured marker; non-finite values at the top
edge of their panel. :func:`draw_report` returns what each panel drew.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_gradguard.overview import OverviewData, OverviewPlot

__all__ = [
    "HealthSummary",
    "RunHealth",
    "draw_report",
    "event_kind",
    "find_runs",
    "format_summary",
    "overview_data",
    "percentile",
    "plot_report",
    "spike_phrase",
    "summarize",
]

PREFIX = "gradguard/"
LOSS_TAGS = ("train_loss_step", "train_loss", "loss", "train/loss")  # the first one present is the loss curve
HALT_REPORTS = ("nan_guard_report.json", "divergence_report.json")
_SIZE_GUIDANCE = {"scalars": 0, "tensors": 0, "histograms": 1, "images": 1, "compressedHistograms": 1}
# "step 150: ", "step 150 (optimizer 1): ", "NaNGuard rollback at step 100: ": the step is printed by the report
_STEP_PREFIX = re.compile(r"^\s*(?:step \d+(?: \(optimizer \d+\))?:|NaNGuard \w+ at step \d+:)\s*")
_EVENT_STEP = re.compile(r"at step (\d+)")
_SPIKE_TAG = re.compile(re.escape(PREFIX) + r"spike_score(?:_opt(\d+))?")
#: the spike score's definition (lightning_gradguard.core.measure._spike_score), in the report's words
SPIKE_RULE = "a spike: loss or gradient norm > mean + 6 sigma of the previous 128"


@dataclass
class RunHealth:
    """What one run (one event-file directory) wrote.

    Attributes:
        name: the run's path relative to the log directory.
        path: the run's directory.
        has_gradguard: whether any ``gradguard/`` tag was written.
        steps: the last step with any scalar.
        loss_tag, loss: the training-loss tag and its ``(step, value)`` pairs (empty without one).
        metrics: the last value of every other non-gradguard scalar (``val_mse``, ``epoch``, ...).
        grad_norm_tag, grad_norm: the pre-clip norm at logged steps (or the clipped one as a fallback).
        grad_norm_max: ``(step, value)``: the maximum norm over the steps since the previous write.
        clip_threshold, clip_fraction: the clipper's threshold and share of steps clipped per log.
        lr, lr_label: ``gradguard/lr`` (else the guard's ``gradguard/lr_scale``), and which of the two.
        loss_maxima: ``gradguard/loss_max``: the largest loss over the steps since the previous write.
        percentiles: p50/p90/p99 of the logged norms and ``max``, the largest norm of any step (from
            ``grad_norm_max`` when written).
        nonfinite_norms: logged norms (or interval maxima) that were NaN/inf.
        clip_rate: clipped steps / steps the clipper's writes cover (``clipped_steps`` / ``clip_fraction`` per
            write); else the mean of ``clip_fraction``; None without.
        clipped_steps, flagged_steps: totals of the per-interval counts (None without the tags).
        loss_max: the guard's largest loss over any step (None without ``gradguard/loss_max``).
        vanishing_max, exploding_max: the most layers flagged at once (None without the tag).
        layer_events: ``(step, text)`` from ``gradguard/layer_health_events``.
        skipped_steps, rollbacks: the guard's final counts (None without the tags).
        guard_events: ``(step, kind, text)`` from ``gradguard/nan_guard_events``; kind is one of skip, rollback,
            lower_lr, raise_lr, warn, halt (:func:`event_kind`; ``"event"`` for a line it cannot place).
        halt_report: the readable text of the guard's halt report, when the run was halted.
        spike_score: the last logged ``gradguard/spike_score`` (the first optimizer's): the share of judged steps
            whose loss or gradient norm spiked (6 standard deviations above the previous 128 values); None without
            the tag (no guard, or no step judged yet: a finite step is judged once 128 earlier values exist, a
            non-finite one always, as a spike).
        spike_scores: the last logged spike score of every optimizer (index -> score; ``_opt<i>`` tags for i >= 1).
        spike_score_step: the step of the last logged ``gradguard/spike_score`` (None without it).
        tags: every gradguard scalar tag found.
    """

    name: str
    path: str
    has_gradguard: bool = True
    steps: int = 0
    loss_tag: str | None = None
    loss: list[tuple[int, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    grad_norm_tag: str | None = None
    grad_norm: list[tuple[int, float]] = field(default_factory=list)
    grad_norm_max: list[tuple[int, float]] = field(default_factory=list)
    clip_threshold: list[tuple[int, float]] = field(default_factory=list)
    clip_fraction: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    lr_label: str = "learning rate"
    loss_maxima: list[tuple[int, float]] = field(default_factory=list)
    percentiles: dict[str, float] = field(default_factory=dict)
    nonfinite_norms: int = 0
    clip_rate: float | None = None
    clipped_steps: int | None = None
    flagged_steps: int | None = None
    loss_max: float | None = None
    vanishing_max: int | None = None
    exploding_max: int | None = None
    layer_events: list[tuple[int, str]] = field(default_factory=list)
    skipped_steps: int | None = None
    rollbacks: int | None = None
    guard_events: list[tuple[int, str, str]] = field(default_factory=list)
    halt_report: str | None = None
    spike_score: float | None = None
    spike_scores: dict[int, float] = field(default_factory=dict)
    spike_score_step: int | None = None
    tags: list[str] = field(default_factory=list)

    @property
    def has_guard(self) -> bool:
        """Whether the run carries NaNGuard's (or GradGuard's) scalars (the writers of the spike score)."""
        return self.skipped_steps is not None or self.rollbacks is not None or bool(self.spike_scores)


@dataclass
class HealthSummary:
    """Every run under one log directory."""

    logdir: str
    runs: list[RunHealth]

    @property
    def without_gradguard(self) -> list[str]:
        """Names of the runs that wrote no gradguard tag (summarised by their loss and metrics)."""
        return [r.name for r in self.runs if not r.has_gradguard]


def find_runs(logdir: str | Path) -> list[Path]:
    """Directories under ``logdir`` (itself included) that contain TensorBoard event files, sorted."""
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"log directory not found: {root}")
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of ``values``; q in [0, 100].

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([], 50)
        (2.5, nan)
    """
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def strip_step(text: str) -> str:
    """``text`` without its leading "step N:" or "NaNGuard <kind> at step N:" (the report prints the step itself).

    Example:
        >>> strip_step("step 150: exploding: rnn"), strip_step("NaNGuard rollback at step 100: loss spike")
        ('exploding: rnn', 'loss spike')
    """
    return _STEP_PREFIX.sub("", text, count=1)


#: words in an event line's head (before the first ":") -> the event kind, most specific first
_KIND_WORDS = (
    ("halt", "halt"),
    ("rollback", "rollback"),
    ("rolled back", "rollback"),
    ("lower_lr", "lower_lr"),
    ("lr cut", "lower_lr"),
    ("lowered", "lower_lr"),
    ("raise_lr", "raise_lr"),
    ("raised", "raise_lr"),
    ("warn", "warn"),
    ("skip", "skip"),
)


def event_kind(text: str) -> str:
    """The kind of a ``gradguard/nan_guard_events`` line, read from its head (before the first ``:``).

    Example:
        >>> event_kind("NaNGuard lower_lr at step 90: lr too high; ..."), event_kind("NaNGuard halt at step 3: x")
        ('lower_lr', 'halt')
        >>> event_kind("something else")
        'event'
    """
    head = text.split(":", 1)[0].lower()
    return next((kind for word, kind in _KIND_WORDS if word in head), "event")


def _texts(acc: Any, tag: str) -> list[tuple[int, str]]:
    return [
        (int(ev.step), raw.decode("utf-8", "replace")) for ev in acc.Tensors(tag) for raw in ev.tensor_proto.string_val
    ]


def _halt_report(path: Path) -> str | None:
    for name in HALT_REPORTS:
        found = path / name
        if found.is_file():
            from lightning_gradguard.core.recover._report import DivergenceReport

            try:
                return DivergenceReport.load(found).to_text().rstrip()
            except (ValueError, TypeError, KeyError) as e:  # a report from another version: say so, go on
                return f"(unreadable halt report {found}: {e})"
    return None


def _read_run(path: Path, logdir: Path) -> RunHealth | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance=_SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    all_scalars = {t: [(int(e.step), float(e.value)) for e in acc.Scalars(t)] for t in tags.get("scalars", [])}
    ours = {t: v for t, v in all_scalars.items() if t.startswith(PREFIX)}
    text_tags = [t for t in tags.get("tensors", []) if t.startswith(PREFIX)]
    if not all_scalars and not text_tags:
        return None
    name = str(path.relative_to(logdir)) if path != logdir else "."
    run = RunHealth(name=name, path=str(path), has_gradguard=bool(ours or text_tags), tags=sorted(ours))
    run.steps = max((s for v in all_scalars.values() for s, _ in v), default=0)
    run.loss_tag = next((t for t in LOSS_TAGS if t in all_scalars), None)
    run.loss = all_scalars.get(run.loss_tag, []) if run.loss_tag else []
    skip = {run.loss_tag, "hp_metric"}  # hp_metric: the TensorBoardLogger's placeholder
    run.metrics = {t: v[-1][1] for t, v in sorted(all_scalars.items()) if t not in ours and t not in skip and v}

    def series(short: str) -> list[tuple[int, float]]:
        return ours.get(PREFIX + short, [])

    run.grad_norm_tag = next((PREFIX + t for t in ("grad_norm", "grad_norm_clipped") if series(t)), None)
    run.grad_norm = ours.get(run.grad_norm_tag, []) if run.grad_norm_tag else []
    run.grad_norm_max = series("grad_norm_max")
    if run.grad_norm:
        finite = [v for _, v in run.grad_norm if math.isfinite(v)]
        tops = [v for _, v in run.grad_norm_max if math.isfinite(v)] or finite
        run.nonfinite_norms = len(run.grad_norm) - len(finite)
        run.nonfinite_norms = max(run.nonfinite_norms, len(run.grad_norm_max) - len(tops) if run.grad_norm_max else 0)
        if finite:
            run.percentiles = {q: percentile(finite, n) for q, n in (("p50", 50), ("p90", 90), ("p99", 99))}
            run.percentiles["max"] = max(tops + finite)
    run.clip_threshold, run.clip_fraction = series("clip_threshold"), series("clip_fraction")
    run.lr = series("lr")
    if not run.lr and series("lr_scale"):
        run.lr, run.lr_label = series("lr_scale"), "LR scale (x the schedule)"
    run.loss_maxima = series("loss_max")
    counts = {k: sum(v for _, v in series(k) if math.isfinite(v)) for k in ("clipped_steps", "flagged_steps")}
    if series("clipped_steps"):
        run.clipped_steps = int(counts["clipped_steps"])
        # steps each write covers: clipped / fraction (both written together); step distance where nothing was clipped
        fraction, covered, previous = dict(run.clip_fraction), 0, -1
        for step, count in series("clipped_steps"):
            share = fraction.get(step, 0.0)
            covered += round(count / share) if count > 0 and share > 0 else step - previous
            previous = step
        run.clip_rate = run.clipped_steps / covered if covered > 0 else None
    elif run.clip_fraction:
        fractions = [v for _, v in run.clip_fraction if math.isfinite(v)]
        run.clip_rate = sum(fractions) / len(fractions) if fractions else None
    if series("flagged_steps"):
        run.flagged_steps = int(counts["flagged_steps"])
    if series("loss_max"):  # the finite peak (a NaN interval is counted as non-finite, never as the peak)
        run.loss_max = max((v for _, v in series("loss_max") if math.isfinite(v)), default=math.nan)
    for short in ("vanishing_layers", "exploding_layers"):
        if series(short):
            setattr(run, short.split("_")[0] + "_max", int(max(v for _, v in series(short))))
    for short in ("skipped_steps", "rollbacks"):
        if series(short):
            setattr(run, short, int(series(short)[-1][1]))
    spike_tags = {int(m.group(1) or 0): v for t, v in ours.items() if v and (m := _SPIKE_TAG.fullmatch(t))}
    run.spike_scores = {idx: values[-1][1] for idx, values in sorted(spike_tags.items())}  # cumulative: the last
    if 0 in spike_tags:
        run.spike_score_step, run.spike_score = spike_tags[0][-1]
    for tag in text_tags:
        if tag.startswith(PREFIX + "layer_health_events"):
            run.layer_events += [(s, strip_step(t)) for s, t in _texts(acc, tag)]
        elif tag.startswith(PREFIX + "nan_guard_events"):
            for step, text in _texts(acc, tag):
                kind = event_kind(text)
                match = _EVENT_STEP.search(text)
                run.guard_events.append((int(match.group(1)) if match else step, kind, strip_step(text)))
    run.layer_events.sort()
    run.guard_events.sort()
    run.halt_report = _halt_report(path)
    return run


def summarize(logdir: str | Path) -> HealthSummary:
    """Read every run under ``logdir``: its loss and metrics, and its gradient health where gradguard logged it.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        ValueError: no event file under ``logdir`` holds any scalar.
    """
    root = Path(logdir)
    paths = find_runs(root)
    runs = [r for r in (_read_run(p, root) for p in paths) if r is not None]
    if not runs:
        found = f"{len(paths)} event-file folder(s), none with scalars" if paths else "no TensorBoard event files"
        raise ValueError(
            f"nothing to report under {root}: {found}. Train with a TensorBoardLogger (and GradientNormMonitor, "
            "AdaptiveGradientClipping or NaNGuard for the gradient data), or run `gradguard demo`."
        )
    return HealthSummary(logdir=str(root), runs=runs)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _run_lines(run: RunHealth) -> list[str]:
    lines = [f"run {run.name}: last step {run.steps}" + ("" if run.has_gradguard else " (no gradguard data)")]
    finite_loss = [v for _, v in run.loss if math.isfinite(v)]
    if run.loss:
        bad = len(run.loss) - len(finite_loss)
        top = [run.loss_max] if run.loss_max is not None and math.isfinite(run.loss_max) else []
        peak = max([*finite_loss, *top], default=math.nan)
        where = "over every step" if run.loss_max is not None else "at logged steps"
        lines.append(
            f"  loss ({run.loss_tag}): first {run.loss[0][1]:.4g}, last {run.loss[-1][1]:.4g}, peak {peak:.4g} {where}"
            + (f", {bad} non-finite" if bad else "")
        )
    if run.metrics:
        lines.append("  metrics (last): " + ", ".join(f"{k} {v:.4g}" for k, v in run.metrics.items()))
    if not run.has_gradguard:
        return lines
    if run.percentiles:
        p = run.percentiles
        label = "gradient norm" if run.grad_norm_tag == PREFIX + "grad_norm" else "clipped gradient norm"
        lines.append(
            f"  {label}: p50 {p['p50']:.4g}, p90 {p['p90']:.4g}, p99 {p['p99']:.4g} over {len(run.grad_norm)} "
            f"logged steps; max {p['max']:.4g} over every step"
            + (f"; {run.nonfinite_norms} non-finite" if run.nonfinite_norms else "")
        )
    else:
        lines.append("  gradient norm: not logged (add GradientNormMonitor)")
    if run.clip_rate is not None:
        thr = [v for _, v in run.clip_threshold if math.isfinite(v)]
        count = f" ({run.clipped_steps} steps)" if run.clipped_steps is not None else ""
        lines.append(
            f"  clip rate: {run.clip_rate:.1%} of steps clipped{count}"
            + (f", last threshold {thr[-1]:.4g}" if thr else "")
        )
    else:
        lines.append("  clip rate: n/a (no AdaptiveGradientClipping)")
    if run.vanishing_max is not None or run.exploding_max is not None:
        lines.append(
            f"  layers: at most {_fmt(run.vanishing_max)} vanishing, {_fmt(run.exploding_max)} exploding at once"
        )
    lines += [f"    step {step}: {text}" for step, text in run.layer_events[:10]]
    if len(run.layer_events) > 10:
        lines.append(f"    ... {len(run.layer_events) - 10} more layer-health events")
    if run.skipped_steps is not None or run.rollbacks is not None or run.guard_events:
        flagged = f", {run.flagged_steps} flagged" if run.flagged_steps is not None else ""
        lines.append(f"  NaNGuard: {_fmt(run.skipped_steps)} skipped steps, {_fmt(run.rollbacks)} rollbacks{flagged}")
        lines += [f"    step {step} {kind}: {text}" for step, kind, text in run.guard_events]
    lines += _spike_lines(run)
    if run.halt_report:
        lines.append("  halt report:")
        lines += [f"    {line}" if line else "" for line in run.halt_report.splitlines()]
    return lines


def spike_phrase(score: float) -> str:
    """A spike score in words: the share, and how often a judged step spiked.

    Example:
        >>> spike_phrase(0.004), spike_phrase(0.0)
        ('0.004 (1 in 250 judged steps spiked)', '0 (no judged step spiked)')
        >>> spike_phrase(3 / 232), spike_phrase(4e-5)
        ('0.01293 (1 in 77.3 judged steps spiked)', '4e-05 (1 in 25,000 judged steps spiked)')
    """
    if not math.isfinite(score) or score < 0:
        return f"{score:.4g}"
    if score == 0:
        return "0 (no judged step spiked)"
    every = 1 / score
    every_text = f"{every:.3g}" if every < 1000 else f"{every:,.0f}"  # no exponent: 1 in 25,000
    return f"{score:.4g} (1 in {every_text} judged steps spiked)"


def _spike_lines(run: RunHealth) -> list[str]:
    """The spike score, one line per optimizer (the rule on the first); without the tag, why it is missing."""
    if not run.spike_scores:
        if not run.has_guard:
            return ["  spike score: n/a (no NaNGuard)"]
        return ["  spike score: not logged (no step judged yet: a finite step is judged once 128 earlier values exist)"]
    lines: list[str] = []
    for idx, score in run.spike_scores.items():
        which = f" (optimizer {idx})" if idx else ""
        at = f" at step {run.spike_score_step}" if idx == 0 and run.spike_score_step is not None else ""
        rule = "" if lines else f"; {SPIKE_RULE}"
        lines.append(f"  spike score{which}: {spike_phrase(score)}{at}{rule}")
    return lines


def format_summary(summary: HealthSummary) -> str:
    """The summary as plain text, one block per run (runs without gradguard data show their loss and metrics)."""
    lines = [f"gradguard report for {summary.logdir} ({len(summary.runs)} run(s))"]
    for run in summary.runs:
        lines += ["", *_run_lines(run)]
    return "\n".join(lines)


def overview_data(run: RunHealth) -> OverviewData:
    """The overview figure's data of one run (what :func:`plot_report` draws for it)."""
    from lightning_gradguard.overview import OverviewData

    clipped = run.grad_norm_tag not in (None, PREFIX + "grad_norm")
    last = f"last step {run.steps}"
    if any(kind == "halt" for _, kind, _ in run.guard_events):
        last = f"halted at step {max(s for s, k, _ in run.guard_events if k == 'halt')}"
    return OverviewData(
        title=f"{run.name}: {last}" + ("" if run.has_gradguard else " (no gradguard data)"),
        grad_norm=list(run.grad_norm),
        grad_norm_label="grad norm at logged steps" + (" (clipped)" if clipped else ""),
        grad_norm_max=list(run.grad_norm_max),
        clip_threshold=list(run.clip_threshold),
        lr=list(run.lr),
        lr_label=run.lr_label,
        loss=list(run.loss),
        loss_label=run.loss_tag or "loss",
        loss_max=list(run.loss_maxima),
        clip_fraction=list(run.clip_fraction),
        events=[(step, kind) for step, kind, _ in run.guard_events],
        note="" if run.has_gradguard else "trained without gradguard: its loss is below",
    )


def draw_report(summary: HealthSummary, figure: Any = None) -> list[OverviewPlot]:
    """Draw every run's overview, one below the other, into ``figure`` (None: a new Agg figure, 800 x 600 px per
    run); returns each run's :class:`~lightning_gradguard.overview.OverviewPlot` (its panels and the data drawn).

    Raises:
        ImportError: matplotlib is missing (with an install hint).
    """
    from lightning_gradguard.overview import draw_overview

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_report needs matplotlib: pip install 'lightning-gradguard[examples]'") from e
    runs = summary.runs
    if figure is None:
        figure = Figure(figsize=(8.0, 6.0 * len(runs)), dpi=100)
        FigureCanvasAgg(figure)
    parts = figure.subfigures(len(runs), 1, squeeze=False)[:, 0]
    return [draw_overview(overview_data(run), part) for part, run in zip(parts, runs)]


def plot_report(summary: HealthSummary, png_path: str | Path) -> Path:
    """Per run, the overview figure (:func:`draw_report`): gradient norm and its interval maximum against the clip
    threshold, the loss with its interval maxima, the learning rate, the clipped share, a coloured marker per guard
    event; non-finite values at the top edge of their panel.

    Args:
        summary: from :func:`summarize`.
        png_path: where to write the PNG (parent folders are created).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing (with an install hint).
    """
    plots = draw_report(summary)
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots[0].figure.figure.savefig(out, dpi=100)
    return out
