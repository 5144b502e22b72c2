"""Regenerate the README's demo figures: every demo mode, unguarded and guarded, on seed 0.

    python tools/demo_figures.py           # print the table
    python tools/demo_figures.py --write   # and replace the block between the demo-figures markers in README.md

tests/examples/test_demo_verdicts.py trains the same runs and fails when README.md differs from this table.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from lightning_gradguard.demo import figures_table, run_demo

README = Path(__file__).resolve().parents[1] / "README.md"
MODES = [(example, quick) for example in ("lstm", "cnn") for quick in (False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for example, quick in MODES:
            for guarded in (False, True):
                results.append(run_demo(example, quick=quick, guarded=guarded, logdir=tmp, progress_bar=False))
                print("\n".join(results[-1].summary_lines()[:1] + results[-1].summary_lines()[-3:-2]), flush=True)
    table = figures_table(results)
    print(table)
    if args.write:
        text = README.read_text()
        pattern = re.compile(r"(<!-- demo-figures:begin[^>]*-->\n).*?(\n<!-- demo-figures:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit("README.md has no demo-figures block")
        README.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
        print(f"written to {README}")


if __name__ == "__main__":
    main()
