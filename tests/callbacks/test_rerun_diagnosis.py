"""Rerun diagnosis in real fits (issue 27): a flagged non-finite step is recomputed from the same state with the same
batch and random numbers, then from the trusted snapshot, and the event says transient / data / state.

Each fault under fp32, bf16 autocast and gradient accumulation 2:

- a one-off corruption of a layer's output (a bit flip that does not come back): *transient*, skipped, LR kept;
- a batch holding NaN: *data*, skipped, LR kept;
- a finite batch whose label is 1e30 (any model fails on it): *data* (it fails from the trusted state too);
- a weight multiplied in place to 1e38 (finite, but every output overflows): *state*, rolled back, LR kept;
- a NaN written into a weight: *state* (non-finite weights), rolled back.

Manual optimization (one optimizer with a scheduler it steps itself; a GAN-style module with two optimizers) with the
transient / data / state faults: the rerun's ``manual_backward``, ``opt.step()``, ``opt.zero_grad()`` and
``sch.step()`` leave weights, optimizer and scheduler state, ``.grad``, RNG and ``global_step`` bit for bit as they
were. DDP and FSDP2, 2 processes each: faults on rank 1 only, both ranks agree.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import NaNGuard
from lightning_gradguard.callbacks._trainer_host import TrainerHost
from tests.compat.common import differences, full_state
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
    # the bad-batch record: rank 1's own bad batch only, the same record on both ranks, skipped again every epoch
    records = [json.loads((tmp_path / f"record_rank{r}.json").read_text()) for r in (0, 1)]
    for rank, r in enumerate(records):
        seen = "nonfinite_loss" if rank == 1 else "nonfinite_grad"  # rank 0 sees it in the all-reduced gradients
        assert r["events"] == [
            [2, "skip", seen, "data"],
            [10, "skip", "known_bad_batch", None],
            [18, "skip", "known_bad_batch", None],
        ]
    # the same record on both ranks (its cause is each rank's own view of the step)
    assert [{**e, "cause": ""} for e in records[0]["record"]] == [{**e, "cause": ""} for e in records[1]["record"]]
    (entry,) = records[0]["record"]
    assert (entry["step"], entry["batch_idx"], list(entry["ranks"])) == (2, 2, ["1"])  # never rank 0's clean batch


@pytest.mark.ddp
def test_fsdp2_two_processes_rerun_together_and_agree(tmp_path) -> None:
    """Sharded parameters: a rerun is a collective, so both ranks take every branch together (forward-only reruns,
    each checked to leave the local shards, gradients, Adam state and RNG bit for bit as they were)."""
    import json
    from pathlib import Path

    from tests.ddp_runner import run_ddp_script

    proc = run_ddp_script(Path(__file__).with_name("fsdp_rerun_script.py"), tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"fsdp_rerun_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert [e[:3] for e in r["events"]] == [
            [4, "skip", "transient"],
            [8, "skip", "data"],
            [12, "rollback", "state"],
        ]
        assert r["events"][0][4] == r["events"][1][4] == 1.0  # transient and data: no LR change
        assert "does not reproduce" in r["events"][0][3]
        assert "the state went bad" in r["events"][2][3]
        assert "trusted state of step 10" in r["events"][2][3]
        # both ranks reran together: the same state at steps 4 and 12, the trusted snapshot at 12; none at 8
        assert [(x["step"], x["weights"]) for x in r["reruns"]] == [(4, False), (12, False), (12, True)]
        assert all(not x["diff"] for x in r["reruns"]), [x["diff"] for x in r["reruns"]]
        assert "grad_norm=None" in r["reruns"][0]["result"]  # forward-only (see core/recover/_rerun.py)
        assert r["finite"]
        assert r["global_step"] == 16
    assert ranks[0]["lr_scale"] == ranks[1]["lr_scale"]
    assert "(on another rank)" in ranks[0]["events"][1][3]  # rank 0's batch was fine: rank 1's decided


class ManualFaulty(Faulty):
    """Faulty under manual optimization: one optimizer, a StepLR the step advances itself."""

    def __init__(self, fault: str) -> None:
        super().__init__(fault)
        self.automatic_optimization = False
        self.scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.9)

    def training_step(self, batch, batch_idx):
        opt, sch = self.optimizers(), self.lr_schedulers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        sch.step()
        return loss


FAULT_BATCH = 6


class FaultyGAN(LightningModule):
    """GAN-style manual optimization, two optimizers (global_step +2 a batch): the generator's step, then the
    discriminator's on the generator's detached output, each toggled; the fault at batch FAULT_BATCH is in the
    discriminator's half (``nan_batch``: the batch itself, so the generator's half fails first)."""

    def __init__(self, fault: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        self.disc = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 1))
        self.fault, self.done = fault, False
        self.disc[0].register_forward_hook(self._flip)

    def _at_fault(self) -> bool:
        return self.trainer.fit_loop.batch_idx == FAULT_BATCH and not self.done

    def _flip(self, _mod, _inp, out):
        if self.fault == "flip" and self._at_fault() and torch.is_grad_enabled():
            self.done = True
            return out * math.nan
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_g)
        fake = self.gen(x)
        loss_g = nn.functional.mse_loss(fake, y)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        if self.fault == "weight_big" and self._at_fault():
            self.done = True
            with torch.no_grad():
                self.disc[2].weight.mul_(1e38)
        self.toggle_optimizer(opt_d)
        loss_d = nn.functional.mse_loss(self.disc(torch.cat([x, fake.detach()], 1)), y)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.log("loss_d", loss_d)

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), lr=0.01), torch.optim.Adam(self.disc.parameters(), lr=0.02)

    def train_dataloader(self):
        data = regression_data(n=128)
        x, y = data.tensors[0].clone(), data.tensors[1].clone()
        if self.fault == "nan_batch":
            x[FAULT_BATCH * 8, 0] = math.nan
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _live(trainer, model) -> dict:
    """Everything a rerun must leave alone (bitwise): model, optimizer and scheduler state, .grad, requires_grad,
    the RNG, the step counter, and no patched attribute left behind."""
    objs = [model, *trainer.optimizers, *trainer.strategy._lightning_optimizers]
    objs += [c.scheduler for c in trainer.lr_scheduler_configs]
    return {
        **full_state(trainer, model),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "global_step": trainer.global_step,
        "attrs": [
            id(o.__dict__.get(n)) for o in objs for n in ("step", "zero_grad", "manual_backward", "clip_gradients")
        ],
    }


MANUAL_CASES = {  # fault -> (diagnosis, action, event step of the GAN)
    "flip": ("transient", "skip", 2 * FAULT_BATCH + 1),
    "nan_batch": ("data", "skip", 2 * FAULT_BATCH),
    "weight_big": ("state", "rollback", 2 * FAULT_BATCH + 1),
}


@pytest.mark.parametrize("fault", list(MANUAL_CASES))
@pytest.mark.parametrize("kind", ["one_optimizer", "gan"])
def test_manual_optimization_gets_each_diagnosis(tmp_path, monkeypatch, kind: str, fault: str) -> None:
    reruns: list[dict] = []
    original = TrainerHost.rerun

    def checked(self, items, rngs, weights, step=None):
        before = _live(self.trainer, self.pl_module)
        result = original(self, items, rngs, weights, step)
        after = _live(self.trainer, self.pl_module)
        reruns.append({"weights": weights is not None, "result": result, "diff": differences(after, before)})
        return result

    monkeypatch.setattr(TrainerHost, "rerun", checked)
    torch.manual_seed(0)
    model = ManualFaulty(fault) if kind == "one_optimizer" else FaultyGAN(fault)
    guard = NaNGuard(snapshot_every_n_steps=2, snapshot_confirm_steps=1)
    steps = 20 if kind == "one_optimizer" else 2 * 10
    trainer = make_trainer(tmp_path, [guard], max_steps=steps, logger=False)
    trainer.fit(model)
    diagnosis, action, gan_step = MANUAL_CASES[fault]
    step = FAULT_STEP if kind == "one_optimizer" else gan_step
    assert [(e["step"], e["kind"], e.get("diagnosis")) for e in guard.events] == [(step, action, diagnosis)]
    assert guard.lr_scale == 1.0
    assert all(not r["diff"] for r in reruns), [r["diff"] for r in reruns]
    # weight_big: the same state, the trusted snapshot, then the same state on the last healthy step's batch
    expected_reruns = {"flip": [False], "nan_batch": [], "weight_big": [False, True, False]}[fault]
    assert [r["weights"] for r in reruns] == expected_reruns
    evidence = guard.events[0]["diagnosis_evidence"]
    if fault == "flip":
        assert "does not reproduce" in evidence
        assert "gradient norm" in evidence
        assert reruns[0]["result"].grad_norm > 0  # the gradients of every loss of the step, through autograd.grad
    if fault == "weight_big":
        assert "the state went bad" in evidence
        assert "on the last healthy step's batch too" in evidence
        assert not reruns[2]["result"].finite  # every output overflows: an ordinary batch fails as well
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == steps


class UnsafeBCE(LightningModule):
    """A hand-written BCE, -(y log s + (1 - y) log(1 - s)), on separable data with 3% outlier rows scaled x60. The
    untrained model takes every batch; as the weights grow, an outlier row saturates the sigmoid and its batch gives
    log(0): NaN on some batches only, from a model that is fine (a user's numerically unsafe loss)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(37)
        x = torch.randn(4000, 10, generator=g)
        y = ((x @ torch.randn(10, generator=g)) > 0).float()
        out = torch.rand(4000, generator=g) < 0.03
        x[out] *= 60
        self.train_set = TensorDataset(x[:3000], y[:3000])
        self.x_val, self.y_val = x[3000:][~out[3000:]], y[3000:][~out[3000:]]
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        s = torch.sigmoid(self.net(x).squeeze(1))
        return -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    def accuracy(self) -> float:
        with torch.no_grad():
            return float(((self.net(self.x_val).squeeze(1) > 0).float() == self.y_val).float().mean())


def test_a_numerically_unsafe_loss_on_some_batches_is_the_data_not_the_state(tmp_path) -> None:
    """Such a batch fails from the current state and not from the trusted (older) one, which once read as "the
    state went bad": rollbacks to the start, LR cuts, and a halt within ~60 steps of a run that was learning well.
    The current state on the last healthy step's batch tells them apart: it passes, so the state is sound and the
    batch is skipped as data. The run learns to the end."""
    unguarded = UnsafeBCE()
    make_trainer(tmp_path / "none", [], max_steps=200, logger=False).fit(unguarded)
    assert not all(torch.isfinite(p).all() for p in unguarded.parameters())  # the fault is real
    model, guard = UnsafeBCE(), NaNGuard()
    trainer = make_trainer(tmp_path / "guard", [guard], max_steps=200, logger=False)
    trainer.fit(model)
    assert trainer.global_step == 200  # no halt
    assert model.accuracy() > 0.8  # chance is 0.5
    sound = [e for e in guard.events if "the state is sound" in e.get("diagnosis_evidence", "")]
    assert sound, guard.events
    assert all(e["kind"] == "skip" and e["diagnosis"] == "data" for e in sound)
    assert sum(e["kind"] == "skip" for e in guard.events) > sum(e["kind"] == "rollback" for e in guard.events)
