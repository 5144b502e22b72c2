"""The overview figure: a run's gradient health in one picture, live in TensorBoard and from ``gradguard report``.

Four panels on one step axis, every guard event a vertical marker across all of them, its kind in the legend:

1. **gradient norm** (log): the maximum over every step since the previous write (``gradguard/grad_norm_max``: no
   spike between two logs is lost), the norm at the logged steps, the clip threshold; non-finite norms as markers
   at the panel's top edge;
2. **loss**: the loss curve, the largest loss of every interval (``gradguard/loss_max``: the blow-up between two
   logs), non-finite losses as markers at the top edge;
3. **learning rate** (log): ``gradguard/lr`` (``gradguard/lr_scale`` when no LR was logged);
4. **clipped share**: ``gradguard/clip_fraction``, the share of steps clipped per interval.

Event kinds, each its own colour (none is the norm line's blue): skip, rollback, LR cut (``lower_lr``), LR raised
(``raise_lr``), warning (``warn``), halt.

Written on the panels (:class:`OverviewNote`, listed in :attr:`OverviewPlot.notes`): the norm's peak (``peak 1.16e3
@ step 7``, or ``NaN/inf @ step 12`` where it went non-finite), the loss's likewise (unless the loss never rose above
its first value), and the LR changes the guard made (``10 → 0.03`` where the LR line jumps at a rollback, an LR cut or
raise; at most four, the largest that find room), each beside its point where it covers no line and no other text
(the legends, placed when drawn, avoid them); a schedule's own changes are not labelled.

Live, the guard draws it at every event, at a halt, on an exception and at the end of the fit, and writes it to
TensorBoard's Images tab under :data:`OVERVIEW_TAG` (``NaNGuard`` through the Trainer's TensorBoard loggers,
``GradGuard`` through its ``SummaryWriter``). It is an image: TensorBoard's smoothing and outlier settings cannot
flatten the explosion or the LR cut. Nothing is drawn on a healthy step; the data are the scalars already written,
kept in a bounded :class:`~lightning_gradguard.core.engine._timeline.Timeline`. The drawing time is budgeted
(:class:`OverviewBudget`): a storm of events draws a picture now and then, never most of the run's time.

matplotlib (the ``examples`` extra) is imported on first use only, drawn with its object-oriented API on an Agg
canvas, never through ``pyplot``: no global figure registry, no backend switch, nothing left open. Without it the
image is skipped with one warning per process; a failed drawing warns once and never ends the fit.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_gradguard.core.engine._scalars import tag
from lightning_gradguard.core.engine._timeline import Timeline

__all__ = [
    "EVENT_STYLES",
    "LR_EVENT_KINDS",
    "OVERVIEW_TAG",
    "OverviewBudget",
    "OverviewData",
    "OverviewNote",
    "OverviewPlot",
    "draw_overview",
    "find_lr_changes",
    "find_peak",
    "overview_from_timeline",
    "render_overview",
    "write_overview",
]

#: the TensorBoard image tag of the overview figure
OVERVIEW_TAG = "gradguard/overview"
#: event kind -> (legend label, colour)
EVENT_STYLES: dict[str, tuple[str, str]] = {
    "skip": ("skip", "#ff7f0e"),
    "rollback": ("rollback", "#d62728"),
    "lower_lr": ("LR cut", "#9467bd"),
    "raise_lr": ("LR raised", "#17becf"),
    "warn": ("warning", "#bcbd22"),
    "halt": ("halt", "#000000"),
    "event": ("event", "#8c564b"),
}
_NORM_MAX = "#1f77b4"  # blue: no event colour is a blue
_NORM_LOGGED = "#08306b"
_THRESHOLD = "#2ca02c"
_LOSS = "#4d4d4d"
_LOSS_MAX = "#1f77b4"
_LR = "#08306b"
_CLIP = "#2ca02c"
_NONFINITE = "#e7298a"  # magenta markers at the top edge
_NOTE = "#222222"
#: the event kinds that change the learning rate: where the LR line jumps at such an event, the jump is labelled
LR_EVENT_KINDS = frozenset({"rollback", "lower_lr", "raise_lr"})
_MAX_LR_NOTES = 4  # more changes: the largest ones that find room are labelled
MATPLOTLIB_HINT = (
    "matplotlib is not installed: the gradguard/overview image is skipped "
    "(pip install matplotlib, or lightning-gradguard[examples])."
)
_warned: set[str] = set()

Points = list[tuple[int, float]]


@dataclass
class OverviewData:
    """What the overview draws: ``(step, value)`` series and the events (non-finite values included).

    Attributes:
        title: the figure's title.
        grad_norm, grad_norm_label: the norm at the logged steps, and what it is.
        grad_norm_max: the maximum norm of each interval between two writes.
        clip_threshold: the clipper's threshold.
        lr, lr_label: the learning rate (or the guard's LR scale), and which.
        loss, loss_label: the loss curve, and where it comes from.
        loss_max: the largest loss of each interval.
        clip_fraction: the share of steps clipped per interval.
        events: ``(step, kind)`` of every guard event.
        note: shown on the norm panel when it has nothing (e.g. a run without gradguard).
    """

    title: str = ""
    grad_norm: Points = field(default_factory=list)
    grad_norm_label: str = "grad norm at logged steps"
    grad_norm_max: Points = field(default_factory=list)
    clip_threshold: Points = field(default_factory=list)
    lr: Points = field(default_factory=list)
    lr_label: str = "learning rate"
    loss: Points = field(default_factory=list)
    loss_label: str = "loss"
    loss_max: Points = field(default_factory=list)
    clip_fraction: Points = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class OverviewNote:
    """A value written on the overview: a panel's peak, or an LR change made by the guard.

    Attributes:
        panel: ``"norm"``, ``"loss"`` or ``"lr"``.
        kind: ``"peak"`` (the largest finite value), ``"nonfinite"`` (the first NaN/inf value) or ``"lr_change"``.
        step: the step it is written at.
        value: the peak, the first non-finite value, or the LR after the change.
        text: as written on the figure (``"peak 1.16e3 @ step 7"``, ``"NaN/inf @ step 12"``, ``"10 → 0.03"``).
        before: the LR before the change (``lr_change`` only).
    """

    panel: str
    kind: str
    step: int
    value: float
    text: str
    before: float | None = None


@dataclass
class OverviewPlot:
    """A drawn overview: the figure, its panels and the data each drew, for tests and callers.

    Attributes:
        figure: the matplotlib ``Figure`` (or ``SubFigure``) drawn into.
        axes: panel name (``"norm"``, ``"loss"``, ``"lr"``, ``"clip"``) -> its ``Axes``.
        drawn: ``"<panel>/<series>"`` -> ``(steps, values)`` as drawn; ``"<panel>/nonfinite"`` holds the steps of
            the non-finite values and the y at which they are marked (the panel's top edge); ``"events/<kind>"``
            the steps of that kind's markers.
        notes: the values written on the panels (peaks, LR changes), as written.
    """

    figure: Any
    axes: dict[str, Any]
    drawn: dict[str, tuple[list[int], list[float]]]
    notes: list[OverviewNote] = field(default_factory=list)


def overview_from_timeline(
    timeline: Timeline,
    events: Iterable[Mapping[str, Any]] = (),
    losses: Iterable[Sequence[float]] = (),
    title: str = "",
) -> OverviewData:
    """The overview of a live run: the first optimizer's series from ``timeline``, the engine's ``events`` (dicts
    with ``step`` and ``kind``) and its recent ``[step, loss]`` rows (``losses``: the loss curve of the last steps;
    the whole run's loss is ``gradguard/loss_max``, the largest loss of each interval)."""
    norm_tag = tag("grad_norm") if tag("grad_norm") in timeline else tag("grad_norm_clipped")
    lr_tag, lr_label = tag("lr"), "learning rate"
    if lr_tag not in timeline:
        lr_tag, lr_label = tag("lr_scale"), "LR scale (x the schedule)"
    rows = [(int(r[0]), float(r[1])) for r in losses]
    return OverviewData(
        title=title,
        grad_norm=timeline.series(norm_tag),
        grad_norm_label="grad norm at logged steps" + ("" if norm_tag == tag("grad_norm") else " (clipped)"),
        grad_norm_max=timeline.series(tag("grad_norm_max")),
        clip_threshold=timeline.series(tag("clip_threshold")),
        lr=timeline.series(lr_tag),
        lr_label=lr_label,
        loss=rows,
        loss_label=f"loss, last {len(rows)} steps" if rows else "loss",
        loss_max=timeline.series(tag("loss_max")),
        clip_fraction=timeline.series(tag("clip_fraction")),
        events=[(int(e["step"]), str(e.get("kind") or "event")) for e in events],
    )


def _split(points: Points, positive: bool) -> tuple[list[int], list[float], list[int]]:
    """Finite points (positive ones only for a log axis) and the steps of non-finite values."""
    xs, ys, bad = [], [], []
    for s, v in points:
        if not math.isfinite(v):
            bad.append(s)
        elif v > 0 or not positive:
            xs.append(s)
            ys.append(v)
    return xs, ys, bad


def _tick(value: float, _pos: Any = None) -> str:
    return f"{value:.3g}"


def _short(value: float, sci: bool | None = None) -> str:
    """Three significant digits, with an exponent (``sci``; None: where it is shorter than a long plain form):
    ``1.16e3``, ``486``, ``0.005``, ``8.89e-4``."""
    plain = f"{value:.3g}"
    mantissa, _, exponent = f"{value:.2e}".partition("e")
    if not exponent:  # nan, inf
        return plain
    short = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if sci is None:
        sci = "e" in plain or len(short) < len(plain) > 5
    return short if sci else plain


def _change(before: float, after: float) -> str:
    """``before → after``, both with an exponent or neither: ``10 → 0.03``, ``1e-3 → 5e-4``."""
    sci = "e" in _short(before) + _short(after)
    return f"{_short(before, sci)} → {_short(after, sci)}"


def find_peak(panel: str, series: Iterable[Points], positive: bool = False) -> OverviewNote | None:
    """The note of a panel's peak over ``series``: its first non-finite value if any (``NaN/inf @ step 12``,
    ``(+2 more)`` where there are more), else its largest finite value (``peak 1.16e3 @ step 7``; the first step of
    a tie; positive values only where ``positive``, as on a log axis); None when there is nothing to mark."""
    points = [(int(s), float(v)) for pts in series for s, v in pts]
    bad = sorted({s for s, v in points if not math.isfinite(v)})
    if bad:
        first = bad[0]
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        value = next(v for s, v in points if s == first and not math.isfinite(v))
        return OverviewNote(panel, "nonfinite", first, value, f"NaN/inf @ step {first}{more}")
    finite = [(v, -s) for s, v in points if v > 0 or not positive]
    if not finite:
        return None
    value, step = max(finite)
    return OverviewNote(panel, "peak", -step, value, f"peak {_short(value)} @ step {-step}")


def find_lr_changes(lr: Points, events: Iterable[tuple[int, str]], tolerance: float = 0.01) -> list[OverviewNote]:
    """The LR changes made by the guard: at each step of an event in :data:`LR_EVENT_KINDS`, the LR logged last
    before it (``before``) and the one logged at that step (``value``; the next one logged, before the next such
    event, where the step has none), when they differ by more than ``tolerance`` (relative). Steps without such an
    event (a schedule's own changes) are not looked at."""
    points = sorted((int(s), float(v)) for s, v in lr if math.isfinite(v))
    steps = sorted({int(s) for s, kind in events if kind in LR_EVENT_KINDS})
    notes = []
    for i, step in enumerate(steps):
        until = steps[i + 1] if i + 1 < len(steps) else math.inf
        before = [v for s, v in points if s < step]
        after = [(s, v) for s, v in points if step <= s < until]
        if not before or not after:
            continue
        first = after[0][0]
        old, new = before[-1], [v for s, v in after if s == first][-1]
        if abs(new - old) <= tolerance * max(abs(old), abs(new)):
            continue
        notes.append(OverviewNote("lr", "lr_change", step, new, _change(old, new), before=old))
    return notes


def _place(ax: Any, xy: tuple[float, float], text: str, candidates: Sequence[tuple[float, float, str, str]],
           fontsize: float) -> tuple[tuple[float, float, str, str], int, float]:  # fmt: skip
    """Where to write ``text`` near ``xy`` (data coordinates): the first of ``candidates`` (offset in points, ha,
    va) inside the axes that covers no line and no text of the panel, else the least bad one, with its score (0:
    free; 1 per line crossed, 10 per text covered, 100 outside the axes) and the text's width in pixels. Call it
    once the axes' limits and position are final."""
    from matplotlib.transforms import offset_copy

    ax.get_xlim(), ax.get_ylim()  # applies a pending autoscale before anything is transformed
    figure = ax.get_figure()
    frame = ax.bbox
    paths, points = [], []
    for line in ax.get_lines():
        if not len(line.get_xdata()):
            continue
        path = line.get_transform().transform_path(line.get_path())
        if line.get_linestyle() in ("None", "none", "", " "):
            points.extend(path.vertices)  # markers only (the non-finite marks at the top edge)
        else:
            paths.append(path)
    texts = [t.get_window_extent() for t in ax.texts if t.get_visible() and t.get_text()]
    probe = ax.text(xy[0], xy[1], text, fontsize=fontsize)
    best: tuple[int, tuple[float, float, str, str]] = (1_000_000, candidates[0])
    width = 0.0
    try:
        for candidate in candidates:
            dx, dy, ha, va = candidate
            probe.set_transform(offset_copy(ax.transData, fig=figure, x=dx, y=dy, units="points"))
            probe.set_horizontalalignment(ha)
            probe.set_verticalalignment(va)
            box = probe.get_window_extent().padded(2.0)
            width = box.width
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            score = 0 if inside else 100
            score += 10 * sum(box.overlaps(other) for other in texts)
            score += sum(path.intersects_bbox(box) for path in paths)
            score += int(box.count_contains(np.asarray(points).reshape(-1, 2)) > 0) if points else 0
            if score < best[0]:
                best = (score, candidate)
            if score == 0:
                break
    finally:
        probe.remove()
    return best[1], best[0], width


def _load_matplotlib() -> tuple[Any, Any] | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        _warn_once("missing", MATPLOTLIB_HINT)
        return None
    return Figure, FigureCanvasAgg


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def draw_overview(
    data: OverviewData, figure: Any = None, width_px: int = 800, height_px: int = 600, dpi: int = 100
) -> OverviewPlot:
    """Draw ``data`` into ``figure`` (a matplotlib ``Figure``/``SubFigure``; None: a new Agg figure of
    ``width_px`` x ``height_px``) and return what was drawn.

    Raises:
        ImportError: matplotlib is missing (with an install hint).
    """
    if figure is None:
        loaded = _load_matplotlib()
        if loaded is None:
            raise ImportError("the overview figure needs matplotlib: pip install 'lightning-gradguard[examples]'")
        figure_cls, canvas_cls = loaded
        figure = figure_cls(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
        canvas_cls(figure)
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    drawn: dict[str, tuple[list[int], list[float]]] = {}
    axes_list = figure.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [3.0, 2.2, 1.5, 1.2]})
    axes = dict(zip(("norm", "loss", "lr", "clip"), axes_list))
    small = 9

    def series(ax: Any, key: str, points: Points, positive: bool, **style: Any) -> list[int]:
        xs, ys, bad = _split(points, positive)
        if xs:
            marker = "o" if len(xs) <= 30 else None
            ax.plot(xs, ys, marker=marker, markersize=3, **style)
            drawn[key] = (xs, ys)
        return bad

    def top_edge(ax: Any, key: str, steps: list[int], marker: str, label: str) -> None:
        if not steps:
            return
        low, high = (float(v) for v in ax.get_ylim())
        ax.plot(steps, [high] * len(steps), marker, color=_NONFINITE, markersize=9, mew=2, clip_on=False,
                label=label, zorder=5)  # fmt: skip
        ax.set_ylim(low, high)
        drawn[key] = (list(steps), [high] * len(steps))

    # 1. gradient norm against the clip threshold
    ax = axes["norm"]
    tops = data.grad_norm_max or data.grad_norm
    bad = series(ax, "norm/grad_norm_max", data.grad_norm_max, True, color=_NORM_MAX, lw=1.6,
                 label="grad norm, max per interval")  # fmt: skip
    bad += series(ax, "norm/grad_norm", data.grad_norm, True, color=_NORM_LOGGED, lw=0.8, alpha=0.8,
                  label=data.grad_norm_label)  # fmt: skip
    series(ax, "norm/clip_threshold", data.clip_threshold, True, color=_THRESHOLD, lw=1.3, ls="--",
           label="clip threshold")  # fmt: skip
    if any(k.startswith("norm/") for k in drawn):
        ax.set_yscale("log")
    elif not tops:
        ax.text(0.5, 0.5, data.note or "no gradient norm logged", ha="center", va="center", transform=ax.transAxes,
                fontsize=small + 1, color="#555555")  # fmt: skip
    top_edge(ax, "norm/nonfinite", sorted(set(bad)), "^", "NaN/inf norm")
    ax.set_ylabel("grad norm", fontsize=small + 1)

    # 2. loss, with the largest loss of each interval and the non-finite ones at the top edge
    ax = axes["loss"]
    finite = [v for _, v in [*data.loss, *data.loss_max] if math.isfinite(v)]
    log_loss = bool(finite) and min(finite) > 0
    bad = series(ax, "loss/loss", data.loss, log_loss, color=_LOSS, lw=1.0, label=data.loss_label)
    bad += series(ax, "loss/loss_max", data.loss_max, log_loss, color=_LOSS_MAX, lw=1.2, ls=":",
                  label="loss, max per interval")  # fmt: skip
    if log_loss:
        ax.set_yscale("log")
    if not finite and not bad:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes, fontsize=small + 1,
                color="#555555")  # fmt: skip
    top_edge(ax, "loss/nonfinite", sorted(set(bad)), "x", "NaN/inf loss")
    ax.set_ylabel("loss", fontsize=small + 1)

    # 3. learning rate
    ax = axes["lr"]
    series(ax, "lr/lr", data.lr, True, color=_LR, lw=1.4, drawstyle="steps-post", label=data.lr_label)
    if "lr/lr" in drawn:
        lrs = drawn["lr/lr"][1]
        if max(lrs) > 10 * min(lrs):  # a log axis only where the LR spans decades (else it has no tick labels)
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=ax.transAxes,
                fontsize=small + 1, color="#555555")  # fmt: skip
    ax.set_ylabel("LR" if data.lr_label == "learning rate" else "LR scale", fontsize=small + 1)

    # 4. clipped share
    ax = axes["clip"]
    xs, ys, _ = _split(data.clip_fraction, False)
    if xs:
        # each share covers the steps since the previous write: drawn back to it ("pre")
        ax.fill_between(xs, ys, step="pre", color=_CLIP, alpha=0.35, lw=0)
        ax.step(xs, ys, where="pre", color=_CLIP, lw=1.0)
        drawn["clip/clip_fraction"] = (xs, ys)
        ax.set_ylim(0.0, 1.05)
    else:
        ax.text(0.5, 0.5, "no clipping logged", ha="center", va="center", transform=ax.transAxes,
                fontsize=small + 1, color="#555555")  # fmt: skip
        ax.set_yticks([])
    ax.set_ylabel("clipped", fontsize=small + 1)
    ax.set_xlabel("step", fontsize=small + 1)

    # events: one vertical marker per event across every panel, one legend entry per kind
    by_kind: dict[str, list[int]] = {}
    for step, kind in data.events:
        by_kind.setdefault(kind if kind in EVENT_STYLES else "event", []).append(step)
    handles, labels = [], []
    for kind, (label, color) in EVENT_STYLES.items():
        steps = by_kind.get(kind)
        if not steps:
            continue
        width = 2.0 if kind == "halt" else 1.3
        for panel in axes.values():
            panel.vlines(steps, 0, 1, transform=panel.get_xaxis_transform(), colors=color, lw=width, alpha=0.85,
                         zorder=1)  # fmt: skip
        drawn[f"events/{kind}"] = (sorted(steps), [])
        handles.append(axes["norm"].plot([], [], color=color, lw=2.5)[0])
        labels.append(f"{label} x{len(steps)}" if len(steps) > 1 else label)
    pool = [s for pts in drawn.values() for s in pts[0]]
    span = max(1, max(pool) - min(pool)) if pool else 1
    last_label = -math.inf
    for step, kind in sorted(data.events) if len(data.events) <= 8 else ():  # few events: labelled with their step
        if step - last_label < 0.05 * span:
            continue  # too close to the previous label to be read
        last_label = step
        color = EVENT_STYLES.get(kind, EVENT_STYLES["event"])[1]
        axes["norm"].annotate(str(step), (step, 1.0), xycoords=axes["norm"].get_xaxis_transform(),
                              xytext=(2, -2), textcoords="offset points", ha="left", va="top", fontsize=small,
                              color=color)  # fmt: skip

    all_steps = [s for pts in drawn.values() for s in pts[0]]
    if all_steps:
        lo, hi = min(all_steps), max(all_steps)
        pad = max(1.0, 0.02 * (hi - lo))
        axes["clip"].set_xlim(lo - pad, hi + pad)
    for name, panel in axes.items():
        if panel.get_yscale() == "log":  # plain "1e-05" labels, no minor labels: mathtext is slow and crowded
            panel.yaxis.set_major_locator(LogLocator(base=10.0, numticks=4))
            panel.yaxis.set_major_formatter(FuncFormatter(_tick))
            low, high = panel.get_ylim()
            narrow = low > 0 and high < 100 * low  # under two decades: label 2 and 5 times the decades too
            panel.yaxis.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 5.0) if narrow else "auto"))
            panel.yaxis.set_minor_formatter(FuncFormatter(_tick) if narrow else NullFormatter())
        elif name == "lr":
            panel.yaxis.set_major_locator(MaxNLocator(3))
            panel.yaxis.set_major_formatter(FuncFormatter(_tick))
        panel.grid(True, which="major", alpha=0.3)
        panel.tick_params(labelsize=small)
        if name != "clip" and panel.get_legend_handles_labels()[0]:
            panel.legend(loc="best", fontsize=small - 1, framealpha=0.75, borderaxespad=0.3, handlelength=1.6)
    top = 0.90
    if handles:
        figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=min(len(handles), 6),
                      fontsize=small + 1, frameon=False, handlelength=1.5, columnspacing=1.2)  # fmt: skip
        top = 0.875
    if data.title:
        figure.suptitle(data.title, fontsize=small + 3, y=0.995)
    # fixed margins instead of tight_layout (which measures every label: a large part of the drawing time)
    figure.subplots_adjust(left=0.10, right=0.98, top=top, bottom=0.08, hspace=0.12)
    # values written on the panels, placed now that limits and positions are final (the legends, at "best", are
    # placed when drawn and avoid them); the largest LR changes first, up to _MAX_LR_NOTES that find room
    loss_peak = find_peak("loss", (data.loss, data.loss_max), positive=log_loss)
    start = min((s for s, _ in [*data.loss, *data.loss_max]), default=None)
    if loss_peak is not None and loss_peak.kind == "peak" and loss_peak.step == start:
        loss_peak = None  # a loss that never rose above its first value: nothing to point at
    notes = [n for n in (find_peak("norm", (data.grad_norm_max, data.grad_norm), positive=True), loss_peak) if n]
    written = [_write_peak(axes[note.panel], note, small) for note in notes]
    changes = find_lr_changes(data.lr, data.events) if "lr/lr" in drawn else []
    labelled: list[tuple[OverviewNote, float, float]] = []  # with the x of its step and its width, in pixels
    for note in sorted(changes, key=_lr_change_rank)[: 3 * _MAX_LR_NOTES]:  # the largest first, earlier on a tie
        if len(labelled) == _MAX_LR_NOTES:
            break
        spot = _write_lr_change(axes["lr"], note, small, [(x, w) for _, x, w in labelled])
        if spot is not None:
            labelled.append((note, *spot))
    written += sorted((note for note, _, _ in labelled), key=lambda n: n.step)
    return OverviewPlot(figure=figure, axes=axes, drawn=drawn, notes=written)


