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


def test_overhead_micro_runs_every_candidate(tmp_path):
    overhead = _load("overhead")
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
    for label, _ in overhead.micro_candidates(quick=True):
        assert label in timings or model["skipped"][label]
    import torch

    assert ("skipped" in res["cuda"]) == (not torch.cuda.is_available())


def test_e2e_breakdown_measures_each_variant(capsys):
    breakdown = _load("e2e_breakdown")
    overhead = _load("overhead")
    before = overhead.default_guard_callbacks
    assert breakdown.main(["--tiny", "--pairs", "1", "--steps", "12", "--examples", "lstm"]) == 0
    assert overhead.default_guard_callbacks is before  # the variants were swapped in and back out
    text = capsys.readouterr().out
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1] == "lstm":
            rows[cells[0]] = float(cells[4].rstrip("%"))
    assert set(rows) == set(breakdown.variants())  # one measured row per callback set
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
