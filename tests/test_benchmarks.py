"""The benchmark scripts run end to end in their quick/tiny modes (timings are printed, never asserted)."""

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


def test_fault_injection_poisons_float_and_token_batches():
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


def test_overhead_quick_tiny_runs(tmp_path, capsys):
    overhead = _load("overhead")
    out = tmp_path / "overhead.json"
    argv = ["--quick", "--tiny", "--rounds", "2", "--sections", "micro,flat,cuda", "--json", str(out)]
    assert overhead.main(argv) == 0
    text = capsys.readouterr().out
    assert "torch.set_num_threads(1)" in text
    assert "### targets" in text
    res = json.loads(out.read_text())
    models = res["micro"]["models"]
    assert len(models) == 3
    for m in models.values():
        timings = m["timings"]
        assert timings["torch clip_grad_norm_(foreach=True)"]["ratio"] == 1.0
        for key in ("lightning grad_norm", "core compute_grad_stats"):
            assert math.isfinite(timings[key]["median_s"])
        # every gradguard candidate was either measured or reported with the reason it was not
        for label in ("clip zscore", "monitor, logging step", "NaNGuard skip (checks)"):
            assert label in timings or label in m["skipped"]
    assert "flat" in res
    assert "cuda" in res


def test_overhead_e2e_tiny_runs(tmp_path):
    overhead = _load("overhead")
    out = tmp_path / "e2e.json"
    assert overhead.main(["--quick", "--tiny", "--sections", "e2e", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["e2e"]["examples"]) == {"lstm", "deep_cnn"}
    for e in res["e2e"]["examples"].values():
        assert "skipped" in e or e["guarded_step_s"] > 0


def test_rescue_quick_tiny_runs(tmp_path, capsys):
    rescue = _load("rescue")
    out = tmp_path / "rescue.json"
    assert rescue.main(["--quick", "--tiny", "--workers", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "### char_lstm" in text
    res = json.loads(out.read_text())["results"]
    by = {(r["setting"], r["method"]): r for r in res}
    ref = by[("stable", "none")]
    assert ref["survived"]
    assert math.isfinite(ref["metric"])
    # the injected NaN inputs really break an unguarded run
    broken = by[("nan", "none")]
    assert not broken["survived"]
    assert broken["nonfinite_steps"] >= 1
    # the same faults with gradguard's defaults: each of the 3 injected NaN steps is seen, and the run survives
    guarded = by[("nan", "gradguard defaults (clip + NaNGuard)")]
    assert guarded["survived"], guarded
    assert guarded["nonfinite_steps"] == 3
    assert math.isfinite(guarded["metric"])
    # the summary over all scenarios counts what the records say, and --report re-renders it from the JSON
    assert "### all scenarios" in text
    faulted = [r for r in res if r["setting"] in rescue.FAULTED and r["method"] == "none"]
    summary = text[text.index("### all scenarios") :]
    row = next(line for line in summary.splitlines() if line.startswith("| none "))
    assert f"{sum(r['survived'] for r in faulted)}/{len(faulted)}" in row
    assert rescue.main(["--report", str(out)]) == 0
    again = capsys.readouterr().out
    assert text[text.index("### char_lstm") : text.index("total wall time")].strip() in again


def test_rescue_example_scenarios_tiny_run(tmp_path):
    """The two gradguard examples run as rescue scenarios (tiny sizes): reference trains, NaN inputs are caught."""
    rescue = _load("rescue")
    scenarios = _load("scenarios")
    assert {"lstm", "deep_cnn"} <= set(scenarios.available())
    out = tmp_path / "rescue_examples.json"
    argv = ["--tiny", "--scenarios", "lstm,deep_cnn", "--workers", "1", "--json", str(out)]
    assert rescue.main(argv) == 0
    res = json.loads(out.read_text())["results"]
    assert {r["scenario"] for r in res} == {"lstm", "deep_cnn"}
    for name in ("lstm", "deep_cnn"):
        by = {(r["setting"], r["method"]): r for r in res if r["scenario"] == name}
        ref = by[("stable", "none")]
        assert ref["survived"], ref
        assert math.isfinite(ref["metric"])
        assert not by[("nan", "none")]["survived"]
        guarded = by[("nan", "gradguard defaults (clip + NaNGuard)")]
        assert guarded["survived"], guarded
        assert guarded["nonfinite_steps"] == 3


def test_e2e_breakdown_tiny_runs(capsys):
    breakdown = _load("e2e_breakdown")
    assert breakdown.main(["--tiny", "--pairs", "1", "--steps", "12", "--examples", "lstm"]) == 0
    text = capsys.readouterr().out
    for label in breakdown.variants():
        assert f"| {label}" in text
