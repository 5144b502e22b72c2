"""Shared helpers of the gradguard benchmarks: interleaved timing, median ratios, machine description, tables.

Timing discipline (used by ``overhead.py``):

- every candidate is timed in the same process, in *rounds*; inside a round each candidate runs ``inner`` times, and
  the order of the candidates is rotated from round to round, so slow drifts of the machine (another process
  starting, frequency changes) hit all candidates alike;
- a candidate's time in a round is the median of its ``inner`` calls; its figure is the median over rounds;
- ratios are computed *per round* (candidate / baseline in the same round) and the reported ratio is the median of
  those per-round ratios, with the 25th-75th percentile range as a spread. A median of ratios is robust to a round
  in which the whole machine was slow.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "Timing",
    "interleaved",
    "machine_description",
    "markdown_table",
    "quantile",
    "rss_bytes",
    "set_threads",
]

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``q`` in [0, 1]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """The result of one candidate in an :func:`interleaved` measurement (times in seconds)."""

    name: str
    per_round: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_round) if self.per_round else float("nan")

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    @property
    def ratio_iqr(self) -> tuple[float, float]:
        return quantile(self.ratios, 0.25), quantile(self.ratios, 0.75)


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    baseline: str,
    rounds: int = 15,
    inner: int = 5,
    before_each: Callable[[], object] | None = None,
    warmup: int = 2,
) -> dict[str, Timing]:
    """Time ``candidates`` in interleaved rounds; ratios are per round against ``baseline``.

    Args:
        candidates: name -> zero-argument callable (one call = one unit of work, e.g. one optimizer step's cost).
        baseline: the name of the candidate the ratios are taken against.
        rounds: number of rounds; each round runs every candidate ``inner`` times, in a rotated order.
        inner: calls per candidate per round; the round's figure is their median.
        before_each: called (untimed) before every timed call, e.g. to restore gradients that a clip mutated.
        warmup: untimed calls of every candidate before the first round (allocator, lazy caches, lru caches).

    Returns:
        name -> :class:`Timing`.
    """
    if baseline not in candidates:
        raise ValueError(f"baseline must be one of {list(candidates)}, got {baseline!r}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            if before_each is not None:
                before_each()
            candidates[name]()
    out = {n: Timing(n) for n in names}
    clock = time.perf_counter
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        this_round: dict[str, float] = {}
        for name in order:
            fn = candidates[name]
            calls = []
            for _ in range(inner):
                if before_each is not None:
                    before_each()
                t0 = clock()
                fn()
                calls.append(clock() - t0)
            this_round[name] = statistics.median(calls)
        for name in names:
            out[name].per_round.append(this_round[name])
            out[name].ratios.append(this_round[name] / this_round[baseline])
    return out


def set_threads(n: int) -> int:
    """Set torch's intra-op threads and return what torch reports back."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def _busy_processes(limit: int = 5) -> list[str]:
    """Other processes using CPU right now (from /proc, two samples 0.5 s apart), most CPU first."""

    def sample() -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    raw = f.read()
                name = raw[raw.index("(") + 1 : raw.rindex(")")]
                fields = raw[raw.rindex(")") + 2 :].split()
                out[int(entry)] = (name, int(fields[11]) + int(fields[12]))
            except (OSError, ValueError, IndexError):
                continue
        return out

    try:
        a = sample()
        time.sleep(0.5)
        b = sample()
    except OSError:  # pragma: no cover - no /proc
        return []
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    busy = []
    for pid, (name, ticks) in b.items():
        if pid == me or pid not in a:
            continue
        share = (ticks - a[pid][1]) / hz / 0.5
        if share >= 0.05:
            busy.append((share, f"{name}(pid {pid}) {share * 100:.0f}% of a core"))
    return [s for _, s in sorted(busy, reverse=True)[:limit]]


def machine_description(threads: int | None = None) -> dict[str, str]:
    """What the figures were measured on: CPU, cores, threads, versions, load, other busy processes."""
    import lightning

    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        load = "n/a"
    busy = _busy_processes()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count() or 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores, {affinity} usable)",
        "gpu": gpu,
        "torch threads": str(threads if threads is not None else torch.get_num_threads()),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}",
        "os": platform.platform(),
        "load average (1/5/15 min)": load,
        "other busy processes": "; ".join(busy) if busy else "none seen",
    }


def print_machine(desc: Mapping[str, str]) -> None:
    print("Machine:")
    for k, v in desc.items():
        print(f"  {k}: {v}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def seed_table(
    methods: Sequence[str],
    seeds: Sequence[int],
    values: Mapping[str, Sequence[float]],
    digits: int,
    compare: str,
    higher_first: bool,
    ratio: bool = False,
) -> list[str]:
    """The lines of a per-seed markdown table of one metric under several methods (the first method is the reference):
    a row per seed, the mean and the median, with ``ratio`` the mean of the per-seed ratios to the reference, and a
    row ``compare`` counting the seeds above / below the reference (``higher_first``) or below / above it."""
    ref = values[methods[0]]
    lines = ["| seed | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines += [
        f"| {s} | " + " | ".join(f"{values[m][i]:.{digits}f}" for m in methods) + " |" for i, s in enumerate(seeds)
    ]
    lines.append("| mean | " + " | ".join(f"{statistics.mean(values[m]):.{digits}f}" for m in methods) + " |")
    lines.append("| median | " + " | ".join(f"{statistics.median(values[m]):.{digits}f}" for m in methods) + " |")
    if ratio:
        means = (statistics.mean(v / r for v, r in zip(values[m], ref)) for m in methods)
        lines.append("| mean ratio to none | " + " | ".join(f"{x:.3f}" for x in means) + " |")

    def counts(m: str) -> str:
        above = sum(v > r for v, r in zip(values[m], ref))
        below = sum(v < r for v, r in zip(values[m], ref))
        return f"{above} / {below}" if higher_first else f"{below} / {above}"

    lines.append(f"| {compare} | " + " | ".join("-" if m == methods[0] else counts(m) for m in methods) + " |")
    return lines


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(t: Timing) -> str:
    lo, hi = t.ratio_iqr
    return f"{t.ratio:.2f}x [{lo:.2f}-{hi:.2f}]"
