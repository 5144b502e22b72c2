"""NaNGuard: skip, halt, repeated faults, checkpoint rollback, resume, AMP, bad batches, spikes, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.optim import lr_scheduler as lrs

from lightning_gradguard import DivergenceError, NaNGuard
from lightning_gradguard.callbacks.nan_guard import GuardDecision
from lightning_gradguard.core.recover._report import DivergenceReport
from lightning_gradguard.core.recover._snapshot import clone_state
from tests.models import TinyRegression, loader, make_trainer


class StateRecorder(Callback):
    """Model and raw optimizer state after every step, plus the guard's decision at that step."""

    def __init__(self, guard=None):
        self.guard = guard
        self.states: dict[int, tuple] = {}
        self.reasons: dict[int, GuardDecision] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = (
            clone_state(pl_module.state_dict()),
            clone_state(trainer.optimizers[0].state_dict()["state"]),
        )
        if self.guard is not None:
            self.reasons[trainer.global_step - 1] = self.guard.reason


def _identical(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    return a == b


def test_skip_keeps_params_and_adam_state_bit_identical(tmp_path):
    guard = NaNGuard(action="skip")
    rec = StateRecorder(guard)
    trainer = make_trainer(tmp_path, [guard, rec], max_steps=8)
    trainer.fit(TinyRegression(nan_at_steps=[4]))
    # step 4 was skipped: the state after it (global_step 5) is the state before it (global_step 4)
    assert _identical(rec.states[5][0], rec.states[4][0])
    assert _identical(rec.states[5][1], rec.states[4][1])
    assert int(rec.states[5][1][0]["step"]) == 4
    assert not _identical(rec.states[6][0], rec.states[5][0])  # and training went on
    assert int(rec.states[8][1][0]["step"]) == 7  # 8 attempted steps, 7 updates
    assert rec.reasons[4] is GuardDecision.SKIPPED
    assert rec.reasons[5] is GuardDecision.HEALTHY
    assert guard.skipped_steps == 1
    assert guard.rollbacks == 0
    assert [(e["step"], e["kind"]) for e in guard.events] == [(4, "skip")]
    assert guard.events[0]["nonfinite_grads"][0] == "net.0.weight"


def test_consecutive_skips_escalate_to_rollback(tmp_path):
    guard = NaNGuard(action="skip", max_consecutive_skips=1, snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    make_trainer(tmp_path, [guard], max_steps=10).fit(TinyRegression(nan_at_steps=[5, 6]))
    assert [(e["step"], e["kind"]) for e in guard.events] == [(5, "skip"), (6, "rollback")]
    assert guard.skipped_steps == 2
    assert guard.rollbacks == 1
    assert guard.lr_scale == 0.5


def test_repeated_faults_halt_after_max_rollbacks_with_report(tmp_path):
    guard = NaNGuard(action="rollback", max_rollbacks=2, snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=20)
    with pytest.raises(DivergenceError, match="after 2 rollbacks") as info:
        trainer.fit(TinyRegression(nan_at_steps=[4, 7, 10]))
    err = info.value
    assert err.step == 10
    assert trainer.global_step == 11  # stopped at once: step 10 was the last one attempted
    assert [e["kind"] for e in guard.events] == ["rollback", "rollback", "halt"]
    assert guard.reason is GuardDecision.HALTED
    report_json = tmp_path / "run" / "version_0" / "nan_guard_report.json"
    assert err.report_path == str(report_json)
    data = json.loads(report_json.read_text())  # strict JSON (NaN written as a string)
    report = DivergenceReport.load(report_json)
    assert data["step"] == 10
    assert report.nonfinite_loss
    assert report.nonfinite_grads[:2] == ["net.0.weight", "net.0.bias"]
    assert report.counters["rollbacks"] == 2
    assert report.lr_scale == 0.25
    assert report.lr == [[pytest.approx(0.01 * 0.25)]]
    assert [int(s) for s, _ in report.grad_norm_history][-3:] == [8, 9, 10]
    assert math.isnan(report.grad_norm_history[-1][1])
    assert math.isnan(report.loss_history[-1][1])
    assert [int(s) for s, v in report.loss_history if not math.isfinite(v)] == [4, 7, 10]
    text = (tmp_path / "run" / "version_0" / "nan_guard_report.txt").read_text()
    assert text.startswith("Training halted at step 10: nonfinite loss")
    assert "net.0.weight" in text


@pytest.mark.parametrize("raise_on_halt", [True, False])
def test_halt_stops_at_once_even_with_min_steps(tmp_path, raise_on_halt):
    guard = NaNGuard(action="halt", raise_on_halt=raise_on_halt, report_dir=tmp_path / "reports")
    trainer = make_trainer(tmp_path, [guard], max_steps=30, min_steps=20)
    if raise_on_halt:
        with pytest.raises(DivergenceError) as info:
            trainer.fit(TinyRegression(nan_at_steps=[3]))
        assert info.value.report_path == str(tmp_path / "reports" / "nan_guard_report.json")
    else:
        trainer.fit(TinyRegression(nan_at_steps=[3]))
        assert isinstance(guard.halt_error, DivergenceError)
        assert trainer.fit_loop.epoch_loop.min_steps == 20  # the Trainer's settings are given back
    assert trainer.global_step == 4  # step 3 was the last one attempted, far below min_steps=20
    assert guard.reason is GuardDecision.HALTED
    assert (tmp_path / "reports" / "nan_guard_report.txt").exists()
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())  # the bad step was skipped


class CorruptNewest(Callback):
    """Truncate the checkpoint files of ``step`` just before the fault: the guard must fall back to an older file."""

    def __init__(self, at_step, pattern):
        self.at_step, self.pattern = at_step, pattern

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            files = [p for cb in trainer.checkpoint_callbacks for p in Path(cb.dirpath).glob(f"*{self.pattern}*")]
            assert files
            for path in files:
                with open(path, "r+b") as f:
                    f.truncate(100)


@pytest.mark.parametrize("corrupt", [False, True])
def test_checkpoint_snapshot_rollback_from_modelcheckpoint_file(tmp_path, corrupt):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    guard = NaNGuard(action="rollback", snapshot="checkpoint", snapshot_confirm_steps=2)
    rec = StateRecorder()
    callbacks = [guard, rec, ckpt] + ([CorruptNewest(8, "step=6")] if corrupt else [])
    trainer = make_trainer(
        tmp_path,
        callbacks,
        max_steps=11,
        enable_checkpointing=True,
    )
    model = TinyRegression(nan_at_steps=[8], scheduler=lambda o: lrs.StepLR(o, step_size=2, gamma=0.5))
    trainer.fit(model)
    (event,) = guard.events
    expect_step = 3 if corrupt else 6
    assert event["kind"] == "rollback"
    assert event["snapshot_step"] == expect_step
    assert f"step={expect_step}.ckpt" in event["snapshot_path"]
    # right after the rollback: the model and Adam state saved after expect_step steps
    assert _identical(rec.states[9][0], rec.states[expect_step][0])
    assert _identical(rec.states[9][1], rec.states[expect_step][1])
    assert trainer.global_step == 11
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == expect_step + 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5 * 0.01 * 0.5 ** ((expect_step + 2) // 2)


def test_checkpoint_snapshot_needs_modelcheckpoint(tmp_path):
    trainer = make_trainer(tmp_path, [NaNGuard(action="rollback", snapshot="checkpoint")], max_steps=2)
    with pytest.raises(ValueError, match="no ModelCheckpoint callback"):
        trainer.fit(TinyRegression())


def test_checkpoint_snapshot_without_usable_file_falls_back_to_the_start_state(tmp_path):
    # issue 15: a fault before any confirmed file used to halt; now the in-memory start state is the fallback, and
    # setup warns that save_top_k=1 cannot always leave a confirmed file
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=50)
    guard = NaNGuard(action="rollback", snapshot="checkpoint", raise_on_halt=False)
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [guard, rec, ckpt], max_steps=6, enable_checkpointing=True)
    model = TinyRegression(nan_at_steps=[2])
    start = clone_state(model.state_dict())
    with pytest.warns(UserWarning, match=r"no ModelCheckpoint keeps more than one file.*save_top_k=-1"):
        trainer.fit(model)
    assert guard.reason is not GuardDecision.HALTED
    ((step, kind, snap),) = [(e["step"], e["kind"], e["snapshot_step"]) for e in guard.events]
    assert (step, kind, snap) == (2, "rollback", 0)
    assert "no usable checkpoint file" in guard.events[0]["reason"]
    assert _identical(rec.states[3][0], start)
    assert trainer.global_step == 6


