"""Which runs stay useful? gradguard's defaults against doing nothing and against Lightning's own clipping.

Grid: scenarios (a regression MLP and its BatchNorm variant, gradguard's LSTM and deep-CNN examples, the deep CNN
with an initialisation that explodes under SGD-momentum and under Adam at a too-high LR, a character-level LSTM on
real text; ``benchmarks/scenarios.py``) x settings (the stable reference, a too-high LR from
the first step, an LR that ramps up a few % per step, one bad batch, a burst of bad batches, x1e4 loss spikes, fp16
with a GradScaler on the CPU; not every scenario runs every setting) x methods x seeds. Every run is a real
``Trainer.fit``.

Methods compared in every cell: no tool; Lightning ``Trainer(gradient_clip_val=1.0)`` (norm clipping);
``lightning_gradguard.default_callbacks()`` exactly as a user gets it. ``--methods`` adds the per-method rows
(Lightning ``EarlyStopping(check_finite=True)``, each ``AdaptiveGradientClipping`` method alone, each ``NaNGuard``
action alone, and the defaults with other clipping warm-ups: no ``fallback_max_norm`` cap (the default before
issue 18's last change), alone or with ``fallback_factor`` 3 or 2 instead of 10; the ablation behind the warm-up
discussion in RESULTS.md).

Per run it records: survival (the planned number of steps completed, parameters and floating buffers finite, a finite
final metric), outcome (ok / diverged / halted / stopped early / error), the final validation metric, every figure
``trainer.validate`` returned, the steps whose loss or gradients were non-finite (seen before any callback acted),
the events the gradguard callbacks recorded (every public ``events`` list: ``NaNGuard.events`` holds the guard's
skips, rollbacks, LR cuts and halts, counted as guard events; the monitor's layer-health events are kept apart) and
the wall time of the fit.

The reference of a scenario is the stable setting without any tool, mean over seeds (its min and max are printed).
Acceptance (issue 18), checked at the end for ``default_callbacks()``: survives every explosive and faulted run; ends
within 5% of the reference in >= 90% of them; at least as good as Lightning's ``gradient_clip_val`` in every scenario
x setting cell (mean metric over seeds; a failed run counts as the worst result); zero guard events on stable runs.
Issue 24 adds, for the explosion-at-initialisation cells (:data:`INIT_SCENARIOS`, explosive setting): the defaults
learn on every seed where Lightning's clip learns (learned: the run survived and its metric is at least half the
reference's, or at most twice it when lower is better; chance accuracy is 0.1 against a reference of ~0.9).

Run ``python benchmarks/rescue.py`` (full: 3 seeds, every scenario), ``--quick`` (the three cheap scenarios, 1 seed,
what ``make bench`` runs), ``--json PATH`` for every run's record and the verdicts, ``--report PATH`` to print the
tables of a saved JSON file again. Fits run in ``--workers`` processes (default 2), one torch thread each.
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

SETTINGS = tuple(scenarios.SETTINGS)
FAULTED = scenarios.FAULTED
CLIP_METHODS = ("zscore", "percentile", "agc", "norm", "value", "per_parameter")
GUARD_ACTIONS = ("auto", "rollback", "skip", "halt")
LIGHTNING_CLIP_VAL = 1.0
TOLERANCE = 0.05  # "within 5% of the reference"
WITHIN_GOAL = 0.90  # share of faulted runs that must end within TOLERANCE
TIE = 0.005  # cell means closer than this share of the reference count as equal (seed noise)

NONE, LIGHTNING_CLIP, DEFAULTS = "none", "lightning gradient_clip_val", "gradguard default_callbacks()"
CORE_METHODS = (NONE, LIGHTNING_CLIP, DEFAULTS)
QUICK_SCENARIOS = ("mlp", "bn_mlp", "char_lstm")
# Explosion at initialisation (issue 24): run with --scenarios init_cnn,init_cnn_adam (and in the full grid).
INIT_SCENARIOS = ("init_cnn", "init_cnn_adam")
# The warm-up ablation: default_callbacks() with the adaptive clipper's warm-up options changed (named so that
# "--methods default_callbacks" does not select them; "--methods fallback" does). Without the cap is the default
# before issue 18's last change; the tighter factors were the other candidates.
WARMUP_VARIANTS: tuple[dict[str, float | None], ...] = (
    {"fallback_max_norm": None},
    {"fallback_max_norm": None, "fallback_factor": 3.0},
    {"fallback_max_norm": None, "fallback_factor": 2.0},
)
WARMUP_PREFIX = "gradguard defaults, warm-up "


def warmup_method(options: dict[str, float | None]) -> str:
    return WARMUP_PREFIX + ", ".join(f"{k}={v:g}" if v is not None else f"{k}=None" for k, v in options.items())


# Callbacks whose events describe layers, not interventions: recorded, never counted as guard events.
OBSERVERS = ("GradientNormMonitor",)


def guard_events(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The interventions of a run (skips, rollbacks, LR cuts, halts), without the monitor's layer-health events."""
    return [e for e in r.get("events", []) if e.get("callback") not in OBSERVERS]


