"""The demo's story under several CPU kernel paths: every example, both lengths, several seeds (``make demo-check``).

    python tools/demo_check.py                              # lstm + cnn x default + quick x seeds 0-2 x 3 paths
    python tools/demo_check.py --paths avx2 --seeds 0       # one other kernel path, seed 0 (what .ci/run adds)
    python tools/demo_check.py --jobs 2 --json out.json     # two kernel paths at a time; every run's record
    python tools/demo_check.py --write                      # also replace the demo-check block in README.md

A chaotic training run is reproducible on one kernel path, not across CPUs: the same seed takes another trajectory
under other SIMD kernels. The kernel path is chosen by environment variables read when torch loads, so every
(kernel path, example) pair trains in its own process:

- ``native``: what torch picks on this CPU (no variable set; any inherited one is removed);
- ``avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's convolutions and LSTM limited to AVX2);
- ``sse41``: ``ONEDNN_MAX_CPU_ISA=SSE41``;
- ``aten-avx2``, ``aten-default``: ``ATEN_CPU_CAPABILITY=avx2`` / ``default`` (ATen's own vectorised kernels).

Each cell is a pair of :func:`lightning_gradguard.demo.run_demo` runs (unguarded, guarded) of one example, length and
seed; it holds when the unguarded run blew up and did not learn and the guarded one learned. The table shows the
final metrics, the guard's events and the story margin (:func:`lightning_gradguard.demo.story_margin`: the factor by
which the closest of the three conditions is met; below 1 the cell fails). Exits 1 when a cell fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
KERNEL_PATHS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
}
KERNEL_VARS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
LENGTHS = {"default": False, "quick": True}
BLOCK = re.compile(r"(<!-- demo-check:begin[^>]*-->\n).*?(\n<!-- demo-check:end -->)", re.S)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def worker(examples: list[str], lengths: list[str], seeds: list[int], out: Path, max_steps: int | None) -> None:
    """Train every cell of this process's kernel path and write the records to ``out`` (JSON)."""
    import torch

    from lightning_gradguard.demo import run_demo

    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as logdir:
        for example in examples:
            for length in lengths:
                for seed in seeds:
                    for guarded in (False, True):
                        r = run_demo(
                            example, quick=LENGTHS[length], guarded=guarded, logdir=logdir, seed=seed,
                            max_steps=max_steps, progress_bar=False,
                        )  # fmt: skip
                        records.append({"example": example, "length": length, "seed": seed, **r.to_dict()})
                        print(
                            f"  {example} {length} seed {seed} {'guarded' if guarded else 'unguarded'}: {r.verdict}"
                            f" ({r.final_metric_name} {r.final_metric:.3g}, {r.wall_s:.0f} s)",
                            file=sys.stderr,
                            flush=True,
                        )
    info = {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}
    out.write_text(json.dumps({"info": info, "records": records}, default=str))


def run_path(
    path: str, examples: list[str], lengths: list[str], seeds: list[int], tmp: Path, max_steps: int | None = None
) -> dict[str, Any]:
    """One subprocess per (kernel path, example): the environment must be set before torch loads."""
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARS}
    env.update(KERNEL_PATHS[path])
    env.setdefault("PYTHONWARNINGS", "ignore")
    records: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for example in examples:
        out = tmp / f"{path}-{example}.json"
        cmd = [
            sys.executable, __file__, "--worker", "--examples", example, "--lengths", ",".join(lengths),
            "--seeds", ",".join(map(str, seeds)), "--out", str(out),
        ] + (["--max-steps", str(max_steps)] if max_steps else [])  # fmt: skip
        print(f"[{path}] {example}: training ...", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=REPO, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        text = proc.stdout.decode(errors="replace")
        print("\n".join(f"[{path}] {line}" for line in text.splitlines() if line.startswith("  ")), flush=True)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"[{path}] {example}: the worker failed (exit {proc.returncode}):\n{text[-3000:]}")
        data = json.loads(out.read_text())
        info = data["info"]
        records += [{**r, "path": path} for r in data["records"]]
    return {"path": path, "env": KERNEL_PATHS[path], "info": info, "records": records}


def _cpu() -> str:
    """The CPU model (Linux), or what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair unguarded and guarded records into cells with their verdicts and story margin."""
    from lightning_gradguard.demo import DemoResult, story_margin

    fields = set(DemoResult.__dataclass_fields__)
    out = []
    for res in results:
        by_key: dict[tuple[str, str, int], dict[bool, DemoResult]] = {}
        for rec in res["records"]:
            result = DemoResult(**{k: v for k, v in rec.items() if k in fields})
            by_key.setdefault((rec["example"], rec["length"], rec["seed"]), {})[result.guarded] = result
        for (example, length, seed), pair in by_key.items():
            plain, guarded = pair[False], pair[True]
            margin = story_margin(plain, guarded)
            holds = plain.verdict == "blew up, did not learn" and guarded.verdict == "learned"
            out.append(
                {"path": res["path"], "example": example, "length": length, "steps": plain.steps, "seed": seed,
                 "plain": plain, "guarded": guarded, "margin": margin, "holds": holds}
            )  # fmt: skip
    return out


def _fmt_margin(m: float) -> str:
    return "inf" if math.isinf(m) else f"{m:.2g}x"


