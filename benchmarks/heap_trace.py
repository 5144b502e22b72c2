"""Where a callback's Python heap grows: tracemalloc allocation sites over a long stretch of steps.

A follow-up to ``overhead.py --sections flat``, whose < 16 B/step rule flagged the monitor. Drives one callback
through its per-step hooks inside a real fit (the harness of ``overhead.py``, in ``overhead_common.py``), warms up,
then compares two tracemalloc snapshots taken ``--steps`` steps apart and prints the net growth and the sites that
grew most.
Usage: ``python benchmarks/heap_trace.py [--callback monitor|clip|guard] [--warmup 3000] [--steps 3000]``.
``--renders N`` instead draws the monitor's gradient-flow image N times in blocks of 50 (random values, as in a run)
and prints the traced growth per render of each block: whether matplotlib's caches saturate or keep growing.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import overhead_common as harness  # noqa: E402


def factories() -> dict[str, object]:
    return {
        "monitor": harness.monitor_factory(None),
        "clip": harness.clip_factory("zscore"),
        "guard": harness.guard_factory(action="rollback"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callback", choices=sorted(factories()), default="monitor")
    p.add_argument("--warmup", type=int, default=3000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--top", type=int, default=10)
    common.set_threads(1)
    p.add_argument("--renders", type=int, default=0)
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    print("command: python benchmarks/" + " ".join([Path(__file__).name, *given]))
    if args.renders:
        return trace_renders(args.renders)
    out: dict[str, object] = {}

    def measure(trainer, module, optimizer, batch, params, restore, next_step):  # noqa: ANN001
        with harness.quiet_lightning():
            make = factories()[args.callback]
            driver, err = harness.start_driver(make, trainer, module, optimizer, batch, next_step, args.warmup)
            if driver is None:
                raise SystemExit(f"cannot build, start or warm up the callback: {err}")
            tracemalloc.start(1)
            gc.collect()
            before = tracemalloc.take_snapshot()
            for _ in range(args.steps):
                next_step()
                driver.step()
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
        diffs = after.compare_to(before, "lineno")
        out["total"] = sum(d.size_diff for d in diffs)
        out["top"] = sorted(diffs, key=lambda d: -d.size_diff)[: args.top]
        return {}

    harness.run_in_fit(lambda: harness.mlp(2, 16), 16, measure)
    total = int(out["total"])  # type: ignore[arg-type]
    per_step = total / args.steps
    print(f"net traced heap growth over {args.steps} steps after {args.warmup}: {total} B ({per_step:.1f} B/step)")
    print("sites that grew most (bytes, objects, where):")
    for d in out["top"]:  # type: ignore[attr-defined]
        print(f"  {d.size_diff:+7d} B {d.count_diff:+5d}  {d.traceback[0]}")
    return 0


def trace_renders(renders: int, block: int = 50, layers: int = 12) -> int:
    import numpy as np

    from lightning_gradguard.callbacks._gradient_flow import render_gradient_flow

    names = [f"net.{i}" for i in range(layers)]
    rng = np.random.default_rng(0)

    def render() -> None:
        render_gradient_flow(names, 10.0 ** rng.uniform(-8, 0, layers), 10.0 ** rng.uniform(-6, 1, layers))

    render()  # imports and first-use allocations are not growth
    tracemalloc.start(1)
    gc.collect()
    prev = tracemalloc.get_traced_memory()[0]
    for done in range(block, renders + 1, block):
        for _ in range(block):
            render()
        gc.collect()
        cur = tracemalloc.get_traced_memory()[0]
        print(f"  renders {done - block + 1}-{done}: {(cur - prev) / block:+.0f} B per render")
        prev = cur
    tracemalloc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
