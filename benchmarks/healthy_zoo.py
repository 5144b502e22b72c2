"""Do no harm (issue 24): gradguard on ordinary healthy training runs, which it must leave alone.

The shapes are in ``benchmarks/zoo_shapes.py`` (its docstring says why each one is in the zoo). Every shape is run
on seeds 0, 1, 2 under three configurations: no callbacks (the reference), ``lightning_gradguard.default_callbacks()``
exactly as a user gets it, and ``lightning_gradguard.NaNGuard()`` alone; ``masked_start_15`` also runs
``AdaptiveGradientClipping("zscore")`` alone (``--configs`` runs any configuration on every shape). The fault shapes
(a corrupt label every 20th / 5th batch) add a reference in which the corrupt batches are dropped.

A row (shape x configuration, over the seeds) passes when every seed does: no exception, zero actions (skip of a
finite batch, rollback, LR cut, restart, halt: ``NaNGuard.events`` entries of those kinds; other kinds, e.g. a
warning, are counted apart and allowed) and a final metric within the tolerance of the same seed's no-callback run,
or better (2 % relative; for metrics that can be near 0 or negative, 2 % of the distance the no-callback run travelled
from its start state when that is larger: see ``zoo_shapes.tolerance``). The reference row passes when the shape
trains: its metric improves on every seed by at least 5 % of its start value. Fault rows pass when every corrupt
batch is skipped, nothing else is done, and the metric is within the tolerance of the run that drops those batches.

The table also gives, per seed, the actions, the warnings and the metric against the reference (a ratio, or the
signed difference for near-zero metrics); below it, for every failing row, the first events with their reasons, any
exception and the final LR against the reference's. The exit code is 0 iff every row passes.

Run ``python benchmarks/healthy_zoo.py`` (all shapes, 3 seeds, 2 worker processes with one torch thread each);
``--shapes a,b``, ``--seeds 0``, ``--configs defaults``, ``--workers N``, ``--steps-scale 0.5`` (shorter fits),
``--json PATH`` (every run's record), ``--list`` (the shapes and what they stress). The package imported is printed
(``PYTHONPATH=/path/to/checkout`` runs the zoo against another version of gradguard).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
_SYS_PATH = list(sys.path)

import common  # noqa: E402
import zoo_shapes as zoo  # noqa: E402

# common.py puts this checkout first on sys.path (for scripts run from anywhere); the zoo finds lightning_gradguard
# the ordinary way instead (the installed package, or PYTHONPATH=/other/checkout to measure another version).
sys.path[:] = _SYS_PATH

MIN_GAIN = 0.05  # a shape "trains" when its reference metric improves by at least this share of its start value


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One fit, in a worker process (one torch thread, warnings and Lightning's info lines off)."""
    zoo.quiet()
    try:
        return zoo.run(job["shape"], job["config"], job["seed"], job["steps"])
    except Exception as e:  # noqa: BLE001 - a shape that cannot even be built is a failed row, not a dead benchmark
        return {
            **job,
            "error": f"run: {type(e).__name__}: {e}",
            "metric": float("nan"),
            "start_metric": float("nan"),
            "events": [],
            "actions": [],
            "warnings": [],
            "nonfinite_skips": [],
            "lrs": [],
            "fault_steps": [],
            "cpu_s": 0.0,
            "wall_s": 0.0,
        }


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = [n for n in args.shapes.split(",") if n] if args.shapes else list(zoo.SHAPES)
    unknown = [n for n in names if n not in zoo.SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {', '.join(zoo.SHAPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    wanted = [c for c in args.configs.split(",") if c] if args.configs else None
    for c in wanted or []:
        if c not in zoo.CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}; known: {', '.join(zoo.CONFIGS)}")
    jobs = []
    for name in names:
        sh = zoo.SHAPES[name]
        steps = max(10, round(sh.steps * args.steps_scale))
        for config in zoo.configs_for(sh, wanted):
            for seed in seeds:
                jobs.append({"shape": name, "config": config, "seed": seed, "steps": steps})
    return jobs


def run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    order = sorted(jobs, key=lambda j: -zoo.SHAPES[j["shape"]].cost)  # longest first keeps the workers busy
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if workers <= 1:
        for i, job in enumerate(order, 1):
            results.append(run_job(job))
            _progress(i, len(order), results[-1], t0)
        return results
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_job, job) for job in order]
        for i, fut in enumerate(as_completed(futures), 1):
            results.append(fut.result())
            _progress(i, len(order), results[-1], t0)
    return results


def _progress(i: int, n: int, r: dict[str, Any], t0: float) -> None:
    if i == n or i % 25 == 0:
        print(
            f"  [{i}/{n} {time.perf_counter() - t0:.0f} s] last: {r['shape']} {r['config']} seed {r['seed']}",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Report


def _index(results: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["shape"], r["config"], r["seed"]): r for r in results}


