"""The shared LR rules of a recovery (core/recover/_rules.py), checked against hand-computed LRs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.core.guard._policy import GuardEvent
from lightning_gradguard.core.recover._rules import (
    halt_reason,
    halt_report,
    keep_user_settings,
    lower_lr,
    roll_back,
    rollback_lr,
    rollback_lr_factor,
    snapshot_failure_message,
    user_settings,
)
from lightning_gradguard.core.recover._snapshot import SnapshotStore, nonfinite_weights_and_buffers, take_snapshot


def _opt_and_sched(lr: float = 1.0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=lr)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


@pytest.mark.parametrize(
    ("scale", "snap_scale", "power", "expected"),
    [(1.0, 1.0, 1, 0.5), (0.5, 1.0, 1, 0.25), (0.5, 1.0, 2, 0.125), (0.25, 1.0, 4, 0.25 / 16), (0.5, 0.25, 1, 1.0)],
)
def test_rollback_factor_cuts_the_pre_rollback_lr_and_never_raises_it(scale, snap_scale, power, expected):
    assert rollback_lr_factor(scale, snap_scale, 0.5, power) == pytest.approx(expected)


def test_rollback_lr_scales_restored_optimizer_and_scheduler_and_returns_the_new_scale():
    opt, sched = _opt_and_sched(lr=0.8)  # the restored snapshot's LR, taken at lr_scale 1
    new_scale = rollback_lr([opt], [sched], lr_scale=0.5, snapshot_lr_scale=1.0, lr_factor=0.5, lr_power=2)
    assert new_scale == pytest.approx(0.125)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8 * 0.125)
    opt.step()
    sched.step()  # the scheduler's later LRs carry the cut too
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8 * 0.125 * 0.5)


def test_lower_lr_multiplies_the_current_lr_and_the_scale():
    opt, sched = _opt_and_sched(lr=2.0)
    assert lower_lr([opt], [sched], lr_scale=0.5, lr_factor=0.5) == pytest.approx(0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    assert sched.base_lrs == [pytest.approx(1.0)]


def test_roll_back_restores_the_snapshot_bitwise_forgets_newer_ones_and_cuts_the_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    store = SnapshotStore(capacity=2)

    def train_step() -> None:
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    train_step()
    old = take_snapshot(model, [opt], [sched], step=1, meta={"lr_scale": 1.0})
    store.update(old, trusted=True)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    train_step()
    store.update(take_snapshot(model, [opt], [sched], step=2, meta={"lr_scale": 1.0}), trusted=True)
    train_step()

    extra, scale = roll_back(old, store, model, [opt], [sched], lr_scale=1.0, lr_factor=0.5)
    assert extra == {}
    assert scale == pytest.approx(0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected_model[k]), k
    for k, v in opt.state[model.weight].items():
        assert torch.equal(v, expected_state[k]), k
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert store.compute() is not None
    assert store.compute().step == 1  # the newer snapshot went with the rolled-back steps


def test_halt_report_carries_the_event_the_lr_and_the_histories():
    opt, _ = _opt_and_sched(lr=0.25)
    event = GuardEvent(7, "halt", "loss_divergence", 0.25, reason="3 rollbacks used")
    event.reason = halt_reason(event)
    assert event.reason == "loss divergence; 3 rollbacks used"
    assert halt_reason(GuardEvent(1, "halt", "nonfinite_grad", 1.0)) == "nonfinite grad"
    report = halt_report(event, [opt], 0.25, {"rollbacks": 3}, [[6, 1.0], [7, 9.0]], [[7, 5.0]], [{"step": 3}])
    assert report.step == 7
    assert report.cause == "loss_divergence"
    assert report.lr == [[0.25]]
    assert report.counters == {"rollbacks": 3}
    assert report.grad_norm_history == [[6, 1.0], [7, 9.0]]
    assert report.events[0] == {"step": 3}
    assert report.events[-1]["step"] == 7
    assert not report.nonfinite_loss


def test_nonfinite_weights_and_buffers_names_each_kind_separately():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].bias[1] = math.nan
        model[1].running_var[0] = math.inf
    assert nonfinite_weights_and_buffers(model) == (["0.bias"], ["1.running_var"])
    assert nonfinite_weights_and_buffers(torch.nn.Linear(2, 2)) == ([], [])


def test_buffers_with_infinities_from_the_start_are_checked_for_nan_only():
    """An additive attention mask holds -inf by design: read at the start, it is the model's own. Its NaN is a
    fault; a buffer that overflows to inf later (BatchNorm's running variance) is one too; weights never count."""
    from lightning_gradguard.core.recover._snapshot import inf_by_design, nonfinite_entries

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(3))  # persistent
    model.register_buffer("nanbuf", torch.tensor([math.nan, math.inf]))  # NaN is never by design
    allowed = inf_by_design(model)
    assert allowed == frozenset({"mask"})
    assert nonfinite_weights_and_buffers(model) == ([], ["mask", "nanbuf"])
    assert nonfinite_weights_and_buffers(model, allowed) == ([], ["nanbuf"])
    with torch.no_grad():
        model[1].running_var[0] = math.inf  # later: a fault
        model.mask[0, 0] = math.nan
        model[0].weight[0, 0] = math.inf
    assert nonfinite_weights_and_buffers(model, allowed) == (["0.weight"], ["mask", "nanbuf", "1.running_var"])
    assert nonfinite_entries({"mask": torch.full((2,), -math.inf)}, frozenset({"mask"})) == []