def method_names() -> list[str]:
    return (
        list(CORE_METHODS)
        + ["lightning EarlyStopping(check_finite)"]
        + [f"gradguard clip {m}" for m in CLIP_METHODS]
        + [f"gradguard NaNGuard {a}" for a in GUARD_ACTIONS]
        + [warmup_method(options) for options in WARMUP_VARIANTS]
    )


def is_gradguard(method: str) -> bool:
    return method.startswith("gradguard")


def build_method(method: str, scenario: scenarios.Scenario) -> tuple[list[Any], dict[str, Any]]:
    """(callbacks, extra Trainer kwargs) for ``method``."""
    if method == NONE:
        return [], {}
    if method == LIGHTNING_CLIP:
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
    from lightning_gradguard import AdaptiveGradientClipping, NaNGuard, default_callbacks

    if method == DEFAULTS:
        return list(default_callbacks()), {}
    if method.startswith("gradguard clip "):
        return [AdaptiveGradientClipping(method=method.removeprefix("gradguard clip "))], {}
    if method.startswith(WARMUP_PREFIX):
        (options,) = [o for o in WARMUP_VARIANTS if warmup_method(o) == method]
        return list(default_callbacks(clipping_kwargs=options)), {}
    if method.startswith("gradguard NaNGuard "):
        return [NaNGuard(action=method.removeprefix("gradguard NaNGuard "))], {}
    raise ValueError(f"unknown method {method!r}")


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
    try:
        callbacks, trainer_kwargs = build_method(job["method"], sc)
    except Exception as e:  # noqa: BLE001 - e.g. an action this version of the package does not have
        return {
            **job,
            **asdict(scenarios.RunResult(False, "not run", float("nan"), 0, 0, 0.0)),
            "error": f"{type(e).__name__}: {e}",
        }
    with tempfile.TemporaryDirectory() as root:
        res = scenarios.fit(
            job["scenario"],
            root,
            callbacks,
            steps=job["steps"],
            seed=job["seed"],
            tiny=job["tiny"],
            setting=job["setting"],
            trainer_kwargs=trainer_kwargs,
        )
    return {**job, **asdict(res)}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = list(QUICK_SCENARIOS) if args.quick else scenarios.available()
    seeds = [0] if args.quick else list(range(args.seeds))
    methods = list(CORE_METHODS)
    if args.scenarios:
        names = [n for n in args.scenarios.split(",") if n]
    settings = [s for s in args.settings.split(",") if s] if args.settings else list(SETTINGS)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        methods = [m for m in method_names() if any(w in m for w in wanted)]
        if NONE not in methods:
            methods.insert(0, NONE)  # the reference
    jobs = []
    for name in names:
        sc = scenarios.SCENARIOS[name]
        steps = args.steps or (sc.tiny_steps if args.tiny else sc.quick_steps if args.quick else sc.steps)
        for setting in [s for s in settings if s in sc.settings]:
            for method in methods:
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
            f"seed {r['seed']}: {r['outcome']} metric {r['metric']:.4g} guard events {len(guard_events(r))}",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------------------------------
