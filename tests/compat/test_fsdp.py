"""All three callbacks under 2-process CPU FSDP2 (``ModelParallelStrategy`` + ``fully_shard``), one subprocess run.

What this proves, against a single-process reference rebuilt from the gathered weights and both ranks' batches:
the global, per-parameter and per-layer gradient norms measured on shards (local norms + one all-reduce) equal the
unsharded ones; the fixed-norm clipper's coefficient is the reference one, bit-identical on both ranks, and the
clipped full gradient obeys the bound; the same on a tensor-parallel 1x2 mesh. With faults on rank 1 only (a NaN
loss, a NaN weight shard, a x1e4 spike) both ranks measure, clip and decide identically, skip or roll back at the
same steps to the same snapshot, and each rank's local shards of the weights and Adam state after a skip equal those
before it, after a rollback those of the snapshot, bit for bit. A hang is a timeout, not a stall.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from tests.compat.fsdp_models import build_net, rank_batches
from tests.ddp_runner import run_ddp_script

SCRIPT = Path(__file__).with_name("fsdp_all_callbacks_script.py")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = run_ddp_script(SCRIPT, out, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    def load(fit):
        ranks = sorted((json.loads(f.read_text()) for f in out.glob(f"{fit}_rank*.json")), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranks] == [0, 1], proc.stderr[-3000:]
        return ranks

    fits = ("norm", "faults", "tp", "value", "per_parameter", "percentile", "agc")
    ranks = sorted((json.loads(f.read_text()) for f in out.glob("resume_rank*.json")), key=lambda r: r["rank"])
    return {"out": out, "resume": ranks, **{fit: load(fit) for fit in fits}}


def _fsum_norm(values):
    top = max((abs(v) for v in values), default=0.0)
    return 0.0 if top == 0 else top * math.sqrt(math.fsum((v / top) ** 2 for v in values))


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * max(abs(b), 1e-12)


def _reference_grads(full_weights, step, data_ranks=(0, 1)):
    """Unsharded gradients at ``step``: the mean over the data-parallel ranks' batches (FSDP2 averages), float64."""
    net = build_net().double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(full_weights["net." + name], dtype=torch.float64).reshape(p.shape))
    for rank in data_ranks:
        x, y = rank_batches(rank)[step * 8 : (step + 1) * 8]
        (nn.functional.mse_loss(net(x.double()), y.double()) / len(data_ranks)).backward()
    return {"net." + n: p.grad.flatten().tolist() for n, p in net.named_parameters()}