def test_snapshot_failure_message_names_the_owner_the_error_and_the_fallback():
    model = torch.nn.Linear(2, 2)
    kept = take_snapshot(model, step=4)
    text = snapshot_failure_message("GradGuard", 9, MemoryError("host full"), kept)
    expected = "GradGuard could not take a snapshot at step 9 (MemoryError: host full); "
    assert text == expected + "rollbacks use the snapshot of step 4"
    other = snapshot_failure_message("NaNGuard", 9, None, None)
    assert "failed on another rank" in other
    assert "no snapshot (a fault now halts)" in other


def test_stability_target_restarts_from_the_start_or_goes_back_before_a_climb():
    import torch

    from lightning_gradguard.core.recover._rules import StartState, stability_target
    from lightning_gradguard.core.recover._snapshot import SnapshotStore, take_snapshot

    net = torch.nn.Linear(1, 1)
    start, store = StartState(keep_steps=200), SnapshotStore(capacity=3)
    start.offer(take_snapshot(net, step=0))
    for step in (0, 50, 100):
        store.update(take_snapshot(net, step=step), trusted=True)
    snap, scratch = stability_target(start, store, "start", step=60, window=25)
    assert (snap.step, scratch) == (0, True)
    # a climb found at step 120 began within the last two windows: back to the newest snapshot before step 70
    snap, scratch = stability_target(start, store, "before_climb", step=120, window=25)
    assert (snap.step, scratch) == (50, False)
    assert stability_target(start, store, "in_place", 120, 25) == (None, False)  # keep the state, cut the LR
    # the start copy expired: a model worse than untrained goes back to before the two windows, like a climb
    snap, scratch = stability_target(start, store, "start", step=260, window=25)
    assert (snap.step, scratch) == (100, False)


def _finding(target: str, lr_power: int = 1):
    from lightning_gradguard.core.guard import StabilityFinding

    return StabilityFinding("test_rule", {}, "learning rate looks too high: test", lr_power, target)  # type: ignore[arg-type]


def _stability_setup():
    from lightning_gradguard.core.recover._rules import StartState

    net = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    start, store = StartState(keep_steps=200), SnapshotStore(capacity=3)
    with torch.no_grad():
        net.weight.fill_(1.0)
    start.offer(take_snapshot(net, [opt], step=0))
    for step in (0, 50, 100):
        with torch.no_grad():
            net.weight.fill_(float(step))
        store.update(take_snapshot(net, [opt], step=step, meta={"lr_scale": 1.0}), trusted=True)
    with torch.no_grad():
        net.weight.fill_(7.0)
    return net, opt, start, store


@pytest.mark.parametrize(
    ("target", "can_roll_back", "restored", "weight"),
    [
        ("start", True, 0, 1.0),  # worse than untrained: back to the untrained state
        ("before_climb", True, 50, 50.0),  # a climb found at step 120: the newest snapshot before step 70
        ("in_place", True, None, 7.0),  # keep the state
        ("start", False, None, 7.0),  # no rollback left in the budget: cut in place
    ],
)
def test_stability_cut_goes_where_the_finding_says_and_leaves_the_budget_to_the_caller(
    target, can_roll_back, restored, weight
):
    from lightning_gradguard.core.recover._rules import stability_cut

    net, opt, start, store = _stability_setup()
    snap, extra, scale = stability_cut(
        start, store, _finding(target, lr_power=2), can_roll_back, net, [opt], [], 1.0, 0.5, step=120, window=25
    )
    assert (snap.step if snap is not None else None) == restored
    assert extra == {}
    assert net.weight.item() == weight
    assert scale == pytest.approx(0.25)  # lr_factor ** lr_power either way
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    if target == "start" and restored is not None:
        assert [s.step for s in store.snapshots] == [0]  # a restart forgets the newer snapshots