def _lr_change_rank(note: OverviewNote) -> tuple[float, int]:
    before = note.value if note.before is None else note.before
    ratio = abs(math.log(note.value / before)) if note.value > 0 and before > 0 else abs(note.value - before)
    return -round(ratio, 6), note.step


def _write_peak(ax: Any, note: OverviewNote, fontsize: float) -> OverviewNote:
    """Write a peak beside its point (a non-finite one: below its mark at the top edge)."""
    spots: tuple[tuple[float, float, str], ...]  # (dy, dx, va): beside the point, below it, above it
    if note.kind == "nonfinite":  # marked at the top edge: below it
        xy, spots = (note.step, float(ax.get_ylim()[1])), ((-12, 9, "top"), (-26, 9, "top"), (-40, 9, "top"))
    else:
        xy, spots = (note.step, note.value), ((0, 10, "center"), (-8, 9, "top"), (-22, 9, "top"), (8, 9, "bottom"))
    candidates = [(side * dx, dy, "left" if side > 0 else "right", va) for dy, dx, va in spots for side in (1, -1)]
    (dx, dy, ha, va), _, _ = _place(ax, xy, note.text, candidates, fontsize)
    # a leader only from a note set off from its point (beside it, the leader would cross the event's step label)
    corner = (0.0 if ha == "left" else 1.0, {"top": 1.0, "bottom": 0.0}.get(va, 0.5))
    leader = {"arrowstyle": "-", "color": _NOTE, "lw": 0.8, "shrinkA": 0.0, "shrinkB": 2.0, "relpos": corner}
    ax.annotate(note.text, xy, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                color=_NOTE, clip_on=True, annotation_clip=False, zorder=6, arrowprops=leader if abs(dy) > 20 else None,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})  # fmt: skip
    return note