# report


def within(metric: float, ref: float, higher: bool) -> bool:
    """``metric`` no more than ``TOLERANCE`` (relative to ``|ref|``) worse than ``ref``."""
    if not (math.isfinite(metric) and math.isfinite(ref)):
        return False
    slack = TOLERANCE * abs(ref)
    return metric >= ref - slack if higher else metric <= ref + slack


def references(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per scenario: mean, min, max and count of the stable, tool-free runs' metric over seeds."""
    refs: dict[str, dict[str, float]] = {}
    for name in {r["scenario"] for r in results}:
        vals = [
            r["metric"]
            for r in results
            if r["scenario"] == name and r["setting"] == "stable" and r["method"] == NONE and r["survived"]
        ]
        vals = [v for v in vals if math.isfinite(v)]
        train = [
            r.get("train_loss", math.nan)
            for r in results
            if r["scenario"] == name and r["setting"] == "stable" and r["method"] == NONE and r["survived"]
        ]
        train = [v for v in train if math.isfinite(v)]
        refs[name] = {
            "train_loss": statistics.mean(train) if train else float("nan"),
            "mean": statistics.mean(vals) if vals else float("nan"),
            "min": min(vals) if vals else float("nan"),
            "max": max(vals) if vals else float("nan"),
            "n": len(vals),
        }
    return refs


def _cell(results: list[dict[str, Any]], scenario: str, setting: str, method: str) -> list[dict[str, Any]]:
    return [
        r
        for r in results
        if r["scenario"] == scenario and r["setting"] == setting and r["method"] == method and r["outcome"] != "not run"
    ]


def learned(r: dict[str, Any], ref: float, higher: bool) -> bool:
    """The run survived and its metric is at least half the reference's (at most twice it when lower is better): far
    from an untrained model (chance accuracy 0.1 against ~0.9), whatever the seed's luck."""
    if not (r["survived"] and math.isfinite(r["metric"]) and math.isfinite(ref)):
        return False
    return r["metric"] >= 0.5 * ref if higher else r["metric"] <= 2.0 * ref


def cell_mean(cell: list[dict[str, Any]], higher: bool) -> float:
    """Mean metric over seeds; a failed run (not survived) makes the mean the worst value (-inf / +inf)."""
    if not cell:
        return float("nan")
    if any(not r["survived"] or not math.isfinite(r["metric"]) for r in cell):
        return -math.inf if higher else math.inf
    return statistics.mean(r["metric"] for r in cell)


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "fail"
    return f"{x:.4g}"


def acceptance(results: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The criteria of issue 18 for ``default_callbacks()``, with the counts behind each verdict."""
    faulted = [r for r in results if r["method"] == DEFAULTS and r["setting"] in FAULTED and r["outcome"] != "not run"]
    survived = sum(r["survived"] for r in faulted)
    near = sum(
        r["survived"]
        and within(r["metric"], refs[r["scenario"]]["mean"], scenarios.SCENARIOS[r["scenario"]].higher_is_better)
        for r in faulted
    )
    worse: list[str] = []
    compared = 0
    for name in sorted({r["scenario"] for r in results}):
        sc = scenarios.SCENARIOS[name]
        for setting in SETTINGS:
            ours = _cell(results, name, setting, DEFAULTS)
            theirs = _cell(results, name, setting, LIGHTNING_CLIP)
            if not ours or not theirs:
                continue
            compared += 1
            a, b = cell_mean(ours, sc.higher_is_better), cell_mean(theirs, sc.higher_is_better)
            tie = TIE * abs(refs[name]["mean"]) if math.isfinite(refs[name]["mean"]) else 0.0
            if (a < b - tie) if sc.higher_is_better else (a > b + tie):
                worse.append(f"{name}/{setting} ({_fmt(a)} vs {_fmt(b)})")
    init_missed, init_seeds = [], 0
    for name in sorted({r["scenario"] for r in results} & set(INIT_SCENARIOS)):
        sc = scenarios.SCENARIOS[name]
        theirs = {r["seed"]: r for r in _cell(results, name, "explosive", LIGHTNING_CLIP)}
        for r in _cell(results, name, "explosive", DEFAULTS):
            other = theirs.get(r["seed"])
            if other is None or not learned(other, refs[name]["mean"], sc.higher_is_better):
                continue
            init_seeds += 1
            if not learned(r, refs[name]["mean"], sc.higher_is_better):
                init_missed.append(f"{name} seed {r['seed']} ({_fmt(r['metric'])} vs {_fmt(other['metric'])})")
    stable = [r for r in results if r["method"] == DEFAULTS and r["setting"] == "stable" and r["outcome"] != "not run"]
    stable_events = [
        f"{r['scenario']} seed {r['seed']}: {e.get('kind', '?')} {e.get('cause', '')} at step {e.get('step', '?')}"
        for r in stable
        for e in guard_events(r)
    ]
    n = len(faulted)
    monitor_events = sum(len(r.get("events", [])) - len(guard_events(r)) for r in stable)
    return {
        "monitor_layer_events_on_stable": monitor_events,
        "faulted_runs": n,
        "survived": survived,
        "survives_all": {"value": f"{survived}/{n}", "met": n > 0 and survived == n},
        "within_5pct": {
            "value": f"{near}/{n} ({near / n:.0%})" if n else "0/0",
            "met": n > 0 and near >= WITHIN_GOAL * n,
        },
        "not_worse_than_lightning_clip": {
            "value": f"{compared - len(worse)}/{compared} cells",
            "met": compared > 0 and not worse,
            "worse_cells": worse,
        },
        "zero_events_on_stable": {
            "value": f"{len(stable_events)} events in {len(stable)} stable runs",
            "met": bool(stable) and not stable_events,
            "events": stable_events[:20],
        },
        "init_learns_where_clip_learns": {
            "value": f"{init_seeds - len(init_missed)}/{init_seeds} seeds",
            "met": not init_missed,
            "applies": init_seeds > 0,
            "missed": init_missed,
        },
    }


def summary(results: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> str:
    """One row per method over every scenario's explosive and faulted runs: survived, within 5%, other outcomes."""
    rows = []
    for m in method_names():
        cell = [r for r in results if r["method"] == m and r["setting"] in FAULTED and r["outcome"] != "not run"]
        if not cell:
            continue
        surv = sum(r["survived"] for r in cell)
        near = sum(
            r["survived"]
            and within(r["metric"], refs[r["scenario"]]["mean"], scenarios.SCENARIOS[r["scenario"]].higher_is_better)
            for r in cell
        )
        counts: dict[str, int] = {}
        for r in cell:
            if r["outcome"] != "ok":
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"
        events = sum(len(guard_events(r)) for r in cell)
        rows.append([m, f"{surv}/{len(cell)}", f"{near}/{len(cell)}", other, str(events)])
    head = "\n### all scenarios: every explosive and faulted run, every seed\n"
    return (
        head
        + "\n"
        + common.markdown_table(
            [
                "method",
                "survived",
                f"within {TOLERANCE:.0%} of the reference",
                "outcomes other than ok",
                "guard events",
            ],
            rows,
        )
    )


def _too_high_lr_line(results: list[dict[str, Any]]) -> str | None:
    """Issue 18's Adam lr=10 MLP: final val MSE against the healthy run's, or how the guarded run halted."""
    healthy = [r["validate"].get("val_mse") for r in _cell(results, "mlp", "stable", NONE) if r.get("validate")]
    ours = _cell(results, "mlp", "explosive", DEFAULTS)
    healthy = [h for h in healthy if h is not None and math.isfinite(h)]
    if not healthy or not ours:
        return None
    h = statistics.mean(healthy)
    parts = []
    for r in sorted(ours, key=lambda r: r["seed"]):
        mse = r.get("validate", {}).get("val_mse", float("nan"))
        parts.append(f"seed {r['seed']}: {r['outcome']}, val_mse {mse:.4g} ({mse / h:.3g}x)")
    return (
        f"Adam lr 10 MLP (issue 18): healthy val_mse {h:.4g} (stable, no tool, mean over seeds); "
        f"default_callbacks(): " + "; ".join(parts) + " (goal: within 2x, or a halt saying the LR is too high)"
    )


def report(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    refs = references(results)
    lines: list[str] = []
    for name in sorted({r["scenario"] for r in results}, key=lambda n: list(scenarios.SCENARIOS).index(n)):
        sc = scenarios.SCENARIOS[name]
        rs = [r for r in results if r["scenario"] == name]
        settings = [s for s in SETTINGS if any(r["setting"] == s for r in rs)]
        methods = [m for m in method_names() if any(r["method"] == m for r in rs)]
        ref = refs[name]
        arrow = "higher is better" if sc.higher_is_better else "lower is better"
        lines.append(f"\n### {name}: {sc.describe}\n")
        lines.append(
            f"Reference (stable LR, no tool): {sc.metric} mean {ref['mean']:.4g}, min {ref['min']:.4g}, "
            f"max {ref['max']:.4g} over {ref['n']} seed(s) ({arrow}); {rs[0]['steps']} optimizer steps per run, "
            f"median CPU time per fit {statistics.median(r.get('cpu_s', 0.0) for r in rs):.1f} s. "
            f"Cell: survived/runs; runs within {TOLERANCE:.0%} of the reference mean; mean final {sc.metric} over "
            f"seeds ('fail' if any run failed; median of the finite ones in brackets); ev: guard events (skips, "
            "rollbacks, LR cuts, halts; total over seeds).\n"
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
                near = sum(r["survived"] and within(r["metric"], ref["mean"], sc.higher_is_better) for r in cell)
                mean = cell_mean(cell, sc.higher_is_better)
                finite = [r["metric"] for r in cell if math.isfinite(r["metric"])]
                med = f" [{statistics.median(finite):.4g}]" if math.isinf(mean) and finite else ""
                events = sum(len(guard_events(r)) for r in cell)
                outcomes = sorted({r["outcome"] for r in cell if r["outcome"] != "ok"})
                extra = f" ({', '.join(outcomes)})" if outcomes else ""
                ev = f"; ev {events}" if is_gradguard(m) else ""
                row.append(f"{surv}/{len(cell)}{extra}; {near} in 5%; {_fmt(mean)}{med}{ev}")
            rows.append(row)
        lines.append(common.markdown_table(["method"] + settings, rows))
    lines.append(summary(results, refs))
    verdict = acceptance(results, refs)
    if verdict["faulted_runs"]:
        lines.append("\n### acceptance (issue 18), gradguard default_callbacks()\n")
        goal_rows = [
            ["survives every explosive and faulted run", verdict["survives_all"]["value"]],
            [f"ends within {TOLERANCE:.0%} of the reference in >= {WITHIN_GOAL:.0%}", verdict["within_5pct"]["value"]],
            [
                "at least as good as Lightning gradient_clip_val in every cell (mean over seeds)",
                verdict["not_worse_than_lightning_clip"]["value"],
            ],
            ["zero guard events on stable runs", verdict["zero_events_on_stable"]["value"]],
        ]
        keys = ["survives_all", "within_5pct", "not_worse_than_lightning_clip", "zero_events_on_stable"]
        if verdict["init_learns_where_clip_learns"]["applies"]:
            goal_rows.append(
                [
                    "explosion at initialisation: learns on every seed where Lightning gradient_clip_val learns",
                    verdict["init_learns_where_clip_learns"]["value"],
                ]
            )
            keys.append("init_learns_where_clip_learns")
        for row, key in zip(goal_rows, keys):
            row.append("met" if verdict[key]["met"] else "NOT met")
        lines.append(common.markdown_table(["criterion", "measured", "verdict"], goal_rows))
        if verdict["not_worse_than_lightning_clip"]["worse_cells"]:
            lines.append(
                "\nCells worse than Lightning's clip: "
                + "; ".join(verdict["not_worse_than_lightning_clip"]["worse_cells"])
            )
        lines.append(
            f"\n(The monitor's layer-health events on those stable runs, not counted above: "
            f"{verdict['monitor_layer_events_on_stable']}.)"
        )
        if verdict["init_learns_where_clip_learns"]["missed"]:
            lines.append(
                "\nExplosion-at-initialisation seeds where Lightning's clip learned and the defaults did not: "
                + "; ".join(verdict["init_learns_where_clip_learns"]["missed"])
            )
        if verdict["zero_events_on_stable"]["events"]:
            lines.append("\nEvents on stable runs: " + "; ".join(verdict["zero_events_on_stable"]["events"]))
        missed = [
            f"{r['scenario']}/{r['setting']} seed {r['seed']}: {r['outcome']} {r['metric']:.4g} (training loss "
            f"{r.get('train_loss', math.nan):.4g}, reference {refs[r['scenario']]['train_loss']:.4g})"
            for r in results
            if r["method"] == DEFAULTS
            and r["setting"] in FAULTED
            and r["outcome"] != "not run"
            and not (
                r["survived"]
                and within(
                    r["metric"], refs[r["scenario"]]["mean"], scenarios.SCENARIOS[r["scenario"]].higher_is_better
                )
            )
        ]
        if missed:
            lines.append(
                "\nFaulted runs of default_callbacks() not within 5% (with the median training loss of their last "
                "tenth of steps, and the stable runs' mean of it: a run that trains as low as the reference and "
                "validates worse is a generalisation gap, not a gradient fault): " + "; ".join(missed)
            )
    line = _too_high_lr_line(results)
    if line:
        lines.append("\n" + line)
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
    return "\n".join(lines), {"references": refs, "acceptance": verdict}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="the cheap scenarios (" + ", ".join(QUICK_SCENARIOS) + "), 1 seed"
    )
    p.add_argument("--tiny", action="store_true", help="tiny models and steps (used by the test suite)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell in full mode (default 3)")
    p.add_argument("--steps", type=int, default=0, help="override the optimizer steps per run")
    p.add_argument("--workers", type=int, default=2, help="parallel fit processes (default 2, one torch thread each)")
    p.add_argument("--scenarios", default="", help="comma list of scenarios (default: all available)")
    p.add_argument("--settings", default="", help=f"comma list of settings (default: all of {', '.join(SETTINGS)})")
    p.add_argument(
        "--methods",
        default="",
        help="comma list of substrings selecting methods, e.g. 'default_callbacks,NaNGuard' (default: "
        + ", ".join(CORE_METHODS)
        + "; 'none' is always run)",
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
    for name, why in scenarios.unavailable().items():
        print(f"  scenario {name} not available: {why}")
    jobs = plan(args)
    print(f"{len(jobs)} runs", flush=True)
    t0 = time.perf_counter()
    results = run_all(jobs, args.workers)
    wall = time.perf_counter() - t0
    text, verdicts = report(results)
    print(text)
    cpu = sum(r.get("cpu_s", 0.0) for r in results)
    print(
        f"\ntotal wall time {wall:.0f} s; CPU time of the fits {cpu:.0f} s (/ {args.workers} workers = "
        f"{cpu / max(1, args.workers):.0f} s: the wall time to expect on {args.workers} otherwise idle cores, plus "
        f"process start-up); load average after: {common.machine_description(1)['load average (1/5/15 min)']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"command": cmd, "wall_s": wall, "results": results, **verdicts}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
