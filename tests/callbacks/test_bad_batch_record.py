"""The bad-batch record in real fits (issue 27): a skipped bad batch is not met again after a resume, read back from
the checkpoint or from the run directory, and a rollback's skip window skips exactly the window."""

from __future__ import annotations

import json
import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard
from lightning_gradguard.core.recover._bad_batches import RECORD_FILE
from tests.models import TinyRegression, make_trainer, regression_data

BAD_INDEX = 5  # batch 5 of every epoch (8 batches of 8): sample 40 holds NaN


class BadSample(TinyRegression):
    """A deterministic loader (no shuffle) whose batch 5 holds a NaN input in every epoch."""

    def train_dataloader(self):
        x, y = (t.clone() for t in regression_data(n=64).tensors)
        x[BAD_INDEX * 8, 0] = math.nan
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _events(guard: NaNGuard) -> list[tuple[int, str, str]]:
    return [(e["step"], e["kind"], e["cause"]) for e in guard.events]


def _first_fit(tmp_path) -> tuple[NaNGuard, str]:
    torch.manual_seed(0)
    guard = NaNGuard(snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    trainer = make_trainer(tmp_path / "a", [guard], max_steps=8)
    trainer.fit(BadSample())
    ckpt = str(tmp_path / "epoch0.ckpt")
    trainer.save_checkpoint(ckpt)
    return guard, ckpt


def test_a_skipped_bad_batch_is_written_and_not_met_again_after_a_resume(tmp_path) -> None:
    first, ckpt = _first_fit(tmp_path)
    assert _events(first) == [(BAD_INDEX, "skip", "nonfinite_loss")]
    assert first.events[0]["diagnosis"] == "data"
    record = tmp_path / "a" / "run" / "version_0" / RECORD_FILE
    (entry,) = (json.loads(line) for line in record.read_text().splitlines())
    assert (entry["step"], entry["epoch"], entry["batch_idx"], entry["diagnosis"]) == (BAD_INDEX, 0, BAD_INDEX, "data")
    # resume from the checkpoint (its guard state holds the record): epoch 1 brings batch 5 back at step 13
    guard = NaNGuard(snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    make_trainer(tmp_path / "b", [guard], max_steps=16).fit(BadSample(), ckpt_path=ckpt)
    new = _events(guard)[1:]
    # (the resumed loop numbers its steps from the checkpoint's progress: the step is 13 or 14)
    assert [(kind, cause) for _, kind, cause in new] == [("skip", "known_bad_batch")]  # never judged a fault again
    assert new[0][0] >= 8 + BAD_INDEX
    assert f"first flagged at step {BAD_INDEX}" in guard.events[-1]["reason"]
    assert guard.lr_scale == 1.0


def test_the_record_read_from_the_run_directory_skips_the_batch_from_the_start(tmp_path) -> None:
    _first_fit(tmp_path)
    guard = NaNGuard(snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    assert guard.bad_batches.read(tmp_path / "a" / "run" / "version_0") == 1
    model = BadSample()
    make_trainer(tmp_path / "c", [guard], max_steps=16, logger=False).fit(model)
    assert _events(guard) == [(BAD_INDEX, "skip", "known_bad_batch"), (8 + BAD_INDEX, "skip", "known_bad_batch")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_shuffled_loader_is_not_skipped_by_position_alone(tmp_path) -> None:
    _first_fit(tmp_path)

    class Shuffled(BadSample):
        def train_dataloader(self):
            x, y = regression_data(n=64).tensors  # finite, and other samples at batch 5
            return DataLoader(TensorDataset(x.flip(0), y.flip(0)), batch_size=8, shuffle=False)

    guard = NaNGuard()
    guard.bad_batches.read(tmp_path / "a" / "run" / "version_0")
    make_trainer(tmp_path / "d", [guard], max_steps=8, logger=False).fit(Shuffled())
    assert guard.events == []


def test_a_rollback_skip_window_skips_exactly_the_window(tmp_path) -> None:
    torch.manual_seed(0)
    guard = NaNGuard(action="rollback", bad_batch_window=2, snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    make_trainer(tmp_path, [guard], max_steps=16, logger=False).fit(BadSample())
    assert _events(guard) == [
        (BAD_INDEX, "rollback", "nonfinite_loss"),
        (BAD_INDEX + 1, "skip", "known_bad_batch"),  # the window: the two batches after the fault
        (BAD_INDEX + 2, "skip", "known_bad_batch"),
        (8 + BAD_INDEX, "skip", "known_bad_batch"),  # epoch 1: the bad batch itself again, not its window
    ]
    assert guard.rollbacks == 1
