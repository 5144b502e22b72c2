"""A stretch of corrupt batches is the data's fault, not the model's: skipped, not rolled back until a halt.

A digits MLP read from an unshuffled stream in which batches 300-349 come from a corrupt shard (inputs scaled x1e4,
finite). The loss and the gradient norm leave the run's level for 50 steps: a finite divergence, which the guard read
as a model blown up by its LR. Each rollback resumed straight into more of the shard, the budget (3) ran out inside
it, and the fit halted at step ~313 of 600 on every seed, with Adam as with SGD (unguarded, Adam trains through the
shard and ends at 0.96; SGD dies at chance). Now the divergence is rerun as a non-finite fault is: the batch from the
trusted snapshot, and the current model on the last ordinary batch (one whose loss was within the run's level).
When the batch makes the trusted model jump too while the current model is sound, the batch is at fault: skipped,
LR kept. The fit runs to the end."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_gradguard import DivergenceError, NaNGuard, default_callbacks
from tests.models import make_trainer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from data_burst import SHARD, STEPS, Shard  # noqa: E402  (the benchmark's model, seed 0)


def _fit(tmp_path, callbacks, optimizer: str) -> Shard:
    pl.seed_everything(0, verbose=False)
    model = Shard(0, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks, max_steps=STEPS, logger=False, deterministic=True).fit(model)
    return model


@pytest.mark.parametrize("make", [NaNGuard, default_callbacks], ids=["NaNGuard", "default_callbacks"])
def test_a_corrupt_shard_is_skipped_and_adam_trains_on(tmp_path, make) -> None:
    unguarded = _fit(tmp_path / "none", [], "adam").accuracy()
    callbacks = [make()] if make is NaNGuard else make()
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    model = _fit(tmp_path / "guarded", callbacks, "adam")  # before: DivergenceError at step ~313
    assert not [e for e in guard.events if e["kind"] == "halt"]
    data = [e for e in guard.events if e["kind"] == "skip" and e.get("diagnosis") == "data"]
    assert len(data) >= 20, guard.events  # most of the shard is skipped, each with its evidence
    assert "the model is sound, the batch is not" in data[0]["diagnosis_evidence"]
    assert all(SHARD[0] <= e["step"] < SHARD[1] for e in guard.events if e["kind"] != "warn")
    assert model.accuracy() >= unguarded - 0.03


def test_with_sgd_the_defaults_rescue_what_kills_the_unguarded_run(tmp_path) -> None:
    assert _fit(tmp_path / "none", [], "sgd").accuracy() < 0.3
    callbacks = default_callbacks()
    guard = next(c for c in callbacks if isinstance(c, NaNGuard))
    model = _fit(tmp_path / "guarded", callbacks, "sgd")
    assert any(e.get("diagnosis") == "data" for e in guard.events)
    assert model.accuracy() > 0.9


def test_without_the_rerun_the_shard_halts_the_fit(tmp_path) -> None:
    """The old behaviour: each divergence blamed on the LR, three rollbacks into the same shard, then a halt."""
    with pytest.raises(DivergenceError):
        _fit(tmp_path, [NaNGuard(rerun=False)], "adam")


@pytest.mark.ddp
def test_two_ranks_diagnose_the_shard_together(tmp_path) -> None:
    """Under 2-process DDP (each rank fed the same stream) every rank reruns its own batches, the values are reduced
    as the judge reduces them, and both ranks take the same branches: the same events, identical replicas, and the
    fit runs to the end (a rank that took another branch would hang the next collective: the subprocess times out)."""
    import json

    from tests.ddp_runner import run_ddp_script

    proc = run_ddp_script(Path(__file__).with_name("ddp_data_burst_script.py"), tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"burst_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["events"] == ranks[1]["events"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    for r in ranks:
        assert r["steps"] == STEPS
        assert not [e for e in r["events"] if e[1] == "halt"]
        assert sum(1 for e in r["events"] if e[1] == "skip" and e[2] == "data") >= 20
        assert r["accuracy"] > 0.9
