"""core.sharded / core.grad_stats on hand-made DTensors in 2 gloo processes, against the full tensors.

Row, column, uneven 1-D and replicated layouts; elements of 1e25 (float32 sums of squares overflow); a NaN in one
rank's piece only; a Partial tensor; the all-gather that carries other values with the norms. See
tests/compat/sharded_core_script.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.compat.sharded_core_script import full_tensors
from tests.ddp_runner import run_ddp_script

SCRIPT = Path(__file__).with_name("sharded_core_script.py")
ORDER = ["rows", "cols", "odd", "repl"]


def _norm(values, p):
    mags = [abs(v) for v in values]
    top = max(mags, default=0.0)
    if top == 0 or p == math.inf:
        return top
    return top * math.fsum((m / top) ** p for m in mags) ** (1 / p)


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * max(abs(b), 1e-30)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_core")
    proc = run_ddp_script(SCRIPT, out, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = sorted((json.loads(f.read_text()) for f in out.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in found] == [0, 1]
    return found


@pytest.mark.ddp
@pytest.mark.timeout(150)
def test_norms_of_every_layout_equal_the_full_tensors(ranks):
    full = {k: v.double().flatten().tolist() for k, v in full_tensors().items()}
    assert ranks[0]["local_rows"]["odd"] == [3]  # uneven: 3 + 2 elements
    assert ranks[1]["local_rows"]["odd"] == [2]
    assert ranks[0]["local_rows"]["cols"] == [5, 3]  # column shard: every row split
    for r in ranks:
        for p_key, got in r["norms"].items():
            p = float(p_key)
            for name, value in zip(ORDER, got):
                assert _close(value, _norm(full[name], p)), (p, name)
        assert _close(r["stats"]["total"], _norm([v for n in ORDER for v in full[n]], 2.0))
        assert r["stats"]["all_finite"]
        for name, value in zip(ORDER, r["weight_norms"]):
            assert _close(value, _norm(full[name], 2.0))
    assert ranks[0]["norms"] == ranks[1]["norms"]


@pytest.mark.ddp
@pytest.mark.timeout(150)
def test_nan_in_one_ranks_piece_is_nonfinite_on_both_ranks_for_every_norm(ranks):
    for r in ranks:
        for p_key, got in r["nan_norms"].items():
            assert isinstance(got[1], str), (r["rank"], p_key)  # "nan" or "inf": never a finite number
            assert all(isinstance(v, float) and math.isfinite(v) for i, v in enumerate(got) if i != 1)
    assert ranks[0]["nan_norms"] == ranks[1]["nan_norms"]


@pytest.mark.ddp
@pytest.mark.timeout(150)
def test_unit_norms_per_layout(ranks):
    full = full_tensors()
    rows = {k: [_norm(row.double().flatten().tolist(), 2.0) for row in v] for k, v in full.items() if v.ndim > 1}
    r0, r1 = (r["units"] for r in ranks)
    assert all(_close(a, b) for a, b in zip(r0["rows"] + r1["rows"], rows["rows"]))  # whole rows per rank
    assert len(r0["rows"] + r1["rows"]) == 6
    for u in (r0, r1):
        assert all(math.isfinite(v) for v in u["rows"])  # 1e25 elements: float64 row sums
        assert all(_close(a, b) for a, b in zip(u["cols"], rows["cols"], strict=True))  # split rows, summed
        assert all(_close(a, b) for a, b in zip(u["repl"], rows["repl"], strict=True))
        assert _close(u["odd"][0], _norm(full["odd"].double().tolist(), 2.0))  # a 1-D tensor is one unit


@pytest.mark.ddp
@pytest.mark.timeout(150)
def test_partial_placement_refused_by_name(ranks):
    for r in ranks:
        assert "'head.weight' is a DTensor with a Partial placement" in r["partial_error"]


@pytest.mark.ddp
@pytest.mark.timeout(150)
@pytest.mark.parametrize("key", ["carried", "carried_nan"])
def test_a_measurement_carrying_other_values_gives_the_same_norms_in_one_gather(ranks, key):
    """``compute_grad_stats(..., rider=..., weight_norms=True)`` on shards over both ranks: one all-gather gives the
    norms of the plain measurement's all-reduce bit for bit (every p; a NaN in one rank's piece: the same non-finite
    values), the weight norms of ``weight_norms64``, and the element-wise maximum of the rider's values."""
    for r in ranks:
        for p_key, got in r[key].items():
            assert got["carried"] == got["plain"], p_key
            assert got["carried_weights"] == got["plain_weights"], p_key
            assert got["max"] == [1.0, 0.0, 5.0]  # ranks send [r, -r, 5 - 2.5 r]
            assert got["calls"] == 1
    assert ranks[0][key] == ranks[1][key]
    if key == "carried_nan":
        for p in ("2.0", "3.0", "inf"):  # the NaN piece of "cols" (index 1) makes its norm and the total non-finite
            found = ranks[0][key][p]["carried"]
            assert isinstance(found[1], str)
            assert isinstance(found[3], str)
