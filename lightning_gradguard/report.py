"""Gradient-health summary of finished runs, read back from their TensorBoard event files.

:func:`summarize` walks every run under a log directory (every folder that holds ``events.out.tfevents.*``) and
collects what the gradguard callbacks wrote:

- ``gradguard/grad_norm`` (:class:`~lightning_gradguard.GradientNormMonitor`): percentiles of the pre-clip global
  gradient norm (falls back to ``gradguard/grad_norm_clipped`` when only the clipping callback ran);
- ``gradguard/clip_fraction`` and ``gradguard/clip_threshold`` (:class:`~lightning_gradguard.AdaptiveGradientClipping`):
  the clip rate and the threshold over time;
- ``gradguard/vanishing_layers``, ``gradguard/exploding_layers`` and the ``gradguard/layer_health_events`` text;
- ``gradguard/skipped_steps``, ``gradguard/rollbacks`` and the ``gradguard/nan_guard_events`` text
  (:class:`~lightning_gradguard.NaNGuard`).

:func:`format_summary` renders it as text and :func:`plot_report` draws the gradient norm and the clip threshold
over steps (log scale) with a vertical line at every skip and rollback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HealthSummary", "RunHealth", "find_runs", "format_summary", "plot_report", "summarize"]

PREFIX = "gradguard/"
_SIZE_GUIDANCE = {"scalars": 0, "tensors": 0, "histograms": 1, "images": 1, "compressedHistograms": 1}
_EVENT_STEP = re.compile(r"at step (\d+)")


@dataclass
class RunHealth:
    """The gradguard data of one run (one event-file directory).

    Attributes:
        name: the run's path relative to the log directory.
        path: the run's directory.
        steps: the last step with any gradguard scalar.
        grad_norm_tag: the tag the norms were read from (``gradguard/grad_norm`` or a fallback), or None.
        grad_norm: ``(step, value)`` pairs of the pre-clip gradient norm.
        clip_threshold: ``(step, value)`` pairs of the clipping threshold.
        clip_fraction: ``(step, value)`` pairs of the share of steps clipped since the previous log.
        percentiles: p50/p90/p99/max of the finite gradient norms (empty without norms).
        nonfinite_norms: logged norms that were NaN/inf.
        clip_rate: mean of ``clip_fraction`` (None without it).
        vanishing_max: the largest number of vanishing layers at any logged step (None without the tag).
        exploding_max: likewise for exploding layers.
        layer_events: ``(step, text)`` from ``gradguard/layer_health_events``.
        skipped_steps: the guard's final skip count (None without the tag).
        rollbacks: the guard's final rollback count (None without the tag).
        guard_events: ``(step, kind, text)`` from ``gradguard/nan_guard_events``; kind is skip/rollback/halt.
        tags: every gradguard scalar tag found.
    """

    name: str
    path: str
    steps: int = 0
    grad_norm_tag: str | None = None
    grad_norm: list[tuple[int, float]] = field(default_factory=list)
    clip_threshold: list[tuple[int, float]] = field(default_factory=list)
    clip_fraction: list[tuple[int, float]] = field(default_factory=list)
    percentiles: dict[str, float] = field(default_factory=dict)
    nonfinite_norms: int = 0
    clip_rate: float | None = None
    vanishing_max: int | None = None
    exploding_max: int | None = None
    layer_events: list[tuple[int, str]] = field(default_factory=list)
    skipped_steps: int | None = None
    rollbacks: int | None = None
    guard_events: list[tuple[int, str, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@dataclass
class HealthSummary:
    """All runs under one log directory that hold gradguard data."""

    logdir: str
    runs: list[RunHealth]
    without_gradguard: list[str] = field(default_factory=list)  # runs with event files but no gradguard tags


def find_runs(logdir: str | Path) -> list[Path]:
    """Directories under ``logdir`` (itself included) that contain TensorBoard event files, sorted."""
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"log directory not found: {root}")
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of ``values``; q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _scalars(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]


def _texts(acc: Any, tag: str) -> list[tuple[int, str]]:
    out = []
    for ev in acc.Tensors(tag):
        proto = ev.tensor_proto
        for raw in proto.string_val:
            out.append((int(ev.step), raw.decode("utf-8", "replace")))
    return out


def _read_run(path: Path, logdir: Path) -> RunHealth | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance=_SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    scalar_tags = [t for t in tags.get("scalars", []) if t.startswith(PREFIX)]
    text_tags = [t for t in tags.get("tensors", []) if t.startswith(PREFIX)]
    if not scalar_tags and not text_tags:
        return None
    name = str(path.relative_to(logdir)) if path != logdir else "."
    run = RunHealth(name=name, path=str(path), tags=sorted(scalar_tags))
    steps = [s for t in scalar_tags for s, _ in _scalars(acc, t)]
    run.steps = max(steps) if steps else 0

    for candidate in (PREFIX + "grad_norm", PREFIX + "grad_norm_clipped"):
        if candidate in scalar_tags:
            run.grad_norm_tag = candidate
            run.grad_norm = _scalars(acc, candidate)
            break
    if run.grad_norm:
        finite = [v for _, v in run.grad_norm if math.isfinite(v)]
        run.nonfinite_norms = len(run.grad_norm) - len(finite)
        if finite:
            run.percentiles = {
                "p50": percentile(finite, 50),
                "p90": percentile(finite, 90),
                "p99": percentile(finite, 99),
                "max": max(finite),
            }
    if PREFIX + "clip_threshold" in scalar_tags:
        run.clip_threshold = _scalars(acc, PREFIX + "clip_threshold")
    if PREFIX + "clip_fraction" in scalar_tags:
        run.clip_fraction = _scalars(acc, PREFIX + "clip_fraction")
        fractions = [v for _, v in run.clip_fraction if math.isfinite(v)]
        run.clip_rate = sum(fractions) / len(fractions) if fractions else None
    if PREFIX + "vanishing_layers" in scalar_tags:
        run.vanishing_max = int(max(v for _, v in _scalars(acc, PREFIX + "vanishing_layers")))
    if PREFIX + "exploding_layers" in scalar_tags:
        run.exploding_max = int(max(v for _, v in _scalars(acc, PREFIX + "exploding_layers")))
    if PREFIX + "skipped_steps" in scalar_tags:
        run.skipped_steps = int(_scalars(acc, PREFIX + "skipped_steps")[-1][1])
    if PREFIX + "rollbacks" in scalar_tags:
        run.rollbacks = int(_scalars(acc, PREFIX + "rollbacks")[-1][1])
    for tag in text_tags:
        if tag.startswith(PREFIX + "layer_health_events"):
            run.layer_events += _texts(acc, tag)
        elif tag.startswith(PREFIX + "nan_guard_events"):
            for step, text in _texts(acc, tag):
                kind = next((k for k in ("rollback", "skip", "halt") if f"NaNGuard {k}" in text), "event")
                match = _EVENT_STEP.search(text)
                run.guard_events.append((int(match.group(1)) if match else step, kind, text))
    run.layer_events.sort()
    run.guard_events.sort()
    return run


def summarize(logdir: str | Path) -> HealthSummary:
    """Read every run under ``logdir`` and summarise its gradient health.

    Args:
        logdir: a TensorBoard log directory (a run folder or a parent of several).

    Returns:
        A :class:`HealthSummary` with one :class:`RunHealth` per run that holds gradguard data.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        ValueError: no event file under ``logdir`` holds any ``gradguard/`` tag.
    """
    root = Path(logdir)
    paths = find_runs(root)
    read = [(p, _read_run(p, root)) for p in paths]
    runs = [r for _, r in read if r is not None]
    others = [str(p.relative_to(root)) if p != root else "." for p, r in read if r is None]
    if not runs:
        found = (
            f"{len(paths)} event-file folder(s), none with gradguard tags" if paths else "no TensorBoard event files"
        )
        raise ValueError(
            f"no gradguard data under {root}: {found}. Train with GradientNormMonitor, AdaptiveGradientClipping or "
            "NaNGuard and a TensorBoardLogger, or run `gradguard demo`."
        )
    return HealthSummary(logdir=str(root), runs=runs, without_gradguard=others)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def format_summary(summary: HealthSummary) -> str:
    """The summary as plain text, one block per run."""
    lines = [f"gradguard report for {summary.logdir} ({len(summary.runs)} run(s))"]
    for run in summary.runs:
        lines.append("")
        lines.append(f"run {run.name}: last step {run.steps}")
        if run.percentiles:
            p = run.percentiles
            label = "gradient norm" if run.grad_norm_tag == PREFIX + "grad_norm" else "clipped gradient norm"
            lines.append(
                f"  {label} ({len(run.grad_norm)} logged steps): p50 {p['p50']:.4g}, p90 {p['p90']:.4g}, "
                f"p99 {p['p99']:.4g}, max {p['max']:.4g}"
                + (f"; {run.nonfinite_norms} non-finite" if run.nonfinite_norms else "")
            )
        else:
            lines.append("  gradient norm: not logged (add GradientNormMonitor)")
        if run.clip_rate is not None:
            thr = [v for _, v in run.clip_threshold if math.isfinite(v)]
            last_thr = f", last threshold {thr[-1]:.4g}" if thr else ""
            lines.append(f"  clip rate: {run.clip_rate:.1%} of steps clipped{last_thr}")
        else:
            lines.append("  clip rate: n/a (no AdaptiveGradientClipping)")
        if run.vanishing_max is not None or run.exploding_max is not None:
            lines.append(
                f"  layers: at most {_fmt(run.vanishing_max)} vanishing, {_fmt(run.exploding_max)} exploding at once"
            )
        for step, text in run.layer_events[:10]:
            lines.append(f"    step {step}: {text}")
        if len(run.layer_events) > 10:
            lines.append(f"    ... {len(run.layer_events) - 10} more layer-health events")
        if run.skipped_steps is not None or run.rollbacks is not None or run.guard_events:
            lines.append(f"  NaNGuard: {_fmt(run.skipped_steps)} skipped steps, {_fmt(run.rollbacks)} rollbacks")
            for step, kind, text in run.guard_events:
                lines.append(f"    step {step} {kind}: {text}")
    if summary.without_gradguard:
        lines.append("")
        lines.append("runs without gradguard data (not summarised): " + ", ".join(summary.without_gradguard))
    return "\n".join(lines)


def plot_report(summary: HealthSummary, png_path: str | Path) -> Path:
    """Gradient norm and clip threshold over steps (log y), a vertical line per skip/rollback/halt; one panel per run.

    Args:
        summary: from :func:`summarize`.
        png_path: where to write the PNG (parent folders are created).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing (with an install hint).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_report needs matplotlib: pip install 'lightning-gradguard[examples]'") from e

    runs = summary.runs
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.2 * len(runs)), squeeze=False)
    colors = {"skip": "tab:orange", "rollback": "tab:red", "halt": "black", "event": "tab:purple"}
    for ax, run in zip(axes[:, 0], runs):
        plotted = False
        norms = [(s, v) for s, v in run.grad_norm if math.isfinite(v) and v > 0]
        if norms:
            label = "grad norm (pre-clip)" if run.grad_norm_tag == PREFIX + "grad_norm" else "grad norm (clipped)"
            ax.plot([s for s, _ in norms], [v for _, v in norms], lw=1.0, color="tab:blue", label=label)
            plotted = True
        thr = [(s, v) for s, v in run.clip_threshold if math.isfinite(v) and v > 0]
        if thr:
            ax.plot(
                [s for s, _ in thr], [v for _, v in thr], lw=1.0, ls="--", color="tab:green", label="clip threshold"
            )
            plotted = True
        seen: set[str] = set()
        for step, kind, _ in run.guard_events:
            ax.axvline(
                step, color=colors.get(kind, "tab:purple"), lw=1.0, alpha=0.8, label=None if kind in seen else kind
            )
            seen.add(kind)
        if plotted:
            ax.set_yscale("log")
        ax.set_title(run.name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm")
        if plotted or seen:
            ax.legend(fontsize=8, loc="best")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
