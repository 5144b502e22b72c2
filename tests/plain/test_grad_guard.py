"""GradGuard in plain PyTorch loops: true skips, bitwise rollbacks, GradScaler, accumulation, several optimizers,
TensorBoard tags, resume, halting and argument checks. References are computed independently in each test (state
copies taken by the test, torch's own norms, unguarded twins of the loop)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import DivergenceError, GradGuard
from lightning_gradguard.core.clip import NormClipper, ZScoreClipper


def _setup(seed: int = 0, lr: float = 0.01) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=200)
    return model, opt, sched


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def _step(model, opt, sched, guard, step, nan=False, scale=1.0) -> bool:
    x, y = _batch(step)
    if nan:
        x[0, 0] = math.nan
    loss = nn.functional.mse_loss(model(x), y) * scale
    loss.backward()
    ok = guard.before_step(loss)
    if ok:
        opt.step()
    sched.step()
    guard.after_step()
    opt.zero_grad()
    return ok


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_a_skipped_step_leaves_weights_buffers_and_adam_state_bit_identical() -> None:
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, action="skip")
    for s in range(5):
        _step(model, opt, sched, guard, s)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    assert not _step(model, opt, sched, guard, 5, nan=True)  # NaN batch: BatchNorm statistics absorbed it
    assert _equal(model.state_dict(), before[0])  # weights and restored running statistics
    assert _equal(opt.state_dict()["state"], before[1]["state"])  # Adam moments and step counts
    assert [(e["step"], e["kind"], e["cause"]) for e in guard.events] == [(5, "skip", "nonfinite_loss")]
    assert guard.skipped_steps == 1
    assert guard.last_action == "skip"


def test_rollback_restores_the_snapshot_bitwise_and_scales_the_lr_everywhere() -> None:
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, action="rollback", snapshot_every_n_steps=4, snapshot_confirm_steps=2)
    copies: dict[int, Any] = {}
    for s in range(10):
        _step(model, opt, sched, guard, s)
        copies[guard.step] = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    trusted = guard.store.compute()
    assert trusted is not None
    assert trusted.step == 8  # the step-8 snapshot survived 2 healthy steps
    _step(model, opt, sched, guard, 10, nan=True)
    model_ref, opt_ref, sched_ref = copies[8]
    assert _equal(model.state_dict(), model_ref)
    assert _equal(opt.state_dict()["state"], opt_ref["state"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * opt_ref["param_groups"][0]["lr"], rel=1e-12)
    assert opt.param_groups[0]["max_lr"] == pytest.approx(0.5 * opt_ref["param_groups"][0]["max_lr"], rel=1e-12)
    assert sched.state_dict()["last_epoch"] == sched_ref["last_epoch"]  # the scheduler is back at step 8 too
    assert guard.events[-1]["kind"] == "rollback"
    assert guard.events[-1]["snapshot_step"] == 8
    assert guard.lr_scale == 0.5
    # the schedule goes on at half of what it would have produced
    twin_opt = torch.optim.Adam(nn.Linear(1, 1).parameters(), lr=0.01)
    twin = torch.optim.lr_scheduler.OneCycleLR(twin_opt, max_lr=0.01, total_steps=200)
    for _ in range(8 + 5):
        twin_opt.step()
        twin.step()
    for s in range(11, 16):
        _step(model, opt, sched, guard, s)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * twin_opt.param_groups[0]["lr"], rel=1e-9)


def test_grad_scaler_norms_are_unscaled_and_overflow_is_the_scalers_business() -> None:
    model, opt, sched = _setup()
    ref_model = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = GradGuard(model, opt, sched, scaler, clipping=NormClipper(max_norm=1e6))
    x, y = _batch(0)
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    assert guard.before_step(loss)
    ref_loss = nn.functional.mse_loss(ref_model(x), y)
    ref_loss.backward()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()])
    assert float(guard.last[0].grad_norm) == pytest.approx(float(ref_norm), rel=1e-5)
    scaler.step(opt)
    scaler.update()
    guard.after_step()
    opt.zero_grad()
    # an overflow (inf gradient, finite loss): counted, not a fault; the scaler skips and halves its scale
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    assert guard.before_step(loss)
    scaler.step(opt)
    scaler.update()
    guard.after_step()
    assert guard.amp_overflow_steps == 1
    assert guard.events == []
    assert scaler.get_scale() == 512.0


def test_gradient_accumulation_one_decision_per_optimizer_step() -> None:
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, action="skip")
    for step in range(4):
        total = 0.0
        for micro in range(3):
            x, y = _batch(10 * step + micro)
            if step == 2 and micro == 1:
                x[0, 0] = math.nan
            loss = nn.functional.mse_loss(model(x), y) / 3
            loss.backward()
            total = total + loss.detach()
        if guard.before_step(total):
            opt.step()
        sched.step()
        guard.after_step()
        opt.zero_grad()
    assert guard.step == 4
    assert [(e["step"], e["kind"]) for e in guard.events] == [(2, "skip")]
    assert opt.state_dict()["state"][0]["step"].item() == 3


def test_several_optimizers_share_one_decision_and_get_their_own_clippers(tmp_path: Any) -> None:
    torch.manual_seed(0)
    body, head = nn.Linear(6, 8), nn.Linear(8, 1)
    model = nn.Sequential(body, nn.Tanh(), head)
    opt_body = torch.optim.SGD(body.parameters(), lr=0.05)
    opt_head = torch.optim.Adam(head.parameters(), lr=0.01)
    writer = SummaryWriter(str(tmp_path))
    guard = GradGuard(model, [opt_body, opt_head], action="skip", writer=writer, log_every_n_steps=2)
    for step in range(6):
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 3:
            head.bias.grad.fill_(math.nan)  # only the head's gradient is bad
        before = [p.detach().clone() for p in model.parameters()]
        if guard.before_step(loss):
            opt_body.step()
            opt_head.step()
        guard.after_step()
        if step == 3:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # both skipped
        opt_body.zero_grad()
        opt_head.zero_grad()
    guard.close()
    writer.close()
    assert [(e["step"], e["cause"]) for e in guard.events] == [(3, "nonfinite_grad")]
    assert guard.events[0]["nonfinite_grads"] == ["2.bias"]
    assert set(guard.last) == {0, 1}
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for name in ("grad_norm", "clip_threshold", "clip_fraction", "lr"):
        assert f"gradguard/{name}" in scalars
        assert f"gradguard/{name}_opt1" in scalars
    for name in ("skipped_steps", "rollbacks", "lr_scale", "flagged_steps", "loss_max", "grad_norm_max"):
        assert f"gradguard/{name}" in scalars
    skipped = {e.step: e.value for e in acc.Scalars("gradguard/skipped_steps")}
    assert skipped[3] == 1.0  # written at the event's own step
    assert "gradguard/nan_guard_events/text_summary" in acc.Tags()["tensors"]
    norms = {e.step: e.value for e in acc.Scalars("gradguard/grad_norm")}
    # the logging steps, then the last value again at the event and at close (no chart ends before the run did)
    assert sorted(norms) == [0, 2, 3, 4, 6]
    assert norms[3] == norms[2]
    assert norms[6] == norms[4]


def test_resume_from_state_dict_continues_like_an_uninterrupted_run() -> None:
    def run(split: int | None) -> tuple[list[float], dict[str, Any]]:
        model, opt, sched = _setup()
        guard = GradGuard(model, opt, sched, clipping="zscore", snapshot_every_n_steps=5)
        thresholds = []
        for s in range(30):
            if s == split:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), guard.state_dict()))
                model, opt, sched = _setup(seed=1)  # fresh objects, other weights: everything comes from the state
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
                sched.load_state_dict(saved[2])
                guard = GradGuard(model, opt, sched, clipping="zscore", snapshot_every_n_steps=5)
                guard.load_state_dict(saved[3])
            _step(model, opt, sched, guard, s, nan=(s == 20), scale=50.0 if s == 17 else 1.0)
            thresholds.append(float(guard.last[0].threshold))
        return thresholds, model.state_dict()

    ref_thr, ref_state = run(None)
    got_thr, got_state = run(12)
    assert got_thr == ref_thr
    assert _equal(got_state, ref_state)


def test_halt_raises_divergence_error_after_max_rollbacks(tmp_path: Any) -> None:
    model, opt, sched = _setup()
    guard = GradGuard(
        model, opt, sched, action="rollback", max_rollbacks=1, snapshot_confirm_steps=0, report_dir=tmp_path
    )
    for s in range(3):
        _step(model, opt, sched, guard, s)
    _step(model, opt, sched, guard, 3, nan=True)
    with pytest.raises(DivergenceError, match=r"after 1 rollbacks? \(max_rollbacks=1\)") as info:
        _step(model, opt, sched, guard, 4, nan=True)
    assert info.value.step == 4
    assert info.value.report_path == str(tmp_path / "grad_guard_report.json")
    report = json.loads((tmp_path / "grad_guard_report.json").read_text())
    assert report["step"] == 4
    assert [row[0] for row in report["grad_norm_history"]] == [0, 1, 2, 3, 4]
    assert guard.halted
    assert [e["kind"] for e in guard.events] == ["rollback", "halt"]


def test_a_halt_on_damage_leaves_the_last_trusted_state_not_the_damage(tmp_path: Any) -> None:
    """A halt that stands in for a refused rollback (the budget is spent) puts model, optimizer and scheduler back in
    the trusted snapshot, bitwise, at the LR scale in force: what the user keeps after ``DivergenceError`` is the
    last good state. The report still says what the damaged state held."""
    model, opt, sched = _setup()
    guard = GradGuard(
        model, opt, sched, action="rollback", max_rollbacks=1, snapshot_every_n_steps=4, snapshot_confirm_steps=2,
        report_dir=tmp_path,
    )  # fmt: skip
    copies: dict[int, Any] = {}
    for s in range(10):
        _step(model, opt, sched, guard, s)
        copies[guard.step] = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    weight = model[0].weight
    with torch.no_grad():
        weight[0, 0] = math.nan  # a weight corrupted in place: damage no skip undoes
    _step(model, opt, sched, guard, 10)
    assert [(e["kind"], e.get("snapshot_step")) for e in guard.events] == [("rollback", 8)]
    for s in range(11, 13):
        _step(model, opt, sched, guard, s)
    with torch.no_grad():
        weight[0, 0] = math.nan
    with pytest.raises(DivergenceError, match=r"max_rollbacks=1\).*halted in the last trusted state"):
        _step(model, opt, sched, guard, 13)
    assert guard.halted
    halt = guard.events[-1]
    assert halt["kind"] == "halt"
    assert halt["snapshot_step"] == 8
    assert halt["nonfinite_params"] == ["0.weight"]  # what the damaged state held, found before the restore
    model_ref, opt_ref, sched_ref = copies[8]
    assert _equal(model.state_dict(), model_ref)
    assert torch.isfinite(weight).all()
    assert _equal(opt.state_dict()["state"], opt_ref["state"])
    # the rollback's cut stands (the halt restores at the LR scale in force, it cuts nothing more)
    assert guard.lr_scale == 0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * opt_ref["param_groups"][0]["lr"], rel=1e-12)
    assert sched.state_dict()["last_epoch"] == sched_ref["last_epoch"]
    report = json.loads((tmp_path / "grad_guard_report.json").read_text())
    assert report["nonfinite_params"] == ["0.weight"]


def test_a_halt_on_a_skipped_step_keeps_the_state_it_halted_in() -> None:
    """``action='halt'`` on a NaN loss: the update was never applied, the weights are sound, nothing is restored (an
    older snapshot would throw away the steps since)."""
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, action="halt", snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    for s in range(5):
        _step(model, opt, sched, guard, s)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DivergenceError):
        _step(model, opt, sched, guard, 5, nan=True)
    assert "snapshot_step" not in guard.events[-1]
    assert _equal(model.state_dict(), before)


@pytest.mark.parametrize("fault_at", [14, 22])
def test_snapshots_of_an_older_model_layout_are_never_restored(fault_at: int) -> None:
    """A pruning (torch's ``prune``, what Lightning's ``ModelPruning`` does) renames a weight to ``weight_orig`` and
    adds a mask buffer at step 12. A fault before a snapshot of the new layout is trusted finds only snapshots whose
    state no longer loads: the guard halts with a diagnosis that says so (before: a ``RuntimeError`` from
    ``load_state_dict``, halfway through a restore). A fault after one is rolled back to it as usual."""
    from torch.nn.utils import prune

    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, action="rollback", snapshot_every_n_steps=4, snapshot_confirm_steps=2)
    for s in range(fault_at):
        if s == 12:
            prune.l1_unstructured(model[0], "weight", amount=0.2)
        _step(model, opt, sched, guard, s)
    with torch.no_grad():
        model[0].weight_orig[0, 0] = math.nan
    if fault_at == 14:
        with pytest.raises(DivergenceError, match="predate a change of the model's parameters or param groups"):
            _step(model, opt, sched, guard, fault_at)
    else:
        _step(model, opt, sched, guard, fault_at)
        assert [(e["kind"], e.get("snapshot_step")) for e in guard.events] == [("rollback", 20)]  # after the change
        assert torch.isfinite(model[0].weight_orig).all()
        assert "weight_mask" in dict(model[0].named_buffers())


def test_halt_without_raising_refuses_every_later_step() -> None:
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, action="halt", raise_on_halt=False)
    _step(model, opt, sched, guard, 0, nan=True)
    assert guard.halted
    assert not _step(model, opt, sched, guard, 1)


def test_a_configured_core_clipper_is_used_per_optimizer() -> None:
    model, opt, sched = _setup()
    proto = ZScoreClipper(z_threshold=1.0, warmup_steps=2)
    guard = GradGuard(model, opt, sched, clipping=proto)
    for s in range(4):
        _step(model, opt, sched, guard, s)
    assert guard._clips.slots[0].clipper is not proto
    assert guard._clips.slots[0].clipper.z_threshold == 1.0
    assert proto.seen == 0  # the prototype is copied, never trained


def test_after_step_without_before_step_is_an_error() -> None:
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched)
    with pytest.raises(RuntimeError, match=r"after_step\(\) called without before_step\(\)"):
        guard.after_step()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clipping": "magic"}, ValueError, "GradGuard: clipping must be one of"),
        ({"clipping": 3}, TypeError, "GradGuard: clipping must be a str"),
        ({"action": "retry"}, ValueError, "GradGuard: action must be one of"),
        ({"lr_factor": 0.0}, ValueError, "GradGuard: lr_factor must be in"),
        ({"lr_factor": "half"}, TypeError, "GradGuard: lr_factor must be a number"),
        ({"snapshot_every_n_steps": 0}, ValueError, "GradGuard: snapshot_every_n_steps must be an int >= 1"),
        ({"max_rollbacks": 1.5}, TypeError, "GradGuard: max_rollbacks must be an int"),
        ({"spike_zscore": -1.0}, ValueError, "GradGuard: spike_zscore must be a finite number > 0"),
        ({"divergence": 1}, TypeError, "GradGuard: divergence must be a bool"),
        ({"log_every_n_steps": 0}, ValueError, "GradGuard: log_every_n_steps must be an int >= 1"),
    ],
)
def test_bad_arguments_name_the_class_and_the_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    model, opt, _ = _setup()
    with pytest.raises(error, match=match):
        GradGuard(model, opt, **kwargs)


def test_model_and_optimizer_types_are_checked() -> None:
    model, opt, _ = _setup()
    with pytest.raises(TypeError, match="GradGuard: model must be a torch.nn.Module, got str"):
        GradGuard("model", opt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizers must be a torch.optim.Optimizer or a list of them, got dict"):
        GradGuard(model, {"lr": 1})  # type: ignore[arg-type]


def test_loop_objects_that_would_fail_mid_fit_are_refused_at_construction(tmp_path: Any) -> None:
    """Each of these was accepted and failed later: at the first log (a writer that is a path), at a halt (a
    report_dir that is a file: ``FileExistsError`` instead of the ``DivergenceError``), at every snapshot (a scheduler
    that is a string: no snapshot, then a halt where a rollback was due), or with an error naming nothing."""
    model, opt, sched = _setup()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    cases: list[tuple[dict[str, Any], type, str]] = [
        ({"writer": "runs"}, TypeError, "GradGuard: writer must be a TensorBoard SummaryWriter .* got str"),
        ({"report_dir": __file__}, ValueError, "GradGuard: report_dir must be a directory .* got the file"),
        ({"schedulers": "cos"}, TypeError, "GradGuard: schedulers must be an LR scheduler .* got str"),
        ({"schedulers": opt}, TypeError, "GradGuard: schedulers must be an LR scheduler .* got Adam"),
        ({"schedulers": [sched, torch.optim.lr_scheduler.StepLR(other, 5)]}, ValueError,
         r"GradGuard: schedulers\[1\] \(StepLR\) drives an optimizer that is not among optimizers"),
        ({"scaler": "yes"}, TypeError, "GradGuard: scaler must be a torch.amp.GradScaler or None, got str"),
        ({"all_reduce_max": 5}, TypeError, "GradGuard: all_reduce_max must be a function .* got int"),
        ({"process_group": "world"}, TypeError, "GradGuard: process_group must be a torch.distributed ProcessGroup"),
    ]  # fmt: skip
    for kwargs, error, match in cases:
        args = {"schedulers": kwargs.pop("schedulers")} if "schedulers" in kwargs else {}
        with pytest.raises(error, match=match):
            GradGuard(model, opt, **args, **kwargs)
    with pytest.raises(ValueError, match="GradGuard: optimizers must hold at least one torch.optim.Optimizer"):
        GradGuard(model, [])
    GradGuard(model, opt, sched, report_dir=tmp_path / "new", writer=None)  # a path to create is fine


def test_an_optimizer_over_tensors_outside_the_model_is_refused() -> None:
    """A rollback restores the model's parameters and the optimizers' states; a tensor the optimizer updates that
    is not the model's would keep the fault's values after a "restore". Refused, naming the optimizer and the
    tensor's shape; the same optimizer over the model alone is accepted."""
    model, _, _ = _setup()
    temperature = torch.zeros(3, requires_grad=True)
    alone = torch.optim.SGD(model.parameters(), lr=0.1)
    both = torch.optim.SGD([{"params": model.parameters()}, {"params": [temperature]}], lr=0.1)
    with pytest.raises(ValueError, match=r"GradGuard: optimizers\[1\] \(SGD\) updates 1 tensor\(s\) .*shapes \(3,\)"):
        GradGuard(model, [alone, both])
    with pytest.raises(ValueError, match=r"GradGuard: the optimizer \(SGD\) .* not parameters of the model"):
        GradGuard(model, both)
    GradGuard(model, alone).close()