def _write_lr_change(
    ax: Any, note: OverviewNote, fontsize: float, others: Sequence[tuple[float, float]]
) -> tuple[float, float] | None:
    """Write ``before → after`` right of the jump (left of it only where the right has no room), halfway between
    the two levels. Not where it would cover another label, leave the axes, or stand within a label's width of
    ``others`` (the x and width, in pixels, of the LR changes labelled already: which label is whose would be
    unclear). Returns the x of its step and its width (pixels), or None where it was not written."""
    low, high = sorted((note.value if note.before is None else note.before, note.value))
    mid = (low + high) / 2  # halfway on a linear axis; on a log axis, the geometric mean (an LR of 0 is not on it)
    if ax.get_yscale() == "log":
        mid = math.sqrt(low * high) if low > 0 else high
    x = float(ax.transData.transform((note.step, mid))[0])
    rows = (0.0, 10.0, -10.0, 20.0, -20.0)
    for dx, ha in ((5.0, "left"), (-5.0, "right")):
        candidates = [(dx, dy, ha, "center") for dy in rows]
        (dx, dy, ha, va), score, width = _place(ax, (note.step, mid), note.text, candidates, fontsize)
        if score < 10:
            break
    else:
        return None
    if any(abs(x - other) < max(width, other_width) for other, other_width in others):
        return None
    ax.annotate(note.text, (note.step, mid), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                fontsize=fontsize, color=_NOTE, clip_on=True, annotation_clip=False, zorder=6,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})  # fmt: skip
    return x, width


