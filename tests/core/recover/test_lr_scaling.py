"""scale_lr against reference runs: after scaling at step K, every later LR is exactly factor x the unscaled run's."""

import math

import pytest
import torch
from torch.optim import lr_scheduler as lrs

from lightning_gradguard.core.recover._lr_scaling import is_known_scheduler, scale_lr, scale_param_groups

STEPS = 60

SCHEDULERS = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[10, 30], gamma=0.3),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.95),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=20),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.3, total_iters=15),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=50, power=2.0),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=40, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=9, T_mult=2, eta_min=1e-3),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.1, total_steps=STEPS + 5),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda s: 0.97),
    "SequentialLR(LinearLR->Cosine)": lambda o: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, start_factor=0.1, total_iters=10), lrs.CosineAnnealingLR(o, T_max=30, eta_min=1e-3)],
        milestones=[10],
    ),
    "SequentialLR(LinearLR->LambdaLR)": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.2, total_iters=5), lrs.LambdaLR(o, lambda s: 0.9**s)], milestones=[5]
    ),
    "ChainedScheduler(Exp,Step)": lambda o: lrs.ChainedScheduler(
        [lrs.ExponentialLR(o, gamma=0.97), lrs.StepLR(o, step_size=10, gamma=0.5)]
    ),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=6, cycle_momentum=False),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=1, min_lr=2e-3),
}


def _metric(step: int) -> float:
    # flat for long stretches so that the plateau scheduler reduces down to its min_lr floor
    return 1.0 if step % 11 else 0.5 / (1 + step)


def _run(make, scale_at: list[int], factor: float, steps: int = STEPS, groups: int = 2) -> list[list[float]]:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p], "lr": 0.05 * (i + 1)} for i, p in enumerate(params)], lr=0.05)
    sch = make(opt)
    lrs_seen = []
    for step in range(steps):
        if step in scale_at:
            scale_lr(opt, sch, factor)
        lrs_seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if isinstance(sch, lrs.ReduceLROnPlateau):
            sch.step(_metric(step))
        else:
            sch.step()
    return lrs_seen


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("k", [3, 25])
def test_scaled_lr_is_exactly_factor_times_reference(name, k):
    make = SCHEDULERS[name]
    ref = _run(make, [], 1.0)
    got = _run(make, [k], 0.5)
    for step in range(STEPS):
        expect = [v * (0.5 if step >= k else 1.0) for v in ref[step]]
        assert got[step] == expect, (name, step, got[step], expect)  # x0.5 is exact in floating point


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_two_scalings_compound_and_non_power_of_two_factor(name):
    make = SCHEDULERS[name]
    ref = _run(make, [], 1.0)
    got = _run(make, [5, 30], 0.3)
    for step in range(STEPS):
        f = 1.0 if step < 5 else 0.3 if step < 30 else 0.09
        for g, r in zip(got[step], ref[step]):
            assert math.isclose(g, r * f, rel_tol=1e-9, abs_tol=1e-15), (name, step, g, r * f)


def test_lr_only_scaling_is_not_enough_for_closed_form_schedulers():
    # the failure scale_lr exists to avoid: OneCycleLR recomputes the LR from its group bounds at the next step
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=0.05)
    sch = lrs.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    ref = lrs.OneCycleLR(ref_opt, max_lr=0.1, total_steps=20)
    for g in opt.param_groups:
        g["lr"] *= 0.5
    opt.step(), sch.step(), ref_opt.step(), ref.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]  # the naive cut is gone after one step


def test_scaled_state_survives_state_dict_round_trip():
    # what a checkpoint resume does: fresh objects + load_state_dict keep the cut (no re-application needed)
    make = SCHEDULERS["SequentialLR(LinearLR->Cosine)"]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.05)
    sch = make(opt)
    for _ in range(4):
        opt.step(), sch.step()
    scale_lr(opt, sch, 0.5)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sch2 = make(opt2)
    opt2.load_state_dict(opt.state_dict())
    sch2.load_state_dict(sch.state_dict())
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    ref = make(ref_opt)
    for _ in range(4):
        ref_opt.step(), ref.step()
    for _ in range(30):
        opt2.step(), sch2.step(), ref_opt.step(), ref.step()
        assert opt2.param_groups[0]["lr"] == 0.5 * ref_opt.param_groups[0]["lr"]


def test_shared_optimizer_scaled_once_and_tensor_lr_kept_in_place():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    lr_tensor = opt.param_groups[0]["lr"]
    sch = lrs.StepLR(opt, 3)
    scale_lr([opt, opt], [sch, sch], 0.5)
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.005)
    assert float(sch.base_lrs[0]) == pytest.approx(0.005)


@pytest.mark.parametrize("factor", [0, -1.0, float("inf"), float("nan")])
def test_invalid_factor(factor):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="factor must be a finite number > 0"):
        scale_lr(opt, (), factor)


def test_custom_scheduler_extra_attrs_and_known_check():
    class Warm(lrs.LRScheduler):
        def __init__(self, opt, peak):
            self.peak = peak
            super().__init__(opt)

        def get_lr(self):
            return [min(self.peak, self.peak * (self.last_epoch + 1) / 5) for _ in self.base_lrs]

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sch = Warm(opt, peak=0.2)
    assert not is_known_scheduler(sch)
    assert is_known_scheduler(SCHEDULERS["ChainedScheduler(Exp,Step)"](opt))
    scale_lr(opt, sch, 0.5, extra_attrs=["peak"])
    assert sch.peak == 0.1
    for _ in range(8):
        opt.step(), sch.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_tensor_lr_shared_by_param_groups_is_scaled_once() -> None:
    """``Adam(groups, lr=torch.tensor(...))`` puts the same tensor in every group: scaled per group, a cut of 0.5 on
    two groups left 0.25."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=torch.tensor(0.01))
    shared = opt.param_groups[0]["lr"]
    assert shared is opt.param_groups[1]["lr"]
    scale_param_groups(opt, 0.5)
    assert opt.param_groups[0]["lr"] is shared
    assert float(shared) == pytest.approx(0.005)