def _same_on_both_ranks(r0, r1):
    keys = set(r0["rows"][0]) - {"units"}  # unit norms are per rank (their own rows); the rest bit-identical
    assert [{k: row[k] for k in keys} for row in r0["rows"]] == [{k: row[k] for k in keys} for row in r1["rows"]]


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fit", ["norm", "tp"])
def test_sharded_norms_and_clip_coefficient_equal_the_unsharded_reference(fsdp_run, fit):
    """``norm``: FSDP2 over 2 data-parallel ranks; ``tp``: column- and row-wise tensor parallel on a 1x2 mesh."""
    r0, r1 = fsdp_run[fit]
    _same_on_both_ranks(r0, r1)
    assert [row["step"] for row in r0["rows"]] == list(range(8))
    if fit == "tp":  # really both layouts: rows split (column-wise) and columns split (row-wise) on the tp dimension
        placements = r0["rows"][0]["placements"]
        assert "Shard(dim=0))" in placements["net.0.weight"]
        assert "Shard(dim=1))" in placements["net.2.weight"]
        assert "Replicate())" in placements["net.2.bias"]
    clipped = 0
    for row in r0["rows"]:
        assert row["grad_is_dtensor"]
        ref = _reference_grads(row["full_weights"], row["step"], (0, 1) if fit == "norm" else (0,))
        total = _fsum_norm([v for n in row["names"] for v in ref[n]])
        assert _close(row["grad_norm"], total)
        for name, got in zip(row["names"], row["param_norms"]):
            assert _close(got, _fsum_norm(ref[name]))
        for layer, got in zip(row["layer_names"], row["layer_norms"]):
            assert _close(got, _fsum_norm(ref[layer + ".weight"] + ref[layer + ".bias"]))
        assert _close(row["coefficient"], min(1.0, 0.5 / (total + 1e-6)))
        assert row["post_clip_norm"] <= 0.5 * (1 + 1e-5)
        assert _close(row["post_clip_norm"], total * row["coefficient"])
        clipped += row["clipped"]
    assert 0 < clipped < 8  # the bound was active on some steps, not on all


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_monitor_writes_global_values_from_shards(fsdp_run):
    """Rank 0 writes: the logged norm is the global one, value histograms hold every element, the flow image exists."""
    out = Path(fsdp_run["out"], "tb_norm", "version_0")
    acc = EventAccumulator(str(out), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    rows = fsdp_run["norm"][0]["rows"]
    logged = [e.value for e in acc.Scalars("gradguard/grad_norm")]
    assert logged == pytest.approx([row["grad_norm"] for row in rows], rel=1e-6)
    sizes = {"net." + n.rpartition(".")[0]: 0 for n, _ in build_net().named_parameters()}
    for n, p in build_net().named_parameters():
        sizes["net." + n.rpartition(".")[0]] += p.numel()
    for layer, numel in sizes.items():
        hists = acc.Histograms(f"gradguard/grads/{layer}")
        assert len(hists) == len(rows)
        assert all(h.histogram_value.num == numel for h in hists)  # the whole layer, not rank 0's shard
    assert acc.Images("gradguard/gradient_flow")


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_two_dimensional_mesh_2x2_norms_equal_the_unsharded_reference(tmp_path):
    """4 processes: FSDP2 over 2 data-parallel ranks x tensor parallel over 2 (Shard on one mesh dimension,
    Replicate or Shard on the other): the reduction follows each tensor's placement per dimension."""
    proc = run_ddp_script(SCRIPT, tmp_path, timeout=240, args=["mesh2x2"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = sorted((json.loads(f.read_text()) for f in tmp_path.glob("mesh2x2_rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3], proc.stderr[-3000:]
    for other in ranks[1:]:
        _same_on_both_ranks(ranks[0], other)
    rows = ranks[0]["rows"]
    placements = rows[0]["placements"]
    assert "Replicate()" in placements["net.2.bias"]  # replicated on the tensor-parallel dimension only
    assert placements["net.0.weight"].count("Shard") == 2  # sharded on both dimensions
    for row in rows:
        ref = _reference_grads(row["full_weights"], row["step"], (0, 1))
        total = _fsum_norm([v for n in row["names"] for v in ref[n]])
        assert _close(row["grad_norm"], total)
        for name, got in zip(row["names"], row["param_norms"]):
            assert _close(got, _fsum_norm(ref[name]))
        assert _close(row["coefficient"], min(1.0, 0.5 / (total + 1e-6)))


def _row_norms(values, shape_rows):
    rows = [values[i * len(values) // shape_rows : (i + 1) * len(values) // shape_rows] for i in range(shape_rows)]
    return [_fsum_norm(r) for r in rows]


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fit", ["norm", "tp"])
def test_unit_norms_for_agc_on_shards_equal_the_full_row_norms(fsdp_run, fit):
    """core.sharded.unit_norms: rows kept whole by a dim-0 shard are local; split rows and 1-D tensors are summed."""
    r0, r1 = fsdp_run[fit]
    shapes = {"net." + n: tuple(p.shape) for n, p in build_net().named_parameters()}
    for a, b in zip(r0["rows"], r1["rows"]):
        for name, full in a["post_full"].items():
            shape = shapes[name]
            ref = _row_norms(full, shape[0]) if len(shape) > 1 else [_fsum_norm(full)]
            ua, ub = a["units"][name], b["units"][name]
            if len(ua) == len(ub) == len(ref):  # split rows or a 1-D tensor: every rank has every unit's norm
                got = [ua, ub]
            else:  # whole rows per rank, in rank order
                assert len(ua) + len(ub) == len(ref)
                got = [ua + ub]
            for g in got:
                assert all(_close(x, y) for x, y in zip(g, ref)), (name, g, ref)


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_fault_on_one_rank_same_action_on_both_and_bitwise_rollback_per_shard(fsdp_run):
    """Rank 1 alone: NaN loss at step 2, NaN in its weight shard at step 4 (only a rollback undoes it), spike at 6."""
    r0, r1 = fsdp_run["faults"]
    for r in (r0, r1):
        assert r["global_step"] == 8
        assert all(math.isfinite(v) for vs in r["final_full_weights"].values() for v in vs)
    assert r0["rows"] == r1["rows"]  # same norms, thresholds, coefficients and guard reasons, step by step
    rows = r0["rows"]
    assert math.isnan(rows[2]["grad_norm"])
    assert math.isnan(rows[4]["grad_norm"])
    assert rows[4]["reason"] == "rolled_back"
    assert rows[6]["clipped"]  # the rank-1 spike, clipped with the same coefficient on both ranks
    assert rows[6]["coefficient"] < 1e-3
    for row in rows[:2] + rows[5:]:  # the monitor saw the same pre-clip norm
        assert row["monitor_grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-6)
    actions = [[(e["step"], e["kind"], e["snapshot_step"]) for e in r["events"]] for r in (r0, r1)]
    assert actions[0] == actions[1]  # the same action at the same steps, to the same snapshot
    assert (4, "rollback") in [a[:2] for a in actions[0]]  # the NaN weight shard: only a rollback undoes it
    for r in (r0, r1):
        states = r["local_states"]  # this rank's shards after each step, keyed by global_step
        for step, kind, snapshot_step in (a for a in actions[0] if a[1] in ("skip", "rollback")):
            after = states[str(step + 1)]
            before = states[str(step if kind == "skip" else snapshot_step)]
            assert after["weights"] == before["weights"], (kind, step)  # bit for bit, shard by shard
            assert after["opt"] == before["opt"], (kind, step)
            if kind == "rollback":  # cut by lr_factor once per rollback so far (the cut is kept across rollbacks)
                assert any(after["lr"] == before["lr"] * 0.5**k for k in range(1, len(actions[0]) + 1))
    # the shards differ between ranks (rank 1 holds an empty piece of the 1x12 output weight): really sharded
    assert len(r0["local_states"]["8"]["weights"]["net.4.weight"]) == 12
    assert r1["local_states"]["8"]["weights"]["net.4.weight"] == []
    assert r0["final_full_weights"] == r1["final_full_weights"]


#: NaNGuard state that a resume renews by design: the run identity (snapshots come only from this run's files) and
#: the in-memory snapshot list (a fresh snapshot of the resumed state is taken at the start).
_RENEWED_ON_RESUME = {"run_id", "snapshots"}


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_resume_from_a_distributed_checkpoint_keeps_every_callbacks_state(fsdp_run):
    ranks = fsdp_run["resume"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["checkpoint_is_dir"]  # a distributed checkpoint (one directory of shards), not a single file
        saved, resumed = r["saved"], r["resumed"]
        assert resumed["global_step"] == saved["global_step"] == 6
        assert r["resumed_steps"] == [7, 8, 9]
        assert resumed["lr"] == saved["lr"]  # the guard's LR cut survived with the optimizer state
        for name in ("GradientNormMonitor", "AdaptiveGradientClipping"):
            assert resumed["states"][name] == saved["states"][name], name
        # Lightning saves rank 0's callback state; a per-rank loss history on other ranks comes back as rank 0's
        skip = _RENEWED_ON_RESUME | ({"loss_history"} if r["rank"] else set())
        guard_saved, guard_resumed = saved["states"]["NaNGuard"], resumed["states"]["NaNGuard"]
        assert set(guard_saved) == set(guard_resumed)
        assert {k: v for k, v in guard_saved.items() if k not in skip} == {
            k: v for k, v in guard_resumed.items() if k not in skip
        }
    # one state, the same on every rank, except what each rank holds itself: its snapshots' bytes (local shards)
    same = [{**r["resumed"]["states"], "NaNGuard": _without_sizes(r["resumed"]["states"]["NaNGuard"])} for r in ranks]
    assert same[0] == same[1]


def _without_sizes(state):
    return {**state, "snapshots": [{k: v for k, v in s.items() if k != "nbytes"} for s in state["snapshots"]]}


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["value", "per_parameter", "percentile", "agc"])
def test_every_clipping_method_on_shards_obeys_its_bound_identically_on_both_ranks(fsdp_run, method):
    r0, r1 = fsdp_run[method]
    assert r0["rows"] == r1["rows"]  # same decisions and the same full gradients after clipping
    rows = r0["rows"]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert rows[2]["pre_clip_norm"] > 100 * rows[1]["pre_clip_norm"]  # the rank-1 spike reached both ranks
    for row in rows:
        if method == "value":
            assert row["max_abs"] <= 0.05 * (1 + 1e-6)
        elif method == "per_parameter":
            assert max(row["param_norms"]) <= 0.1 * (1 + 1e-5)
        elif method == "percentile" and row["step"] >= 2:  # past warm-up: the global norm is held to the threshold
            assert row["post_clip_norm"] <= row["threshold"] * (1 + 1e-5)
        elif method == "agc":  # every unit (row, or whole 1-D tensor) within clipping x its weight norm
            assert row["agc_ratio_max"] <= 1 + 1e-4
    assert rows[2]["clipped"]