def test_resume_after_rollback_keeps_lr_scale_without_reapplying(tmp_path):
    make = lambda o: lrs.StepLR(o, step_size=3, gamma=0.5)  # noqa: E731
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=8)
    trainer.fit(TinyRegression(nan_at_steps=[5], scheduler=make))
    lr_before = trainer.optimizers[0].param_groups[0]["lr"]
    path = tmp_path / "after_rollback.ckpt"
    trainer.save_checkpoint(path)

    guard2 = NaNGuard(action="rollback", snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]

    trainer2 = make_trainer(tmp_path / "resumed", [guard2, Probe()], max_steps=14)
    trainer2.fit(TinyRegression(scheduler=make), ckpt_path=path)
    assert guard2.lr_scale == 0.5
    assert guard2.rollbacks == 1
    assert [e["kind"] for e in guard2.events] == ["rollback"]
    assert seen["lr"] == lr_before
    # scheduler steps: 4 (snapshot) + 2 after the rollback + 6 resumed = 12 -> 0.01 * 0.5**4, halved once
    assert trainer2.optimizers[0].param_groups[0]["lr"] == 0.5 * 0.01 * 0.5**4


def test_amp_overflow_is_not_a_divergence(tmp_path):
    guard = NaNGuard()
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer = make_trainer(tmp_path, [guard], max_steps=12, plugins=[plugin])
    trainer.fit(TinyRegression())
    assert guard.amp_overflow_steps > 0  # the default scale 65536 overflows fp16 grads at first
    assert plugin.scaler.get_scale() < 65536.0
    assert guard.events == []
    assert guard.skipped_steps == 0
    assert guard.rollbacks == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("gradguard/amp_overflow_steps")[-1].value == guard.amp_overflow_steps