def _short(kinds: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def row_verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per (shape, configuration): per-seed cells, pass/fail and the reasons."""
    idx = _index(results)
    rows = []
    seen: list[tuple[str, str]] = []
    for r in results:
        key = (r["shape"], r["config"])
        if key not in seen:
            seen.append(key)
    order = {n: i for i, n in enumerate(zoo.SHAPES)}
    seen.sort(
        key=lambda k: (
            zoo.SHAPES[k[0]].section != "healthy",
            order[k[0]],
            k[1] != zoo.reference_config(zoo.SHAPES[k[0]]),
            list(zoo.CONFIGS).index(k[1]),
        )
    )
    for shape, config in seen:
        sh = zoo.SHAPES[shape]
        seeds = sorted(r["seed"] for r in results if r["shape"] == shape and r["config"] == config)
        ref_config = zoo.reference_config(sh)
        actions, warnings, metrics, why = [], [], [], {}
        is_ref = config == ref_config
        informational = sh.section == "faults" and config == "none"  # the unguarded fault run: shows the fault
        for seed in seeds:
            rec = idx[(shape, config, seed)]
            ref = idx.get((shape, ref_config, seed))
            if sh.section == "faults" and not is_ref and not informational:
                faults = set(rec.get("fault_steps", []))
                skipped = {e.get("step") for e in rec["events"] if e.get("kind") == "skip"} & faults
                other = [
                    e
                    for e in rec["events"]
                    if e.get("kind") in zoo.ACTION_KINDS and not (e.get("kind") == "skip" and e.get("step") in faults)
                ]
                actions.append(f"skip {len(skipped)}/{len(faults)}" + (f" +{len(other)}" if other else ""))
            else:
                actions.append(str(len(rec["actions"])))
            warnings.append(str(len(rec["warnings"])))
            if is_ref:
                ok = zoo.trains(sh, rec, MIN_GAIN)
                metrics.append(f"{zoo._num(rec['start_metric']):.3g}->{zoo._num(rec['metric']):.3g}")
                problems = [] if ok else [f"does not train: {rec['start_metric']} -> {rec['metric']} {rec['error']}"]
            else:
                cell = zoo.metric_cell(sh, zoo._num(rec["metric"]), zoo._num(ref["metric"]) if ref else math.nan)
                problems = zoo.judge(sh, rec, ref)
                metrics.append(cell + ("!" if any(p.startswith("metric") for p in problems) else ""))
            if informational:
                problems = []
            if problems:
                why[seed] = problems
        rows.append(
            {
                "shape": shape,
                "section": sh.section,
                "config": config,
                "seeds": seeds,
                "actions": actions,
                "warnings": warnings,
                "metrics": metrics,
                "passed": not why,
                "informational": informational,
                "reference": is_ref,
                "why": why,
            }
        )
    return rows


def report(results: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    rows = row_verdicts(results)
    idx = _index(results)
    lines: list[str] = []
    shapes_run = list(dict.fromkeys(r["shape"] for r in rows))
    lines.append("\n### Each shape trains without callbacks (start state -> final metric, per seed)\n")
    train_rows = []
    for name in shapes_run:
        sh = zoo.SHAPES[name]
        ref_rows = [r for r in rows if r["shape"] == name and r["reference"]]
        if not ref_rows:
            continue
        rr = ref_rows[0]
        train_rows.append(
            [
                name,
                f"{sh.metric} ({'higher' if sh.higher_is_better else 'lower'} is better; tolerance {sh.tolerance})",
                " / ".join(rr["metrics"]),
                "yes" if rr["passed"] else "NO",
            ]
        )
    lines.append(common.markdown_table(["shape", "metric", "no callbacks: start -> final", "trains"], train_rows))
    for section, title in (("healthy", "Healthy shapes"), ("faults", "Faults (not healthy without a tool)")):
        sec = [r for r in rows if r["section"] == section]
        if not sec:
            continue
        lines.append(f"\n### {title}\n")
        if section == "faults":
            lines.append(
                "Reference: `dropped` (no callbacks, the corrupt batches not trained on). Actions column: corrupt "
                "batches skipped / corrupt batches, + other actions. The `none` rows show the fault (not judged).\n"
            )
        table = []
        for r in sec:
            sh = zoo.SHAPES[r["shape"]]
            verdict = "info" if r["informational"] else ("pass" if r["passed"] else "FAIL")
            metric_head = "ref: " if r["reference"] else ""
            table.append(
                [
                    r["shape"],
                    sh.what,
                    r["config"],
                    " / ".join(r["actions"]),
                    " / ".join(r["warnings"]),
                    metric_head + " / ".join(r["metrics"]),
                    verdict,
                ]
            )
        lines.append(
            common.markdown_table(
                [
                    "shape",
                    "what it is",
                    "config",
                    "actions per seed",
                    "warnings per seed",
                    "metric vs no callbacks (ratio)",
                    "pass",
                ],
                table,
            )
        )
    lines.append(
        "\nMetric cell: final / reference of the same seed (ratio), or final - reference (signed difference) for "
        "`travel` metrics; `!` marks a seed outside the tolerance (2 % of the reference; `travel`: 2 % of "
        "max(|reference|, |start - reference|)). Reference rows show start -> final."
    )
    failing = [r for r in rows if not r["passed"] and not r["informational"]]
    if failing:
        lines.append("\n### Why the failing rows fail (first events per seed)\n")
        for r in failing:
            sh = zoo.SHAPES[r["shape"]]
            ref_config = zoo.reference_config(sh)
            lines.append(f"- **{r['shape']} / {r['config']}**")
            for seed, problems in sorted(r["why"].items()):
                rec = idx[(r["shape"], r["config"], seed)]
                ref = idx.get((r["shape"], ref_config, seed))
                kinds = _short([str(e.get("kind")) for e in rec["events"]])
                lr = zoo.lr_ratio(rec, ref)
                parts = [f"events: {kinds or 'none'}"]
                if math.isfinite(lr) and lr != 1.0:
                    parts.append(f"final LR x{lr:.3g} of the reference's")
                # the events are listed below; the other problems (exception, metric, missed skips) in full
                parts += [p for p in problems if " actions: " not in p]
                lines.append(f"  - seed {seed}: " + "; ".join(parts))
                for e in rec["events"][:2]:
                    lines.append(f"    - {zoo.event_line(e, 240)}")
    judged = [r for r in rows if not r["informational"]]
    passed = sum(r["passed"] for r in judged)
    healthy = [r for r in judged if r["section"] == "healthy" and not r["reference"]]
    faults = [r for r in judged if r["section"] == "faults" and not r["reference"]]
    clean_shapes = [
        s
        for s in shapes_run
        if all(r["passed"] for r in judged if r["shape"] == s) and any(r["shape"] == s for r in judged)
    ]
    refs = [r for r in judged if r["reference"]]
    crashed = sum(bool(x.get("error")) for x in results if x["config"] not in ("none", "dropped"))
    lines.append(
        f"\nSummary: {passed}/{len(judged)} rows pass (guarded healthy rows {sum(r['passed'] for r in healthy)}/"
        f"{len(healthy)}, guarded fault rows {sum(r['passed'] for r in faults)}/{len(faults)}, references that train "
        f"{sum(r['passed'] for r in refs)}/{len(refs)}); shapes with every row passing: {len(clean_shapes)}/"
        f"{len(shapes_run)}; guarded runs with an exception: {crashed}."
    )
    return "\n".join(lines), rows


def list_shapes() -> str:
    rows = []
    for sh in zoo.SHAPES.values():
        rows.append(
            [
                sh.name,
                sh.section,
                sh.what,
                f"{sh.metric} ({'higher' if sh.higher_is_better else 'lower'} better)",
                str(sh.steps),
                ", ".join(zoo.configs_for(sh)),
                sh.issue_row or "",
            ]
        )
    return common.markdown_table(
        ["shape", "section", "what it is", "metric", "steps", "configs", "row of issue 24's table"], rows
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="", help="comma list of shapes (default: all; --list names them)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument(
        "--configs",
        default="",
        help=f"comma list of configurations from {', '.join(zoo.CONFIGS)} (default: none,defaults,nanguard plus the "
        "shape's extras; the reference is always run)",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel fit processes (default 2, one torch thread each)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every shape's steps (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write every run's record and the verdicts here")
    p.add_argument("--list", action="store_true", help="print the shapes and exit")
    args = p.parse_args(argv)
    if args.list:
        print(list_shapes())
        return 0
    import lightning_gradguard

    cmd = "python benchmarks/" + " ".join([Path(__file__).name] + (argv if argv is not None else sys.argv[1:]))
    print(f"gradguard healthy-shape zoo; {args.workers} worker process(es), torch.set_num_threads(1) in each")
    print("command:", cmd)
    print("package:", Path(lightning_gradguard.__file__).parent)
    common.print_machine(common.machine_description(1))
    jobs = plan(args)
    print(f"{len(jobs)} fits", flush=True)
    t0 = time.perf_counter()
    results = run_all(jobs, args.workers)
    wall = time.perf_counter() - t0
    text, rows = report(results)
    print(text)
    cpu = sum(r.get("cpu_s", 0.0) for r in results)
    print(
        f"\ntotal wall time {wall:.0f} s for {len(jobs)} fits; CPU time of the fits {cpu:.0f} s; load average after: "
        f"{common.machine_description(1)['load average (1/5/15 min)']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"command": cmd, "wall_s": wall, "results": results, "rows": rows},
                indent=1,
                default=str,
            )
        )
    ok = all(r["passed"] for r in rows if not r["informational"])
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
