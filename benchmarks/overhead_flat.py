"""``overhead.py --sections flat``: does a callback stay flat in time and memory over a long run?

Each callback on a tiny model (a 2-layer MLP of width 16), its hooks called 1, 10^3 and 10^5 times (quick: 1, 100,
1000); after each mark a block of further steps is timed, its Python-heap growth measured with ``tracemalloc``, the
``state_dict()`` serialised size (``torch.save``) and the process RSS recorded.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import common
import lightning.pytorch as pl
import torch
from overhead_common import (
    CLIP_METHODS,
    clip_factory,
    guard_factory,
    mlp,
    monitor_factory,
    quiet_lightning,
    run_in_fit,
    start_driver,
)


def _state_bytes(cb: pl.Callback) -> int:
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    return buf.tell()


def flat_candidates() -> list[tuple[str, Callable[[], pl.Callback]]]:
    """Each clipping method, the monitor and the rollback guard, all at their defaults."""
    return [(f"clip {m}", clip_factory(m)) for m in CLIP_METHODS] + [
        ("monitor (defaults)", monitor_factory(None)),
        ("NaNGuard rollback (defaults)", guard_factory(action="rollback")),
    ]


def measure_flat(args: argparse.Namespace) -> dict[str, Any]:
    marks = [1, 100, 1000] if args.quick else [1, 1000, 100000]
    if args.tiny:
        marks = [1, 30, 100]
    block = 30 if args.tiny else (100 if args.quick else 200)
    heap_block = 30 if args.tiny else (300 if args.quick else 1000)
    cands = flat_candidates()

    def measure(trainer, module, optimizer, batch, params, restore, next_step):  # noqa: ANN001
        res: dict[str, Any] = {}
        for label, make in cands:
            with quiet_lightning():
                driver, err = start_driver(make, trainer, module, optimizer, batch, next_step)
                if driver is None:
                    res[label] = {"skipped": err}
                    continue
                rows = []
                done = 0
                clock = time.perf_counter
                for mark in marks:
                    while done < mark:
                        next_step()
                        driver.step()
                        done += 1
                    # right after `mark` updates: a timed block (no tracing), then a traced block for heap growth
                    times = [0.0] * block
                    for i in range(block):
                        next_step()
                        t0 = clock()
                        driver.step()
                        times[i] = clock() - t0
                    # Traced memory after one block and after a second one: objects that are merely replaced
                    # every step (the latest record, bounded histories) cancel out; only retention remains.
                    tracemalloc.start()
                    for _ in range(heap_block):
                        next_step()
                        driver.step()
                    gc.collect()
                    heap0 = tracemalloc.get_traced_memory()[0]
                    for _ in range(heap_block):
                        next_step()
                        driver.step()
                    gc.collect()
                    heap_growth = tracemalloc.get_traced_memory()[0] - heap0
                    tracemalloc.stop()
                    done += block + 2 * heap_block
                    rows.append(
                        {
                            "updates": mark,
                            "median_step_s": statistics.median(times),
                            "state_bytes": _state_bytes(driver.cb),
                            "heap_growth_per_step_bytes": heap_growth / heap_block,
                            "rss_bytes": common.rss_bytes(),
                        }
                    )
            res[label] = {"rows": rows}
            print(f"  flat {label}: done {done} updates", flush=True)
        return res

    res = run_in_fit(lambda: mlp(2, 16), 16, measure)
    return {"marks": marks, "block": block, "heap_block": heap_block, "callbacks": res}
