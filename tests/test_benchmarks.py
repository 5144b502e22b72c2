"""One cheap smoke test per benchmark script, each asserting what the script is for (timings are never asserted)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import ``benchmarks/<name>.py`` the way the scripts import each other (benchmarks/ on sys.path)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_quantile_and_interleaved_ratios():
    common = _load("common")
    assert common.quantile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(2.5)
    assert common.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == pytest.approx(2.0)
    calls = {"a": 0, "b": 0, "restores": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    def restore():
        calls["restores"] += 1

    res = common.interleaved({"a": a, "b": b}, baseline="a", rounds=4, inner=3, before_each=restore, warmup=1)
    assert calls["a"] == calls["b"] == 4 * 3 + 1
    assert calls["restores"] == 2 * (4 * 3 + 1)
    assert res["a"].ratios == [1.0] * 4
    assert len(res["b"].per_round) == 4
    assert all(t > 0 for t in res["b"].per_round)
    with pytest.raises(ValueError, match="baseline"):
        common.interleaved({"a": a}, baseline="zz")


def test_scenario_faults_ramp_and_settings():
    import torch

    scenarios = _load("scenarios")
    batch = (torch.ones(2, 3), torch.zeros(2, dtype=torch.long))
    poisoned, done = scenarios._poison_batch(batch, float("nan"))
    assert done
    assert torch.isnan(poisoned[0]).all()
    assert torch.equal(poisoned[1], batch[1])
    assert torch.equal(batch[0], torch.ones(2, 3))  # the original batch is not modified
    _, done = scenarios._poison_batch((torch.zeros(2, dtype=torch.long),), float("nan"))
    assert not done  # token batches are poisoned through the model's poison_inputs hook instead
    ramp = scenarios.Ramp(start=10, growth=1.05, cap=100.0)
    assert [ramp.factor(s) for s in (0, 10)] == [1.0, 1.0]
    assert ramp.factor(12) == pytest.approx(1.05**2)
    assert ramp.factor(10_000) == 100.0
    burst = scenarios.SETTINGS["repeated"].faults(100)
    assert (burst.nan_at, burst.inf_at) == ({40, 46}, {43})
    assert scenarios.SETTINGS["bad_batch"].faults(30).nan_at == {15}
    assert set(scenarios.FAULTED) == set(scenarios.SETTINGS) - {"stable"}
    # NaN running statistics count as a failure even when every weight is finite
    bn = torch.nn.BatchNorm1d(3)
    assert scenarios.params_finite(bn)
    bn.running_mean[1] = float("nan")
    assert not scenarios.params_finite(bn)


def test_overhead_runner_maps_each_section_to_its_module(capsys):
    """overhead.py is a thin runner: --sections name -> overhead_<name>.py; an unknown section is refused."""
    overhead = _load("overhead")
    assert list(overhead.SECTIONS) == ["micro", "e2e", "flat", "cuda"]
    for name, fn in overhead.SECTIONS.items():
        assert fn.__module__ == f"overhead_{name}"
    with pytest.raises(SystemExit):
        overhead.main(["--tiny", "--sections", "nope"])
    assert "unknown section 'nope'; allowed: micro, e2e, flat, cuda" in capsys.readouterr().err


def test_overhead_micro_runs_every_candidate(tmp_path):
    overhead = _load("overhead")
    micro = _load("overhead_micro")
    out = tmp_path / "overhead.json"
    argv = ["--quick", "--tiny", "--rounds", "1", "--sections", "micro,cuda", "--models", "MLP", "--json", str(out)]
    assert overhead.main(argv) == 0
    res = json.loads(out.read_text())
    (model,) = res["micro"]["models"].values()
    timings = model["timings"]
    assert timings["torch clip_grad_norm_(foreach=True)"]["ratio"] == 1.0
    for key in ("lightning grad_norm", "core compute_grad_stats"):
        assert math.isfinite(timings[key]["median_s"])
    # every gradguard candidate was either measured or reported with the reason it was not
    for label, _ in micro.micro_candidates(quick=True):
        assert label in timings or model["skipped"][label]
    import torch

    assert ("skipped" in res["cuda"]) == (not torch.cuda.is_available())


def test_overhead_e2e_reports_every_model(tmp_path, capsys):
    """--sections e2e times the two examples and the 1000-small-tensor model in three arms each, and the report (which
    reads only the result dictionary, so it renders the saved JSON identically) has a row and two targets per model."""
    overhead = _load("overhead")
    e2e = _load("overhead_e2e")
    report = _load("overhead_report")
    scenarios = _load("scenarios")
    assert e2e.E2E_MODELS == ("lstm", "deep_cnn", "many_small")
    assert "many_small" not in scenarios.SCENARIOS  # timed only: the rescue grid is unchanged
    assert len(list(scenarios.ManySmallMLP().parameters())) == 1000
    out = tmp_path / "e2e.json"
    assert overhead.main(["--quick", "--tiny", "--sections", "e2e", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    examples = res["e2e"]["examples"]
    assert list(examples) == list(e2e.E2E_MODELS)
    for name, e in examples.items():
        if "skipped" in e:  # the deep CNN needs scikit-learn's digits
            assert name == "deep_cnn", e
            continue
        for key in ("unguarded_step_s", "lightning_clip_step_s", "guarded_step_s"):
            assert math.isfinite(e[key])
            assert e[key] > 0
        assert len(e["ratios"]) == res["e2e"]["pairs"]
        assert math.isfinite(e["vs_lightning_clip"])
        assert f"end-to-end <= 1.05x Lightning's gradient_clip_val=1.0 ({name})" in text
    assert any(line.startswith("| many_small ") for line in text.splitlines())
    assert "many_small: 1000 small parameter tensors" in text
    assert report.report(res) in text


def test_overhead_flat_rows(tmp_path, monkeypatch):
    """--sections flat: one row per mark with time, state size, heap growth and RSS (one candidate, to stay cheap)."""
    overhead = _load("overhead")
    flat = _load("overhead_flat")
    every = flat.flat_candidates
    monkeypatch.setattr(flat, "flat_candidates", lambda: every()[-1:])
    out = tmp_path / "flat.json"
    assert overhead.main(["--quick", "--tiny", "--sections", "flat", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["flat"]
    ((label, f),) = res["callbacks"].items()
    assert label == "NaNGuard rollback (defaults)"
    assert [r["updates"] for r in f["rows"]] == res["marks"]
    for r in f["rows"]:
        assert r["state_bytes"] > 0
        assert r["rss_bytes"] >= 0
        assert math.isfinite(r["median_step_s"])


def test_e2e_breakdown_measures_each_variant(capsys):
    breakdown = _load("e2e_breakdown")
    assert breakdown.main(["--tiny", "--pairs", "1", "--steps", "12", "--examples", "lstm,many_small"]) == 0
    text = capsys.readouterr().out
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1] in ("lstm", "many_small"):
            rows[cells[0], cells[1]] = float(cells[4].rstrip("%"))
    # one measured row per callback set and model
    assert set(rows) == {(v, m) for v in breakdown.variants() for m in ("lstm", "many_small")}
    assert all(math.isfinite(v) and v > -100 for v in rows.values())


def test_rescue_tiny_cells(tmp_path, capsys):
    """NaN inputs kill the unguarded MLP (NaN weights) and the BatchNorm MLP (NaN running statistics, scored in
    eval mode); default_callbacks() survives both with the guard's events recorded, none on the stable runs; the
    acceptance summary counts what the records say, and --report re-renders the tables from the JSON."""
    rescue = _load("rescue")
    out = tmp_path / "rescue.json"
    argv = ["--tiny", "--scenarios", "mlp,bn_mlp", "--settings", "stable,bad_batch", "--seeds", "1"]
    argv += ["--methods", "default_callbacks", "--workers", "1", "--json", str(out)]
    assert rescue.main(argv) == 0
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    res = saved["results"]
    by = {(r["scenario"], r["setting"], r["method"]): r for r in res}
    assert len(res) == 8
    for name in ("mlp", "bn_mlp"):
        ref = by[(name, "stable", rescue.NONE)]
        assert ref["survived"], ref
        assert math.isfinite(ref["metric"])
        broken = by[(name, "bad_batch", rescue.NONE)]
        assert not broken["survived"]
        assert broken["outcome"] == "diverged"
        assert broken["nonfinite_steps"] >= 1
        guarded = by[(name, "bad_batch", rescue.DEFAULTS)]
        assert guarded["survived"], guarded
        assert math.isfinite(guarded["metric"])
        assert rescue.guard_events(guarded), "the guard acted, so it recorded an event"
        assert rescue.guard_events(by[(name, "stable", rescue.DEFAULTS)]) == []
    acc = saved["acceptance"]
    assert acc["survives_all"] == {"value": "2/2", "met": True}
    assert acc["zero_events_on_stable"]["met"]
    assert saved["references"]["mlp"]["mean"] == pytest.approx(by[("mlp", "stable", rescue.NONE)]["metric"])
    assert "### acceptance" in text
    assert rescue.main(["--report", str(out)]) == 0
    again = capsys.readouterr().out
    assert text[text.index("### mlp") : text.index("total wall time")].strip() in again


def test_rescue_warmup_ablation_methods():
    """--methods fallback selects the ablation rows (and the reference), each the full default_callbacks() set with
    the clipper's warm-up options changed; --methods default_callbacks does not select them."""
    rescue = _load("rescue")
    scenarios = _load("scenarios")
    from lightning_gradguard import AdaptiveGradientClipping, default_callbacks

    args = rescue.argparse.Namespace(
        quick=True, tiny=True, seeds=1, steps=0, scenarios="mlp", settings="stable", methods="fallback"
    )
    names = [rescue.warmup_method(o) for o in rescue.WARMUP_VARIANTS]
    assert len(set(names)) == 3
    assert {job["method"] for job in rescue.plan(args)} == {rescue.NONE, *names}
    args.methods = "default_callbacks"
    assert {job["method"] for job in rescue.plan(args)} == {rescue.NONE, rescue.DEFAULTS}
    default_clip = AdaptiveGradientClipping()
    for options, name in zip(rescue.WARMUP_VARIANTS, names):
        callbacks, trainer_kwargs = rescue.build_method(name, scenarios.SCENARIOS["mlp"])
        assert trainer_kwargs == {}
        assert [type(c) for c in callbacks] == [type(c) for c in default_callbacks()]
        (clip,) = [c for c in callbacks if isinstance(c, AdaptiveGradientClipping)]
        for key, value in options.items():
            assert getattr(clip, key) == value != getattr(default_clip, key)


