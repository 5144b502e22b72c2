"""Which runs survive? gradguard against doing nothing and against Lightning's own tools.

Grid: scenarios (the LSTM and deep-CNN examples, a character-level LSTM on real text) x settings (stable LR, explosive
LR, NaN inputs, inf inputs, a loss scaled by 1e4) x methods (nothing; Lightning ``gradient_clip_val``; Lightning
``EarlyStopping(check_finite=True)``; each ``AdaptiveGradientClipping`` method; each ``NaNGuard`` action; gradguard's
defaults, clipping plus NaNGuard) x seeds. Every cell is a real ``Trainer.fit``.

Per run it records: survival (the planned number of steps completed, parameters finite and a finite final metric),
outcome (ok / diverged / halted / stopped early / error), the final validation metric, the number of steps whose loss
or gradients were non-finite (seen before any callback acted), and the wall time of the fit.

Goal checked at the end: every gradguard run in the explosive and faulted settings survives and ends within 5% of
the stable, unguarded run's metric (the mean over seeds).

Faults are injected at 30%, 55% and 80% of the run (optimizer steps); see ``benchmarks/scenarios.py``.

Run ``python benchmarks/rescue.py`` (full: 3 seeds, every faulted cell; the stable setting with the methods in
``STABLE_METHODS_FULL``, or every method with ``--all-stable``; ``EXTRA_METHODS`` only when ``--methods`` names
them) or ``--quick`` (a small subset, 1 seed). Fits run in ``--workers`` processes (default 2), one torch thread
each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import scenarios  # noqa: E402

SETTINGS = ("stable", "explosive", "nan", "inf", "spike")
FAULTED = ("explosive", "nan", "inf", "spike")
CLIP_METHODS = ("zscore", "percentile", "agc", "norm", "value", "per_parameter")
GUARD_ACTIONS = ("rollback", "skip", "halt")
LIGHTNING_CLIP_VAL = 1.0
TOLERANCE = 0.05
# Not a default: the same pair with snapshots 5x more often, to show how much of a rollback's cost in these short
# runs comes from the snapshot interval (faults every ~37 steps vs. snapshot_every_n_steps=50 + 10 to confirm).
SNAP10 = "gradguard clip + NaNGuard(snapshot_every_n_steps=10, snapshot_confirm_steps=5)"


# Full mode runs the stable setting (the reference) with these methods only, to fit the time budget: the reference
# itself, Lightning's two tools and gradguard's defaults (do they cost a healthy run anything?).
STABLE_METHODS_FULL = (
    "none",
    "lightning gradient_clip_val",
    "gradguard defaults (clip + NaNGuard)",
)
# Not in the default full grid (time budget); select with --methods.
EXTRA_METHODS = (SNAP10,)


def method_names() -> list[str]:
    return (
        ["none", "lightning gradient_clip_val", "lightning EarlyStopping(check_finite)"]
        + [f"gradguard clip {m}" for m in CLIP_METHODS]
        + [f"gradguard NaNGuard {a}" for a in GUARD_ACTIONS]
        + ["gradguard defaults (clip + NaNGuard)", SNAP10]
    )


def is_gradguard(method: str) -> bool:
    return method.startswith("gradguard")


def build_method(method: str, scenario: scenarios.Scenario) -> tuple[list[Any], dict[str, Any]]:
    """(callbacks, extra Trainer kwargs) for ``method``."""
    if method == "none":
        return [], {}
    if method == "lightning gradient_clip_val":
        return [], {"gradient_clip_val": LIGHTNING_CLIP_VAL}
    if method == "lightning EarlyStopping(check_finite)":
        from lightning.pytorch.callbacks import EarlyStopping

        mode = "max" if scenario.es_higher_is_better else "min"
        return [
            EarlyStopping(
                monitor=scenario.es_monitor,
                mode=mode,
                patience=10**6,
                check_finite=True,
                check_on_train_epoch_end=scenario.es_on_train_epoch_end,
            )
        ], {}
    from lightning_gradguard import AdaptiveGradientClipping, NaNGuard

    if method.startswith("gradguard clip "):
        return [AdaptiveGradientClipping(method=method.removeprefix("gradguard clip "))], {}
    if method.startswith("gradguard NaNGuard "):
        return [NaNGuard(action=method.removeprefix("gradguard NaNGuard "))], {}
    if method == "gradguard defaults (clip + NaNGuard)":
        return [AdaptiveGradientClipping(), NaNGuard()], {}
    if method == SNAP10:
        return [AdaptiveGradientClipping(), NaNGuard(snapshot_every_n_steps=10, snapshot_confirm_steps=5)], {}
    raise ValueError(f"unknown method {method!r}")


def faults_for(setting: str, steps: int) -> scenarios.Faults:
    at = {int(steps * f) for f in (0.30, 0.55, 0.80)}
    if setting == "nan":
        return scenarios.Faults(nan_at=at)
    if setting == "inf":
        return scenarios.Faults(inf_at=at)
    if setting == "spike":
        return scenarios.Faults(spike_at=at)
    return scenarios.Faults()


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One fit (runs in a worker process)."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for n in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(n).setLevel(logging.CRITICAL)
    sc = scenarios.SCENARIOS[job["scenario"]]
    steps = job["steps"]
    try:
        callbacks, trainer_kwargs = build_method(job["method"], sc)
    except Exception as e:  # noqa: BLE001 - e.g. a callback not written yet
        return {
            **job,
            "survived": False,
            "outcome": "not run",
            "metric": float("nan"),
            "nonfinite_steps": 0,
            "steps_done": 0,
            "wall_s": 0.0,
            "error": f"{type(e).__name__}: {e}",
        }
    lr = "explosive" if job["setting"] == "explosive" else "stable"
    with tempfile.TemporaryDirectory() as root:
        res = scenarios.fit(
            job["scenario"],
            root,
            callbacks,
            steps=steps,
            seed=job["seed"],
            lr=lr,
            tiny=job["tiny"],
            faults=faults_for(job["setting"], steps),
            trainer_kwargs=trainer_kwargs,
        )
    return {**job, **asdict(res)}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.quick or args.tiny:
        names = [s for s in ("char_lstm", "lstm") if s in scenarios.available()] if not args.tiny else ["char_lstm"]
        settings = ["stable", "explosive", "nan"] if not args.tiny else ["stable", "nan"]
        methods = [
            "none",
            "lightning gradient_clip_val",
            "gradguard NaNGuard rollback",
            "gradguard defaults (clip + NaNGuard)",
        ]
        if args.tiny:
            methods = ["none", "gradguard defaults (clip + NaNGuard)"]
        seeds = [0]
    else:
        names = list(scenarios.available())
        settings, seeds = list(SETTINGS), list(range(args.seeds))
        methods = [m for m in method_names() if m not in EXTRA_METHODS]
    if args.scenarios:
        names = [n for n in args.scenarios.split(",") if n]
    if args.settings:
        settings = [s for s in args.settings.split(",") if s]
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        methods = [m for m in method_names() if any(w in m for w in wanted)]
    jobs = []
    for name in names:
        sc = scenarios.SCENARIOS[name]
        steps = args.steps or (sc.tiny_steps if args.tiny else sc.quick_steps if args.quick else sc.steps)
        for setting in settings:
            for method in methods:
                if setting == "stable" and method != "none" and (args.quick or args.tiny):
                    continue  # the reference is enough in quick mode
                if setting == "stable" and method not in STABLE_METHODS_FULL and not args.all_stable:
                    continue
                for seed in seeds:
                    jobs.append(
                        {
                            "scenario": name,
                            "setting": setting,
                            "method": method,
                            "seed": seed,
                            "steps": steps,
                            "tiny": bool(args.tiny),
                        }
                    )
    return jobs


def run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    # longest scenarios first keeps both workers busy to the end
    order = sorted(jobs, key=lambda j: -scenarios.SCENARIOS[j["scenario"]].cost)
    if workers <= 1:
        for i, job in enumerate(order, 1):
            results.append(run_one(job))
            _progress(i, len(order), results[-1], t0)
        return results
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, job) for job in order]
        for i, fut in enumerate(as_completed(futures), 1):
            results.append(fut.result())
            _progress(i, len(order), results[-1], t0)
    return results


def _progress(i: int, n: int, r: dict[str, Any], t0: float) -> None:
    if i == n or i % 10 == 0 or n <= 40:
        print(
            f"  [{i}/{n} {time.perf_counter() - t0:.0f} s] {r['scenario']} {r['setting']} {r['method']} "
            f"seed {r['seed']}:"
            f" {r['outcome']} metric {r['metric']:.4g}",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------------------------------
# report


def _within(metric: float, ref: float, higher: bool) -> bool:
    if not (math.isfinite(metric) and math.isfinite(ref)):
        return False
    if higher:
        return metric >= ref * (1 - TOLERANCE) if ref >= 0 else metric >= ref * (1 + TOLERANCE)
    return metric <= ref * (1 + TOLERANCE) if ref >= 0 else metric <= ref * (1 - TOLERANCE)


def references(results: list[dict[str, Any]]) -> dict[str, float]:
    refs: dict[str, float] = {}
    for name in {r["scenario"] for r in results}:
        vals = [
            r["metric"]
            for r in results
            if r["scenario"] == name
            and r["setting"] == "stable"
            and r["method"] == "none"
            and math.isfinite(r["metric"])
        ]
        refs[name] = statistics.mean(vals) if vals else float("nan")
    return refs


def summary(results: list[dict[str, Any]], refs: dict[str, float]) -> str:
    """One row per method over every scenario's explosive and faulted runs: survived, within 5%, other outcomes."""
    rows = []
    for m in method_names():
        cell = [r for r in results if r["method"] == m and r["setting"] in FAULTED and r["outcome"] != "not run"]
        if not cell:
            continue
        surv = sum(r["survived"] for r in cell)
        within = sum(
            r["survived"]
            and _within(r["metric"], refs[r["scenario"]], scenarios.SCENARIOS[r["scenario"]].higher_is_better)
            for r in cell
        )
        counts: dict[str, int] = {}
        for r in cell:
            if r["outcome"] != "ok":
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"
        rows.append([m, f"{surv}/{len(cell)}", f"{within}/{len(cell)}", other])
    head = f"\n### all scenarios: the {', '.join(FAULTED)} settings, every seed\n"
    return (
        head
        + "\n"
        + common.markdown_table(
            ["method", "survived", f"within {TOLERANCE:.0%} of the reference", "outcomes other than ok"], rows
        )
    )