def test_the_plain_guard_does_not_import_lightning() -> None:
    code = (
        "import sys, lightning_gradguard as gg; gg.GradGuard; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_weights_damaged_by_the_last_update_are_found_at_close() -> None:
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, action="auto", snapshot_confirm_steps=0)
    for s in range(3):
        _step(model, opt, sched, guard, s)
    reference = copy.deepcopy(guard.store.compute().model)  # the state the rollback must bring back
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan  # as if the last update had overflowed
    guard.close()
    assert [(e["kind"], e["cause"]) for e in guard.events] == [("rollback", "nonfinite_params")]
    assert guard.events[0]["nonfinite_params"] == ["0.weight"]
    assert _equal(model.state_dict(), reference)


def test_a_snapshot_that_cannot_be_taken_warns_and_keeps_the_older_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    start = guard.store.compute()

    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise MemoryError("host memory exhausted")

    monkeypatch.setattr("lightning_gradguard.core.engine._engine.take_snapshot", fail)
    _step(model, opt, sched, guard, 0)
    with pytest.warns(UserWarning, match="could not take a snapshot at step 2 .*MemoryError.*snapshot of step 0"):
        _step(model, opt, sched, guard, 1)
    assert guard.store.compute() is start


def test_fp16_autocast_with_grad_scaler_overflows_are_not_faults_a_nan_loss_is() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # too high: the first steps overflow in fp16
    guard = GradGuard(model, opt, scaler=scaler, action="auto")
    x = torch.randn(64, 8)
    y = x[:, :1]
    losses = []
    for step in range(30):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        if step == 20:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        if guard.before_step(loss):
            scaler.step(opt)
        scaler.update()
        guard.after_step()
        opt.zero_grad()
    assert guard.amp_overflow_steps > 0
    assert scaler.get_scale() < 2.0**24  # the scaler backed off by itself
    assert [(e["step"], e["kind"], e["cause"]) for e in guard.events] == [(20, "skip", "nonfinite_loss")]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------- clipping options

