"""Which gradguard callback costs what end to end: overhead.py's e2e measurement, one callback set at a time.

A supplement to ``overhead.py --sections e2e`` (the same ``overhead_e2e.measure_e2e``: same fits, same interleaving,
same median of pair ratios), run with each of the three default callbacks alone and with
``default_callbacks(progress_bar=False)``, to explain the end-to-end overhead of the defaults. Usage:
``python benchmarks/e2e_breakdown.py [--pairs 8] [--steps 150] [--examples lstm,deep_cnn]`` (``--examples`` takes any
of the e2e models: ``lstm``, ``deep_cnn``, ``many_small``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from overhead_e2e import measure_e2e  # noqa: E402


def variants() -> dict[str, Callable[[], list[Callback]]]:
    from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard, default_callbacks

    return {
        "default_callbacks()": default_callbacks,
        "default_callbacks(progress_bar=False)": lambda: default_callbacks(progress_bar=False),
        "GradientNormMonitor() alone": lambda: [GradientNormMonitor()],
        "AdaptiveGradientClipping() alone": lambda: [AdaptiveGradientClipping()],
        "NaNGuard() alone": lambda: [NaNGuard()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--examples", default="lstm,deep_cnn")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    threads = common.set_threads(1)
    print(
        "command: python benchmarks/" + " ".join([Path(__file__).name] + (argv if argv is not None else sys.argv[1:]))
    )
    common.print_machine(common.machine_description(threads))
    examples = tuple(e for e in args.examples.split(",") if e)
    rows = []
    for label, make in variants().items():
        ns = argparse.Namespace(tiny=args.tiny, quick=False)
        res = measure_e2e(ns, args.pairs, args.steps, models=examples, guarded=make)["examples"]
        for name, e in res.items():
            if "skipped" in e:
                print(f"  {label} / {name}: skipped ({e['skipped']})", flush=True)
                continue
            lo, hi = e["overhead_iqr"]
            rows.append(
                [
                    label,
                    name,
                    common.fmt_time(e["unguarded_step_s"]),
                    common.fmt_time(e["guarded_step_s"]),
                    f"{e['overhead'] * 100:+.1f}%",
                    f"{lo * 100:+.1f}% to {hi * 100:+.1f}%",
                ]
            )
            print(f"  {label} / {name}: {e['overhead'] * 100:+.1f}%", flush=True)
    print(f"\n### end-to-end overhead by callback ({args.pairs} interleaved pairs of fits, {args.steps} steps each)\n")
    print(
        common.markdown_table(
            [
                "gradguard callbacks",
                "example",
                "unguarded step",
                "guarded step",
                "overhead (median of pair ratios)",
                "IQR",
            ],
            rows,
        )
    )
    print(f"\nload average after: {common.machine_description(threads)['load average (1/5/15 min)']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
