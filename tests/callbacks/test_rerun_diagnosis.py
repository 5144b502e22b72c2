"""Rerun diagnosis in real fits (issue 27): a flagged non-finite step is recomputed from the same state with the same
batch and random numbers, then from the trusted snapshot, and the event says transient / data / state.

Each fault under fp32, bf16 autocast and gradient accumulation 2:

- a one-off corruption of a layer's output (a bit flip that does not come back): *transient*, skipped, LR kept;
- a batch holding NaN: *data*, skipped, LR kept;
- a finite batch whose label is 1e30 (any model fails on it): *data* (it fails from the trusted state too);
- a weight multiplied in place to 1e38 (finite, but every output overflows): *state*, rolled back, LR kept;
- a NaN written into a weight: *state* (non-finite weights), rolled back.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard
from tests.models import TinyRegression, make_trainer, regression_data

FAULT_STEP = 12


class Faulty(TinyRegression):
    """TinyRegression with one fault of a chosen kind at optimizer step FAULT_STEP (its first micro-batch)."""

    def __init__(self, fault: str, accumulate: int = 1) -> None:
        super().__init__(lr=0.01)
        self.fault = fault
        self.accumulate = accumulate
        self.flipped = False
        self.net[0].register_forward_hook(self._flip)

    def _flip(self, _mod, _inp, out):
        if self.fault == "flip" and self._at_fault() and not self.flipped and torch.is_grad_enabled():
            self.flipped = True
            return out * math.nan
        return out

    def _at_fault(self) -> bool:
        return self.global_step == FAULT_STEP and self.trainer.fit_loop.batch_idx % self.accumulate == 0

    def training_step(self, batch, batch_idx):
        if self._at_fault() and not self.flipped and self.fault in ("weight_big", "weight_nan"):
            self.flipped = True
            with torch.no_grad():
                if self.fault == "weight_big":  # the output layer: its outputs overflow (a Tanh would absorb it)
                    self.net[4].weight.mul_(1e38)
                else:
                    self.net[2].weight[0, 0] = math.nan
        return super().training_step(batch, batch_idx)

    def train_dataloader(self):
        data = regression_data(n=256)
        x, y = data.tensors[0].clone(), data.tensors[1].clone()
        bad = FAULT_STEP * self.accumulate * 8  # the first sample of the fault step's first micro-batch
        if self.fault == "nan_batch":
            x[bad, 0] = math.nan
        elif self.fault == "huge_label":
            y[bad] = 1e30
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


CASES = {  # fault -> (diagnosis, action)
    "flip": ("transient", "skip"),
    "nan_batch": ("data", "skip"),
    "huge_label": ("data", "skip"),
    "weight_big": ("state", "rollback"),
    "weight_nan": ("state", "rollback"),
}


@pytest.mark.parametrize("fault", list(CASES))
@pytest.mark.parametrize("setting", ["fp32", "bf16", "accumulate2"], ids=lambda s: s)
def test_each_fault_gets_its_diagnosis(tmp_path, fault: str, setting: str) -> None:
    accumulate = 2 if setting == "accumulate2" else 1
    kwargs = {"precision": "bf16-mixed"} if setting == "bf16" else {}
    torch.manual_seed(0)
    model = Faulty(fault, accumulate)
    guard = NaNGuard(snapshot_every_n_steps=5, snapshot_confirm_steps=2)
    trainer = make_trainer(tmp_path, [guard], max_steps=25, logger=False, accumulate_grad_batches=accumulate, **kwargs)
    trainer.fit(model)
    diagnosis, action = CASES[fault]
    assert [(e["step"], e["kind"], e.get("diagnosis")) for e in guard.events] == [(FAULT_STEP, action, diagnosis)]
    event = guard.events[0]
    assert guard.lr_scale == 1.0  # none of these says the LR was at fault
    if fault == "flip":
        assert "does not reproduce" in event["diagnosis_evidence"]
        assert "gradient norm" in event["diagnosis_evidence"]
    if fault == "huge_label":
        assert "fails from the trusted state of step 10" in event["diagnosis_evidence"]
    if fault == "weight_big":
        assert "the state went bad" in event["diagnosis_evidence"]
        assert event["snapshot_step"] == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 25


def test_rerun_off_keeps_the_old_diagnoses(tmp_path) -> None:
    guard = NaNGuard(rerun=False)
    make_trainer(tmp_path, [guard], max_steps=20, logger=False).fit(Faulty("flip"))
    assert [(e["kind"], e.get("diagnosis")) for e in guard.events] == [("skip", None)]


def test_bad_rerun_argument_is_named() -> None:
    with pytest.raises(TypeError, match="rerun"):
        NaNGuard(rerun="yes")


@pytest.mark.ddp
def test_ddp_two_processes_agree_on_each_diagnosis(tmp_path) -> None:
    import json
    from pathlib import Path

    from tests.ddp_runner import run_ddp_script

    proc = run_ddp_script(Path(__file__).with_name("ddp_rerun_script.py"), tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rerun_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert [e[:3] for e in r["events"]] == [
            [6, "skip", "transient"],
            [12, "skip", "data"],
            [18, "rollback", "state"],
        ]
        assert r["finite"]
    # (the state fault comes 6 steps after the data fault: within the policy's repeat window, so its rollback cuts)
    assert ranks[0]["lr_scale"] == ranks[1]["lr_scale"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the replicas stayed identical
    assert "found on another rank" in ranks[0]["events"][2][3]  # rank 0's own rerun was finite: rank 1 decided