_BAD_CLIP_OPTIONS = [
    ("zscore", {"z_threshold": 0}, ValueError),
    ("zscore", {"z_threshold": "2"}, TypeError),
    ("zscore", {"ema_decay": 1.0}, ValueError),
    ("zscore", {"clip_to": "median"}, ValueError),
    ("percentile", {"window": 10**12}, ValueError),
    ("percentile", {"percentile": 0}, ValueError),
    ("percentile", {"warmup_steps": True}, TypeError),
    ("agc", {"exclude": "head"}, TypeError),
    ("agc", {"exclude": ["head", ""]}, ValueError),
    ("agc", {"norm_type": 1.0}, ValueError),  # agc uses unit L2 norms: a norm_type would be ignored
    ("norm", {"norm_type": 1e3}, ValueError),
    ("norm", {"z_threshold": 3.0}, ValueError),  # an option the method ignores
    ("value", {"max_norm": 2.0}, ValueError),
    ("zscore", {"fallback_factor": 0.5}, ValueError),
]


def _message(error: type, build: Any) -> tuple[str, str]:
    with pytest.raises(error) as info:
        build()
    owner, _, rest = str(info.value).partition(": ")
    return owner, rest


@pytest.mark.parametrize(("method", "options", "error"), _BAD_CLIP_OPTIONS)
def test_bad_clipping_option_same_message_from_callback_and_grad_guard(method, options, error) -> None:
    from lightning_gradguard import AdaptiveGradientClipping

    model, opt, _ = _setup()
    cb_owner, cb_text = _message(error, lambda: AdaptiveGradientClipping(method, **options))
    gg_owner, gg_text = _message(error, lambda: GradGuard(model, opt, clipping=method, clipping_options=options))
    assert (cb_owner, gg_owner) == ("AdaptiveGradientClipping", "GradGuard")
    assert gg_text == cb_text
    assert list(options)[0] in cb_text