@pytest.mark.ddp
def test_snapshot_cost_measures_ddp_split_and_fsdp2_shards(tmp_path):
    """benchmarks/snapshot_cost.py --tiny (2 gloo processes): every row present; the split DDP snapshot holds half
    the state per rank, the whole copy all of it, FSDP2 its local shards (about half)."""
    import subprocess

    from tests.ddp_runner import launcher_env

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "snapshot_cost.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=launcher_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "snapshot_cost_tiny.json").read_text())["rows"]
    ddp, fsdp = (next(r for r in rows if r["kind"] == kind) for kind in ("ddp", "fsdp2"))
    assert ddp["whole_x_state"] == pytest.approx(1.0, abs=0.01)
    assert 0.45 <= ddp["split_x_state"] <= 0.55
    assert 0.3 <= fsdp["whole_x_state"] <= 0.7  # local shards: about half of the state on each of 2 ranks
    for r in (ddp, fsdp):
        assert all(r[k] > 0 for k in r if k.endswith("_ms"))
    assert "| DDP |" in (tmp_path / "snapshot_cost_tiny.txt").read_text()


def test_clip_chaos_prints_each_method_and_the_two_gaps(capsys):
    """One seed of the chaos check: three methods, each a finite bits-per-character value, and the two gaps."""
    clip_chaos = _load("clip_chaos")
    assert clip_chaos.main(["--seeds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.strip().startswith(("gradient_clip_val", "default_callbacks"))]
    assert len(rows) == 3
    for row in rows:
        value = float(row.split()[1])
        assert 1.0 < value < 20.0  # bits per character of a 150-step character LSTM (untrained: ~6)
    assert out[-1].startswith("Lightning's clip against itself moved by 1e-6: ")


def test_dann_chaos_prints_every_seed_and_the_summary(capsys):
    """Two short seeds of the DANN study: four methods, an accuracy in [0, 1] for each, and the summary rows; a fit
    that stops at step 16, before the nudge, is the run without callbacks."""
    dann_chaos = _load("dann_chaos")
    assert dann_chaos.main(["--seeds", "2", "--workers", "1", "--steps", "60"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("DANN target-domain validation accuracy, 60 steps, seeds 0-1")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out if line.startswith("| ")}
    assert [c.strip() for c in rows["seed"]] == list(dann_chaos.METHODS)
    for seed in ("0", "1"):
        assert all(0.0 <= float(v) <= 1.0 for v in rows[seed])
    assert {"mean", "median", "better / worse than none"} <= rows.keys()
    assert dann_chaos.run("grad x1.01 at step 16", 0, steps=16) == dann_chaos.run("none", 0, steps=16)


def test_catapult_prints_every_method_and_the_summary(capsys):
    """One short seed of the catapult study: five methods, a finite MSE for each, the summary rows, no guard action;
    without the clipper (and with no action) the guarded fit is the run without callbacks, bit for bit."""
    catapult = _load("catapult")
    assert catapult.main(["--seeds", "1", "--workers", "1", "--steps", "60"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("catapult: validation MSE, 60 steps, LR 3 / lambda_max, warm-up 0 steps, seeds 0-0")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out if line.startswith("| ")}
    assert [c.strip() for c in rows["seed"]] == list(catapult.METHODS)
    values = dict(zip(catapult.METHODS, (float(v) for v in rows["0"])))
    assert all(0.0 < v < 100.0 for v in values.values()), values
    assert values["default_callbacks(clipping=None)"] == values["none"]
    assert {"mean", "median", "mean ratio to none", "lower / higher than none"} <= rows.keys()
    assert out[-1] == "guard actions: none"


def test_state_faults_case_record():
    """benchmarks/state_faults.py: one fit's record (the faulted MLP under NaNGuard: one rollback, LR kept), and an
    unknown case refused by name."""
    state_faults = _load("state_faults")
    record = state_faults.run("weight_bitflip", "nanguard", 0)
    assert record["actions"] == ["rollback@303"], record
    assert record["lr_scale"] == 1.0
    assert record["error"] == ""
    assert 0.9 < record["metric"] <= 1.0
    with pytest.raises(SystemExit):
        state_faults.main(["no_such_case"])
