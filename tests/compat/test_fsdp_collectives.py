"""Under FSDP2 the three callbacks exchange everything they need with the other ranks in one collective per step.

The sharded measurement's gather carries the guard's step values (loss, flags; their maximum over the ranks) and,
on logging steps, the weight norms, so that neither the guard nor the monitor calls a collective of its own. What
this proves, in 2 gloo processes (``fsdp_collectives_script.py``):

- ``default_callbacks()`` as shipped calls exactly one collective (an ``all_gather_into_tensor``) in
  ``on_before_optimizer_step`` at every step; the only other ones are the monitor's gradient-flow capture of step 0
  (every ``flow_every_n_logs``-th logging step);
- logging steps (the monitor reads the weight norms) also call one;
- on faults, gradient accumulation and manual optimization with two optimizers, the fits with the values carried
  and the fits with separate collectives (the measurement's all-reduce, then the guard's) agree bit for bit: every
  measured norm, clip record, detector state (the loss-spike window moved once per step), decision, event, logged
  tag, counter and final weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compat.common import tb_scalars
from tests.ddp_runner import run_ddp_script

SCRIPT = Path(__file__).with_name("fsdp_collectives_script.py")
GATHER = ["all_gather_into_tensor"]
FLOW = ["all_gather_into_tensor", "all_reduce", "all_reduce"]  # + the gradient-flow capture (per-layer L1 and max)


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_collectives")
    proc = run_ddp_script(SCRIPT, out, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    def load(fit):
        ranks = sorted((json.loads(f.read_text()) for f in out.glob(f"{fit}_rank*.json")), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranks] == [0, 1], proc.stderr[-3000:]
        return ranks

    pairs = [f"{b}_{m}" for b in ("faults", "accumulate", "manual") for m in ("fused", "separate")]
    names = ["default", "logging", *pairs]
    return {"out": out, **{name: load(name) for name in names}}


def _steps(rank):
    return [row for row in rank["rows"] if "step" in row]


@pytest.mark.ddp
@pytest.mark.timeout(450)
def test_default_callbacks_call_one_collective_per_step(fits):
    for r in fits["default"]:
        assert r["global_step"] == 12
        assert r["hook"] == {str(s): FLOW if s == 0 else GATHER for s in range(12)}
        assert r["batch_end"] == {}  # no snapshot within these steps (every 50)
        assert all(row["carried"] for row in _steps(r))


@pytest.mark.ddp
@pytest.mark.timeout(450)
def test_logging_steps_carry_the_weight_norms_in_the_same_collective(fits):
    for r in fits["logging"]:
        assert r["hook"] == {str(s): GATHER for s in range(6)}
        assert [row["weight_norms_measured"] for row in _steps(r)] == [s % 2 == 0 for s in range(6)]


@pytest.mark.ddp
@pytest.mark.timeout(450)
@pytest.mark.parametrize("fit", ["faults", "accumulate", "manual"])
def test_carried_and_separate_collectives_give_the_same_run(fits, fit):
    fused, separate = fits[f"{fit}_fused"], fits[f"{fit}_separate"]
    for f, s in zip(fused, separate):
        steps = f["global_step"]
        assert steps == s["global_step"] == {"faults": 16, "accumulate": 8, "manual": 16}[fit]
        assert all(row["carried"] for row in _steps(f))
        assert not any(row["carried"] for row in _steps(s))
        # one collective per step where the guard's own reduce followed the measurement's
        assert all(v in (GATHER, FLOW) for v in f["hook"].values())
        flow_steps = {k for k, v in f["hook"].items() if v == FLOW}
        assert flow_steps == {k for k, v in s["hook"].items() if v[-2:] == FLOW[1:] and len(v) == 5}
        assert all(v[:2] == ["all_reduce", "all_reduce"] for v in s["hook"].values())
        assert len(f["hook"]) == len(s["hook"]) == steps
        strip = [{k: v for k, v in row.items() if k != "carried"} for row in f["rows"]]
        assert strip == [{k: v for k, v in row.items() if k != "carried"} for row in s["rows"]]
        for key in ("events", "guard", "clip", "monitor", "weights", "batch_end"):
            assert f[key] == s[key], key
    # the same on both ranks: measurements, clip decisions, outcomes (each rank keeps its own loss and cause)
    for run in (fused, separate):
        assert [(e["step"], e["kind"]) for e in run[0]["events"]] == [(e["step"], e["kind"]) for e in run[1]["events"]]
        for a, b in zip(run[0]["rows"], run[1]["rows"]):
            assert {k: v for k, v in a.items() if k not in ("loss_history", "spike", "last")} == {
                k: v for k, v in b.items() if k not in ("loss_history", "spike", "last")
            }
    timed = {"gradguard/snapshot_ms"}  # a wall-clock time: the only tag that may differ
    logged = {k: v for k, v in tb_scalars(fits["out"] / f"tb_{fit}_fused" / "version_0").items() if k not in timed}
    separate = tb_scalars(fits["out"] / f"tb_{fit}_separate" / "version_0")
    same = json.dumps({k: v for k, v in separate.items() if k not in timed}, sort_keys=True)
    assert json.dumps(logged, sort_keys=True) == same  # NaN (a logged fault) equals NaN here
    assert "gradguard/grad_norm" in logged
    assert "gradguard/clip_threshold" in logged


@pytest.mark.ddp
@pytest.mark.timeout(450)
def test_the_faults_exercise_the_decisions_and_the_spike_test_moves_once_per_step(fits):
    r0, r1 = fits["faults_fused"]
    assert [(e["step"], e["kind"], e["cause"]) for e in r0["events"]] == [
        (3, "skip", "nonfinite_grad"),  # rank 0 sees the NaN of rank 1 in the reduced gradients
        (12, "rollback", "loss_spike"),
    ]
    assert [e["cause"] for e in r1["events"]] == ["nonfinite_loss", "loss_spike"]
    for r in (r0, r1):  # the window's write position after each step's judgement: one update per step
        assert [row["spike"]["pos"] for row in _steps(r)] == [(s + 1) % 8 for s in range(16)]
    manual = fits["manual_fused"][0]
    assert {row["optimizer"] for row in _steps(manual)} == {0, 1}