def test_clipper_classes_refuse_bad_values_when_built_directly() -> None:
    from lightning_gradguard.core.clip import AGCClipper, PercentileClipper

    for error, build, text in [
        (ValueError, lambda: ZScoreClipper(ema_decay=1.0), "ema_decay must be in the open interval (0, 1), got 1.0"),
        (ValueError, lambda: NormClipper(max_norm=-1.0), "max_norm must be finite and > 0, got -1.0"),
        (ValueError, lambda: PercentileClipper(window=1), "window must be an int >= 2 and <= 1000000, got 1"),
        (TypeError, lambda: AGCClipper(exclude="head"), "exclude must be a list or tuple of str, got str ('head')"),
    ]:
        owner, rest = _message(error, build)
        assert rest == text
        assert owner.endswith("Clipper")


def test_clipping_options_configure_the_clipper() -> None:
    """``max_norm`` reaches the norm clipper: the clipped gradients match torch's own clip at that bound."""
    model, opt, sched = _setup()
    twin = copy.deepcopy(model)
    guard = GradGuard(model, opt, sched, clipping="norm", clipping_options={"max_norm": 0.05})
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(twin(x), y).backward()
    pre = torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 0.05)
    assert float(pre) > 0.05  # the bound is active
    assert guard.before_step() is True
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    z = GradGuard(model, opt, clipping="zscore", clipping_options={"z_threshold": 1.5, "warmup_steps": 2})
    assert (z._clips.slots[0].clipper.z_threshold, z._clips.slots[0].clipper.warm.size) == (1.5, 2)