def render_overview(data: OverviewData, width_px: int = 800, height_px: int = 600) -> np.ndarray | None:
    """Draw ``data`` and return it as an ``(H, W, 3)`` uint8 RGB array; None without matplotlib (one warning)."""
    loaded = _load_matplotlib()
    if loaded is None:
        return None
    plot = draw_overview(data, width_px=width_px, height_px=height_px)
    canvas = plot.figure.canvas
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    plot.figure.clear()
    return image


class OverviewBudget:
    """How often a live run may draw its overview: always at a halt and at the end (``force``), the first
    ``free`` event pictures always, after that only while drawing has taken at most ``share`` of the time since the
    budget started (a storm of events draws now and then, the next picture shows what was skipped)."""

    def __init__(self, share: float = 0.05, free: int = 3) -> None:
        self.share, self.free = share, free
        self.start = time.perf_counter()
        self.spent = 0.0
        self.drawn = 0

    def due(self, force: bool = False) -> bool:
        if force or self.drawn < self.free:
            return True
        return self.spent <= self.share * (time.perf_counter() - self.start)

    def add(self, seconds: float) -> None:
        self.spent += seconds
        self.drawn += 1


def write_overview(
    writers: Sequence[Any],
    timeline: Timeline,
    step: int,
    reason: str,
    events: Sequence[Mapping[str, Any]],
    losses: Iterable[Sequence[float]],
    budget: OverviewBudget | None = None,
) -> bool:
    """Draw the live overview at ``step`` and add it to each writer (``add_image``) under :data:`OVERVIEW_TAG`.

    ``reason``: why now (an event kind, ``"halt"``, ``"end"``, an exception's name); a halt, the end and an
    exception always draw, other events within ``budget``. Never raises: without matplotlib, or when drawing fails,
    it warns once and returns False. Returns whether an image was written.
    """
    if not writers:
        return False
    force = reason not in EVENT_STYLES or reason == "halt"
    if budget is not None and not budget.due(force):
        return False
    t0 = time.perf_counter()
    title = f"gradguard overview at step {step} ({_REASONS.get(reason, reason)})"
    try:
        image = render_overview(overview_from_timeline(timeline, events, losses, title))
        if image is None:
            return False
        for writer in writers:
            writer.add_image(OVERVIEW_TAG, image, global_step=step, dataformats="HWC")
            writer.flush()
    except Exception as err:  # a figure must never end the run it describes
        _warn_once("failed", f"gradguard: the overview figure could not be drawn and is skipped ({err!r})")
        return False
    finally:
        if budget is not None:
            budget.add(time.perf_counter() - t0)
    return True


_REASONS = {kind: label for kind, (label, _) in EVENT_STYLES.items()} | {"end": "end of training"}