def table(rows: list[dict[str, Any]]) -> str:
    """Every cell, one Markdown row."""
    lines = [
        "| kernel path | example | steps | seed | unguarded: peak loss / first | unguarded: final | guarded: final "
        "| guarded: guard events | story margin | story |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        p, g = c["plain"], c["guarded"]
        blow = "non-finite" if math.isinf(p.blow_up_factor) else f"{p.blow_up_factor:.2g}x"
        events = "; ".join(f"{e['step']} {e['kind']} ({e['cause']})" for e in g.events) or "none"
        lines.append(
            f"| {c['path']} | {c['example']} | {c['steps']} | {c['seed']} | {blow} "
            f"| {p.final_metric:.2g} ({p.verdict}) | {g.final_metric:.2g} ({g.verdict}) | {events} "
            f"| {_fmt_margin(c['margin'])} | {'holds' if c['holds'] else 'FAILS'} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    """One Markdown row per (kernel path, example, steps): the cells that hold and the range of each outcome."""
    lines = [
        f"| kernel path | example | steps | story holds (seeds {','.join(map(str, seeds))}) | smallest story margin "
        "| unguarded: final | guarded: final | guarded: guard events |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for c in rows:
        groups.setdefault((c["path"], c["example"], c["steps"]), []).append(c)

    def span(values: list[float]) -> str:
        finite = [v for v in values if not math.isnan(v)]
        nan = len(values) - len(finite)
        parts = []
        if finite:
            lo, hi = min(finite), max(finite)
            parts.append(f"{lo:.2g}" if f"{lo:.2g}" == f"{hi:.2g}" else f"{lo:.2g}-{hi:.2g}")
        if nan:
            parts.append("NaN" if nan == len(values) else f"NaN on {nan}")
        return ", ".join(parts)

    for (path, example, steps), group in groups.items():
        metric = group[0]["plain"].final_metric_name
        kinds = sorted({g["guarded"].guard_account() for g in group})
        lines.append(
            f"| {path} | {example} | {steps} | {sum(c['holds'] for c in group)}/{len(group)} "
            f"| {_fmt_margin(min(c['margin'] for c in group))} "
            f"| {metric} {span([c['plain'].final_metric for c in group])} "
            f"| {metric} {span([c['guarded'].final_metric for c in group])} | {' / '.join(kinds)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--paths", type=_csv, default=["native", "avx2", "sse41"], help="kernel paths (native,avx2,sse41)"
    )
    parser.add_argument("--examples", type=_csv, default=["lstm", "cnn"])
    parser.add_argument("--lengths", type=_csv, default=["default", "quick"], help="default,quick")
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in _csv(v)], default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="kernel paths trained at once (1; the CPU is shared)")
    parser.add_argument("--json", default=None, help="write every run's record to this file")
    parser.add_argument("--write", action="store_true", help="replace the demo-check block in README.md")
    parser.add_argument("--max-steps", type=int, default=None, help="override the steps (a smoke test, not the story)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.examples, args.lengths, args.seeds, Path(args.out), args.max_steps)
        return 0
    unknown = [p for p in args.paths if p not in KERNEL_PATHS]
    if unknown or any(length not in LENGTHS for length in args.lengths):
        parser.error(f"kernel paths are {sorted(KERNEL_PATHS)} and lengths {sorted(LENGTHS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [
            pool.submit(run_path, p, args.examples, args.lengths, args.seeds, Path(tmp), args.max_steps)
            for p in args.paths
        ]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    rows = cells(results)
    held = sum(c["holds"] for c in rows)
    env_words = ", ".join(
        f"{r['path']} = "
        + (" ".join(f"{k}={v}" for k, v in r["env"].items()) or "no variable")
        + f" (torch {r['info'].get('torch')}, ATen capability {r['info'].get('capability')})"
        for r in results
    )
    print()
    print(table(rows))
    print()
    print(summary(rows, args.seeds))
    print()
    worst = min(rows, key=lambda c: c["margin"]) if rows else None
    print(f"story holds in {held}/{len(rows)} cells; kernel paths: {env_words}; {wall:.0f} s")
    if worst is not None:
        print(
            f"smallest story margin {_fmt_margin(worst['margin'])}: {worst['path']} {worst['example']} "
            f"{worst['steps']} steps seed {worst['seed']}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        **{k: v for k, v in c.items() if k not in ("plain", "guarded")},
                        "unguarded": c["plain"].to_dict(),
                        "guarded": c["guarded"].to_dict(),
                    }
                    for c in rows
                ],
                indent=1,
                default=str,
            )  # fmt: skip
        )
    if args.write:
        text = README.read_text()
        if not BLOCK.search(text):
            raise SystemExit("README.md has no demo-check block")
        info = results[0]["info"] if results else {}
        block = summary(rows, args.seeds) + (
            f"\n\nStory holds in {held}/{len(rows)} cells; measured on {_cpu()}, torch {info.get('torch')}, ATen "
            f"capability {info.get('capability')} on every path; {wall:.0f} s with --jobs {args.jobs}."
        )
        README.write_text(BLOCK.sub(lambda m: m.group(1) + block + m.group(2), text))
        print(f"written to {README}")
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
