"""What gradguard costs per optimizer step, measured against torch's and Lightning's own tools.

A thin runner: each section is one module, the tables come from ``overhead_report.py``. Sections (all in one
process, interleaved repetitions, medians of per-round ratios; see ``benchmarks/common.py``):

``micro`` (``overhead_micro.py``)
    Per-step cost of each callback, driven through its own hooks inside a real fit, against torch's
    ``clip_grad_norm_(foreach=True)`` and Lightning's ``grad_norm``, on three models (a 48-layer MLP of width 256;
    1000 small parameter tensors; one ``Linear(4096, 4096)``).
``e2e`` (``overhead_e2e.py``)
    End-to-end step time of the two examples (LSTM, deep CNN) and of a model of 1000 small parameter tensors with no
    callbacks, Lightning's ``gradient_clip_val=1.0`` and ``default_callbacks()``: real ``Trainer.fit`` runs, the arms
    interleaved, per-step wall time from a timing callback.
``flat`` (``overhead_flat.py``)
    Per-step time, state size (``torch.save`` of ``state_dict()``), Python-heap growth (tracemalloc) and RSS after 1,
    10^3 and 10^5 statistics updates of each callback.
``cuda`` (``overhead_cuda.py``)
    Only when CUDA is available: host-device synchronisations per step counted with ``torch.cuda.set_sync_debug_mode``.

Run ``python benchmarks/overhead.py`` (full) or ``--quick``. ``--threads`` sets torch's intra-op threads (default 1:
the figures are per-core costs and stay comparable on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from overhead_cuda import measure_cuda_syncs  # noqa: E402
from overhead_e2e import measure_e2e  # noqa: E402
from overhead_flat import measure_flat  # noqa: E402
from overhead_micro import measure_micro  # noqa: E402
from overhead_report import report  # noqa: E402

#: --sections name -> the function that measures it (its module is overhead_<name>.py)
SECTIONS = {"micro": measure_micro, "e2e": measure_e2e, "flat": measure_flat, "cuda": measure_cuda_syncs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, shorter fits, 10^3 instead of 10^5 updates")
    p.add_argument("--tiny", action="store_true", help="tiny models and counts (used by the test suite)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds for micro (default 15, quick 5)")
    p.add_argument("--sections", default="micro,e2e,flat,cuda", help="comma list of micro,e2e,flat,cuda")
    p.add_argument("--models", default="", help="comma list of substrings selecting the micro models (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write all raw figures to this JSON file")
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    desc = common.machine_description(threads)
    print(
        f"gradguard overhead benchmark ({'quick' if args.quick else 'full'}{', tiny' if args.tiny else ''}); "
        f"torch.set_num_threads({args.threads}) -> {threads} thread(s)"
    )
    print(
        "command: python benchmarks/" + " ".join([Path(__file__).name] + (argv if argv is not None else sys.argv[1:]))
    )
    common.print_machine(desc)
    res: dict[str, Any] = {"machine": desc, "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    for section in sections:
        fn = SECTIONS.get(section)
        if fn is None:
            p.error(f"--sections: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        s0 = time.perf_counter()
        res[section] = fn(args)
        print(f"[{section} done in {time.perf_counter() - s0:.1f} s]", flush=True)
    res["machine_after"] = {
        "load average (1/5/15 min)": common.machine_description(threads)["load average (1/5/15 min)"]
    }
    print(report(res))
    print(
        f"\ntotal {time.perf_counter() - t0:.1f} s; "
        f"load average after: {res['machine_after']['load average (1/5/15 min)']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