def test_clipping_options_need_a_method_name() -> None:
    model, opt, _ = _setup()
    with pytest.raises(ValueError, match=r"GradGuard: clipping_options is only for a method name"):
        GradGuard(model, opt, clipping=NormClipper(), clipping_options={"max_norm": 2.0})
    with pytest.raises(TypeError, match=r"GradGuard: clipping_options must be a dict"):
        GradGuard(model, opt, clipping="norm", clipping_options=[("max_norm", 2.0)])
    with pytest.raises(TypeError, match=r"GradGuard: 'z_thresh' is not a clipping option"):
        GradGuard(model, opt, clipping="zscore", clipping_options={"z_thresh": 2.0})


def test_value_clipping_refuses_complex_parameters_at_construction() -> None:
    class Phase(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.phase = nn.Parameter(torch.ones(3, dtype=torch.complex64))

    model = Phase()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^GradGuard: method='value' cannot clip the complex parameter 'phase'"):
        GradGuard(model, opt, clipping="value")
    assert GradGuard(model, opt, clipping="norm").clipping == "norm"  # norms of complex gradients are fine


def test_snapshots_follow_the_step_counter_through_skips_and_rollbacks():
    """Snapshots come at the multiples of ``snapshot_every_n_steps`` (the first healthy step at or past each), not
    N healthy steps after the last one: a resumed run then takes the snapshots the uninterrupted run took, and a
    rollback after the resume restores the same state (tests/compat/test_resume_exact.py)."""
    model, opt, sched = _setup()
    guard = GradGuard(model, opt, sched, snapshot_every_n_steps=10, snapshot_confirm_steps=0, rerun=False)
    taken: set[int] = set()
    for step in range(45):
        if step == 33:  # a NaN written into a weight: only a rollback undoes it
            with torch.no_grad():
                model[0].weight[0, 0] = math.nan
        _step(model, opt, sched, guard, step, nan=step == 19)
        taken |= {s.step for s in guard.engine.store.snapshots}
    kinds = [(e["step"], e["kind"]) for e in guard.events]
    assert (19, "skip") in kinds, kinds
    assert any(k == "rollback" for _, k in kinds), kinds
    # 20 is due while step 19 was skipped: the first healthy step past it (21); after the rollback, 40 as scheduled
    assert sorted(taken) == [0, 10, 21, 30, 40], (sorted(taken), kinds)


def test_a_rollback_puts_the_clippers_statistics_back_to_the_snapshots():
    model, opt, sched = _setup()
    guard = GradGuard(
        model, opt, sched, clipping="zscore", snapshot_every_n_steps=10, snapshot_confirm_steps=0, rerun=False
    )
    at_snapshot: dict[str, Any] | None = None
    for step in range(18):
        if step == 17:
            with torch.no_grad():
                model[0].weight[0, 0] = math.nan
        _step(model, opt, sched, guard, step, scale=30.0 if 12 <= step <= 14 else 1.0)
        if step == 9:  # the snapshot of step 10 was just taken
            at_snapshot = copy.deepcopy(guard._clips.slots[0].clipper.state_dict())
    assert [(e["step"], e["kind"], e.get("snapshot_step")) for e in guard.events] == [(17, "rollback", 10)]
    assert at_snapshot is not None
    assert _equal(guard._clips.slots[0].clipper.state_dict(), at_snapshot)
    assert guard._clips.slots[0].steps == 18


def test_units_killed_in_a_plain_loop_are_named_dead_by_their_vanished_gradients():
    # the Lightning test's case (tests/callbacks/test_silent_death.py) through the plain host: every hidden ReLU
    # switched off at step 8, no blow-up; the loss sits at the class prior, 5 of 6 gradient tensors are exactly zero
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    guard = GradGuard(net, opt, announce=False)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        if step == 8:
            with torch.no_grad():
                net[0].bias.fill_(-1e3)
                net[2].bias.fill_(-1e3)
        x = torch.randn(64, 8, generator=g)
        loss = nn.functional.cross_entropy(net(x), x[:, :4].argmax(1))
        loss.backward()
        if guard.before_step(loss):
            opt.step()
        guard.after_step()
        opt.zero_grad()
    assert [(e["kind"], e["cause"]) for e in guard.events] == [("warn", "dead_network")], guard.events
    assert "the gradient vanished in 83% of the parameter tensors" in guard.events[0]["reason"]
    assert guard.lr_scale == 1.0


def test_the_plain_host_pins_its_clippers_at_their_warm_up_cap():
    # the wiring of the dead-network restart's protection through the plain host (the Lightning fits in
    # tests/callbacks/test_silent_death.py and tests/test_init_explosion_mlp.py exercise the decision): a regression
    # whose gradient norms are ~100 from the first step; after the warm-up the z-score statistics learn them and clip
    # almost nothing; pinned, every later step is clipped to fallback_max_norm (1.0), and the pin is checkpointed
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(net.parameters(), lr=1e-5)
    guard = GradGuard(net, opt, clipping="zscore", announce=False)
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randn(64, 8, generator=g)
        loss = nn.functional.mse_loss(net(x), 100.0 * x[:, :1])
        loss.backward()
        if guard.before_step(loss):
            post = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()])))
            opt.step()
        guard.after_step()
        opt.zero_grad()
        return post

    free = [step() for _ in range(60)]
    assert min(free[30:]) > 10.0  # the learned statistics let the run's own norms through
    host = guard.engine.host
    assert host.pin_clipping()
    assert not host.pin_clipping()  # already pinned
    pinned = [step() for _ in range(30)]
    assert max(pinned) <= 1.0 + 1e-4
    state = guard.state_dict()
    again = GradGuard(net, opt, clipping="zscore", announce=False)
    again.load_state_dict(state)
    assert not again.engine.host.pin_clipping()  # the pin came back with the state


def test_a_process_group_needs_torch_distributed_and_no_custom_reduce(tmp_path: Any) -> None:
    """A group without an initialised torch.distributed (or beside ``all_reduce_max``, which replaces it) used to be
    accepted silently: refused at construction, naming the argument."""
    import torch.distributed as dist

    model, opt, _ = _setup()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        GradGuard(model, opt, process_group=group).close()
        with pytest.raises(ValueError, match="GradGuard: give process_group or all_reduce_max, not both"):
            GradGuard(model, opt, process_group=group, all_reduce_max=lambda t: t)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="GradGuard: process_group was given but torch.distributed is not initialised"):
        GradGuard(model, opt, process_group=group)