def test_amp_nan_loss_and_scale_collapse_are_divergences(tmp_path):
    guard = NaNGuard(action="skip", max_consecutive_skips=100)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    make_trainer(tmp_path, [guard], max_steps=6, plugins=[plugin]).fit(TinyRegression(nan_at_steps=[3]))
    assert [(e["step"], e["cause"]) for e in guard.events] == [(3, "nonfinite_loss")]

    floor = NaNGuard(action="halt", amp_scale_floor=1e6, raise_on_halt=False)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=64.0))
    make_trainer(tmp_path / "f", [floor], max_steps=6, plugins=[plugin]).fit(TinyRegression())
    assert floor.events[0]["cause"] == "amp_scale_collapse"


def test_save_bad_batch_file_reloads(tmp_path):
    guard = NaNGuard(action="skip", save_bad_batch=True)
    make_trainer(tmp_path, [guard], max_steps=6).fit(TinyRegression(nan_at_steps=[3]))
    path = guard.events[0]["bad_batch_path"]
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 3
    assert payload["rank"] == 0
    x, y = payload["batches"][0]
    ref_x, ref_y = list(loader())[3]
    assert torch.equal(x, ref_x)
    assert torch.equal(y, ref_y)


def test_loss_spike_triggers_skip(tmp_path):
    guard = NaNGuard(action="skip", spike_zscore=6.0, spike_window=8)
    trainer = make_trainer(tmp_path, [guard], max_steps=16)
    trainer.fit(TinyRegression(loss_scale_at={13: 1e4}))
    assert [(e["step"], e["cause"]) for e in guard.events] == [(13, "loss_spike")]


def test_gradient_accumulation_checks_once_per_optimizer_step(tmp_path):
    guard = NaNGuard(action="skip")
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [guard, rec], max_steps=4, accumulate_grad_batches=2)
    trainer.fit(TinyRegression(nan_at_steps=[2]))  # global_step 2 = batches 4 and 5
    assert [(e["step"], e["kind"]) for e in guard.events] == [(2, "skip")]
    assert _identical(rec.states[3][0], rec.states[2][0])


def test_state_dict_round_trip_and_state_key():
    guard = NaNGuard()
    guard.rollbacks, guard.skipped_steps, guard.lr_scale = 2, 5, 0.25
    guard.events = [{"step": 3, "kind": "rollback", "cause": "nonfinite_loss", "lr_scale": 0.5}]
    other = NaNGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.rollbacks, other.skipped_steps, other.lr_scale) == (2, 5, 0.25)
    assert other.events == guard.events
    other.load_state_dict({})  # tolerant of missing keys
    assert other.lr_scale == 1.0
    assert NaNGuard(action="skip").state_key != NaNGuard().state_key


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"action": "ignore"},
            ValueError,
            r"NaNGuard: action must be one of \('auto', 'rollback', 'skip', 'halt'\), got 'ignore'",
        ),
        ({"escalate_to": "skip"}, ValueError, "escalate_to must be one of"),
        ({"snapshot": "disk"}, ValueError, "snapshot must be one of"),
        ({"lr_factor": 0}, ValueError, r"lr_factor must be in \(0.0, 1.0\], got 0"),
        ({"lr_factor": 1.5}, ValueError, "lr_factor must be in"),
        ({"max_consecutive_skips": -1}, ValueError, "max_consecutive_skips must be an int >= 0, got -1"),
        ({"snapshot_every_n_steps": 0}, ValueError, "snapshot_every_n_steps must be an int >= 1"),
        ({"snapshot_confirm_steps": 1.5}, TypeError, "snapshot_confirm_steps must be an int >= 0"),
        ({"max_rollbacks": -1}, ValueError, "max_rollbacks must be an int >= 0"),
        ({"spike_zscore": 0.0}, ValueError, "spike_zscore must be a finite number > 0 or None"),
        ({"spike_window": 1}, ValueError, "spike_window must be an int >= 2"),
        ({"amp_scale_floor": 0}, ValueError, "amp_scale_floor must be a finite number > 0"),
        ({"amp_scale_floor": float("inf")}, ValueError, "amp_scale_floor must be a finite number > 0, got inf"),
        ({"lr_factor": "0.5"}, TypeError, r"NaNGuard: lr_factor must be a number, in \(0.0, 1.0\], got str"),
        ({"action": None}, TypeError, "action must be a str"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps must be an int >= 1 or None"),
        ({"check_params": 1}, TypeError, "check_params must be a bool"),
        ({"save_bad_batch": "yes"}, TypeError, "save_bad_batch must be a bool"),
        ({"report_dir": 3}, TypeError, "report_dir must be a path or None"),
    ],
)
def test_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        NaNGuard(**kwargs)