def report(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    refs = references(results)
    lines: list[str] = []
    goal_rows: list[list[str]] = []
    verdicts: dict[str, Any] = {}
    for name in sorted({r["scenario"] for r in results}):
        sc = scenarios.SCENARIOS[name]
        rs = [r for r in results if r["scenario"] == name]
        settings = [s for s in SETTINGS if any(r["setting"] == s for r in rs)]
        methods = [m for m in method_names() if any(r["method"] == m for r in rs)]
        ref = refs[name]
        arrow = "higher is better" if sc.higher_is_better else "lower is better"
        lines.append(f"\n### {name}: {sc.describe}\n")
        lines.append(
            f"Reference (stable LR, no method, mean over seeds): {sc.metric} = {ref:.4g} ({arrow}); "
            f"{rs[0]['steps']} optimizer steps per run. Cell: survived/runs, median final {sc.metric}, "
            f"runs within {TOLERANCE:.0%} of the reference, non-finite steps (total), median fit wall time.\n"
        )
        rows = []
        for m in methods:
            row = [m]
            for s in settings:
                cell = [r for r in rs if r["method"] == m and r["setting"] == s]
                if not cell:
                    row.append("")
                    continue
                if all(r["outcome"] == "not run" for r in cell):
                    row.append("not run")
                    continue
                surv = sum(r["survived"] for r in cell)
                within = sum(r["survived"] and _within(r["metric"], ref, sc.higher_is_better) for r in cell)
                med = statistics.median([r["metric"] for r in cell])
                nonfin = sum(r["nonfinite_steps"] for r in cell)
                wall = statistics.median([r["wall_s"] for r in cell])
                outcomes = sorted({r["outcome"] for r in cell if r["outcome"] != "ok"})
                extra = f" ({', '.join(outcomes)})" if outcomes else ""
                row.append(
                    f"{surv}/{len(cell)}{extra}; {med:.4g}; {within}/{len(cell)} in 5%; nf {nonfin}; {wall:.1f}s"
                )
            rows.append(row)
        lines.append(common.markdown_table(["method"] + settings, rows))
        for m in methods:
            if not is_gradguard(m):
                continue
            cell = [r for r in rs if r["method"] == m and r["setting"] in FAULTED]
            if not cell or all(r["outcome"] == "not run" for r in cell):
                continue
            surv = sum(r["survived"] for r in cell)
            within = sum(r["survived"] and _within(r["metric"], ref, sc.higher_is_better) for r in cell)
            ok = surv == len(cell) and within == len(cell)
            verdicts[f"{name} / {m}"] = ok
            goal_rows.append([name, m, f"{surv}/{len(cell)}", f"{within}/{len(cell)}", "met" if ok else "NOT met"])
    lines.append(summary(results, refs))
    if goal_rows:
        lines.append("\n### goal: every explosive and faulted run survives and ends within 5% of the stable run\n")
        lines.append(
            common.markdown_table(["scenario", "gradguard method", "survived", "within 5%", "goal"], goal_rows)
        )
    errors = sorted(
        {(r["method"], r["error"]) for r in results if r.get("error") and r["outcome"] in ("error", "not run")}
    )
    if errors:
        lines.append("\nErrors (method: first error message):")
        seen: set[str] = set()
        for m, e in errors:
            if m not in seen:
                seen.add(m)
                lines.append(f"- {m}: {e}")
    return "\n".join(lines), verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset: 2 scenarios, 3 settings, 4 methods, 1 seed")
    p.add_argument("--tiny", action="store_true", help="tiny models and a handful of runs (used by the test suite)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell in full mode (default 3)")
    p.add_argument("--steps", type=int, default=0, help="override the optimizer steps per run")
    p.add_argument("--workers", type=int, default=2, help="parallel fit processes (default 2, one torch thread each)")
    p.add_argument("--scenarios", default="", help="comma list of scenarios to run (default: all available)")
    p.add_argument("--settings", default="", help=f"comma list of settings (default: all of {', '.join(SETTINGS)})")
    p.add_argument("--methods", default="", help="comma list of substrings selecting methods, e.g. 'none,NaNGuard'")
    p.add_argument(
        "--all-stable",
        action="store_true",
        help="run every method in the stable setting too (default: " + ", ".join(STABLE_METHODS_FULL) + ")",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every run's record to this JSON file")
    p.add_argument("--report", type=Path, default=None, help="print the tables of a saved --json file; run nothing")
    args = p.parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        print(f"tables of {args.report} (recorded command: {saved.get('command', '?')})")
        print(report(saved["results"])[0])
        return 0
    cmd = "python benchmarks/" + " ".join([Path(__file__).name] + (argv if argv is not None else sys.argv[1:]))
    print(
        f"gradguard rescue benchmark ({'quick' if args.quick else 'full'}{', tiny' if args.tiny else ''}); "
        f"{args.workers} worker process(es), torch.set_num_threads(1) in each"
    )
    print("command:", cmd)
    common.print_machine(common.machine_description(1))
    missing = scenarios.unavailable()
    for name, why in missing.items():
        print(f"  scenario {name} not available: {why}")
    jobs = plan(args)
    print(f"{len(jobs)} runs", flush=True)
    t0 = time.perf_counter()
    results = run_all(jobs, args.workers)
    wall = time.perf_counter() - t0
    text, verdicts = report(results)
    print(text)
    print(
        f"\ntotal wall time {wall:.0f} s; "
        f"load average after: {common.machine_description(1)['load average (1/5/15 min)']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"command": cmd, "wall_s": wall, "results": results, "goal": verdicts}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