def test_a_restart_from_the_start_keeps_the_start_copy_for_another_start_period():
    """The untrained state lives ``keep_steps`` past the start, and again past each restart from it: the restarted
    run may need it as much as the first one did."""
    from lightning_gradguard.core.recover._rules import stability_cut

    net, opt, start, store = _stability_setup()
    snap, _, _ = stability_cut(start, store, _finding("start", 2), True, net, [opt], [], 1.0, 0.5, step=180, window=25)
    assert snap.step == 0
    start.expire(300)  # 120 steps after the restart: kept (without the restart it would be gone after step 200)
    assert start.snapshot is not None
    snap, _, _ = stability_cut(start, store, _finding("start", 2), True, net, [opt], [], 1.0, 0.5, step=360, window=25)
    assert snap.step == 0
    assert net.weight.item() == 1.0
    start.expire(561)
    assert start.snapshot is None


def _sgd(lr: float = 0.1, momentum: float = 0.9) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=momentum)


def test_keep_user_settings_puts_back_what_the_user_changed_without_the_guards_own_scale() -> None:
    opt = _sgd(lr=0.05)  # the guard's scale 0.5 of the user's 0.1 is in force when the fault comes
    opt.param_groups[0]["weight_decay"] = 1e-4  # the user's change since the snapshot
    live = user_settings([opt], [])
    opt.param_groups[0].update(lr=0.4, weight_decay=0.0)  # restored: the user's 0.4 at the snapshot's scale 1.0
    keep_user_settings([opt], live, lr_scale=0.5, snapshot_lr_scale=1.0, lr_blamed=False)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-4
    assert group["lr"] == pytest.approx(0.1)  # the user's LR now (0.05 / 0.5), at the snapshot's scale
    # the same LR as restored (the user changed nothing): left bit for bit
    opt2 = _sgd(lr=0.05)
    live2 = user_settings([opt2], [])
    opt2.param_groups[0]["lr"] = 0.1
    keep_user_settings([opt2], live2, lr_scale=0.5, snapshot_lr_scale=1.0, lr_blamed=False)
    assert opt2.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(("live_lr", "expected"), [(1.0, 0.1), (0.01, 0.01)])
def test_a_rollback_that_blames_the_lr_puts_back_a_lowered_lr_never_a_raised_one(live_lr: float, expected: float):
    opt = _sgd(lr=live_lr)
    live = user_settings([opt], [])
    opt.param_groups[0]["lr"] = 0.1  # the snapshot's
    keep_user_settings([opt], live, lr_scale=1.0, snapshot_lr_scale=1.0, lr_blamed=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_an_optimizer_that_a_scheduler_drives_is_left_as_restored() -> None:
    opt = _sgd(lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.param_groups[0]["lr"] = 0.01
    live = user_settings([opt], [sched])
    assert live == [None]
    opt.param_groups[0]["lr"] = 0.1
    keep_user_settings([opt], live, lr_scale=1.0, snapshot_lr_scale=1.0, lr_blamed=False)
    assert opt.param_groups[0]["lr"] == 0.1


def test_a_scheduler_built_on_a_wrapped_optimizer_drives_the_optimizer_inside() -> None:
    class Wrapper:  # what Fabric's optimizer wrapper exposes: the torch optimizer as .optimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    opt = _sgd(lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    sched.optimizer = Wrapper(opt)  # type: ignore[assignment] - as when the scheduler was built on the wrapper
    assert user_settings([opt], [sched]) == [None]
    assert user_settings([Wrapper(opt)], [torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)]) == [None]  # type: ignore[list-item]


@pytest.mark.parametrize("user_value", [2e-4, 1e-3])
def test_a_tensor_lr_stays_the_users_object_and_value(user_value: float) -> None:
    """The restore puts a copy of the snapshot's LR tensor (1e-3) in the group: the user's tensor goes back, holding
    the user's value when it was changed since (``lr_t.fill_(2e-4)``), else the restored one."""
    lr_t = torch.tensor(1e-3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr_t)
    lr_t.fill_(user_value)
    live = user_settings([opt], [])
    opt.param_groups[0]["lr"] = torch.tensor(1e-3)  # what the restore leaves: a new tensor, the snapshot's value
    keep_user_settings([opt], live, lr_scale=1.0, snapshot_lr_scale=1.0, lr_blamed=False)
    assert opt.param_groups[0]["lr"] is lr_t
    assert float(lr_t) == pytest.approx(user_value)
