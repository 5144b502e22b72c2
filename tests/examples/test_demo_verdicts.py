"""The demo's story in every mode it offers, and the README's demo figures against the demo's verdicts.

Every (example, length) pair is trained unguarded and guarded on the same seed: the unguarded run must blow up and
not learn, the guarded one must learn, and the guard must have acted at the fault. What is asserted are outcomes
with margins (a non-finite loss or one 10x its start, a final metric a wide factor past the example's bars:
:func:`~lightning_gradguard.demo.story_margin`), never the digits of one run: a chaotic training run takes another
trajectory on another CPU kernel path, and these verdicts hold on all of them (``make demo-check`` runs seeds 0-2
under three kernel paths, ``tools/demo_check.py``). Seed 0 runs with the suite (``slow``); seeds 1 and 2 with
``pytest --demo-check`` (``demo_check``, this machine's kernel path only).

The README's table (``tools/demo_figures.py --write``) holds what one machine printed: compared here are its layout
and its verdicts, which every machine shares, not its digits.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lightning_gradguard.demo import DEMOS, FIGURES_HEADER, DemoResult, run_demo, story_margin

MODES = [(example, quick) for example in ("lstm", "cnn") for quick in (False, True)]
README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"<!-- demo-figures:begin[^>]*-->\n(.*?)\n<!-- demo-figures:end -->", re.S)
FINAL = re.compile(r"^(test_\w+) (\S+) \((.+)\)$")

_runs: dict[tuple[str, bool, int], tuple[DemoResult, DemoResult]] = {}


def demo_pair(root: Path, example: str, quick: bool, seed: int) -> tuple[DemoResult, DemoResult]:
    """(unguarded, guarded) runs of one mode and seed, trained once per session."""
    key = (example, quick, seed)
    if key not in _runs:
        logdir = root / f"{example}-{'quick' if quick else 'default'}-{seed}"
        plain, guarded = (
            run_demo(example, quick=quick, guarded=g, logdir=logdir, seed=seed, progress_bar=False)
            for g in (False, True)
        )
        _runs[key] = (plain, guarded)
    return _runs[key]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    pytest.importorskip("sklearn")
    return tmp_path_factory.mktemp("demo_verdicts")


def _cases():
    for example, quick in MODES:
        for seed in (0, 1, 2):
            marks = [pytest.mark.slow if seed == 0 else pytest.mark.demo_check]
            name = f"{example}-{'quick' if quick else 'default'}-seed{seed}"
            yield pytest.param(example, quick, seed, marks=marks, id=name)


@pytest.mark.timeout(3600)  # two full demo runs; minutes on a loaded 2-core machine
@pytest.mark.parametrize(("example", "quick", "seed"), list(_cases()))
def test_unguarded_blows_up_and_does_not_learn_guarded_learns(demo_root, example, quick, seed):
    plain, guarded = demo_pair(demo_root, example, quick, seed)
    settings = DEMOS[example]
    account = "\n".join(plain.summary_lines() + guarded.summary_lines())
    assert plain.steps == guarded.steps == (settings.quick_steps if quick else settings.steps)
    assert guarded.initial_loss == plain.initial_loss  # the same start
    assert plain.verdict == "blew up, did not learn", account
    assert guarded.verdict == "learned", account
    assert story_margin(plain, guarded) >= 1.0, account
    assert guarded.nonfinite_steps == 0, account
    if settings.fault:  # the CNN: the clipper cut the faulty batch's step to a small fraction (its norm is ~1000x)
        assert plain.nonfinite_steps > 0, account  # unguarded, that one batch turns the loss non-finite
        assert guarded.fault_clip is not None, account
        assert guarded.fault_clip < 0.1, account
        assert guarded.skips == guarded.rollbacks == 0, account  # clipping alone, no step dropped
    else:  # the LSTM, lr 1000x too high: the guard rolled back at the blow-up, in its first steps, and cut the LR
        first = guarded.events[0] if guarded.events else {}
        assert first.get("kind") == "rollback", account
        assert first["step"] <= 10, account
        assert first["lr"] <= 0.01 * settings.model["lr"], account


def _readme_rows() -> tuple[str, list[list[str]]]:
    match = BLOCK.search(README.read_text())
    assert match, "README.md lacks the demo-figures block"
    lines = match.group(1).strip().splitlines()
    assert FIGURES_HEADER in lines, "the demo-figures block lacks the table of figures_table()"
    start = lines.index(FIGURES_HEADER)
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[start + 2 :]]
    return "\n".join(lines[:start]), rows


def _past_bar(example: str, cell: str, verdict: str) -> bool:
    """A README cell's metric is on the right side of its verdict's bar (a wide factor past the trivial baseline)."""
    m = FINAL.match(cell)
    assert m, cell
    assert m.group(3) == verdict, cell
    value, settings = float(m.group(2)), DEMOS[example]
    if verdict == "learned":
        return value > settings.learned_bar if settings.higher_is_better else value < settings.learned_bar
    if math.isnan(value):
        return True
    return value <= settings.failed_bar if settings.higher_is_better else value >= settings.failed_bar


def test_readme_demo_figures_are_consistent_and_say_where_they_were_measured():
    """Machine-independent: the layout, one row per mode, each figure on the right side of its verdict's bar."""
    preamble, rows = _readme_rows()
    assert preamble.startswith("Measured on "), preamble  # the figures are one machine's; the README says which
    expected = [(ex, DEMOS[ex].quick_steps if quick else DEMOS[ex].steps) for ex, quick in MODES]
    assert [(row[0], int(row[1])) for row in rows] == expected
    for row in rows:
        assert len(row) == len(FIGURES_HEADER.strip("|").split("|"))
        assert _past_bar(row[0], row[3], "blew up, did not learn"), row
        assert _past_bar(row[0], row[4], "learned"), row
        assert float(row[5].rstrip("x")) >= 1.0, row  # the story margin


@pytest.mark.slow
@pytest.mark.timeout(7200)  # trains every seed-0 pair that the verdict tests have not trained yet
def test_readme_demo_verdicts_are_what_the_demo_gives_here(demo_root):
    _, rows = _readme_rows()
    for (example, quick), row in zip(MODES, rows):
        plain, guarded = demo_pair(demo_root, example, quick, 0)
        assert FINAL.match(row[3]).group(3) == plain.verdict, (row, plain.summary_lines())
        assert FINAL.match(row[4]).group(3) == guarded.verdict, (row, guarded.summary_lines())
