"""The LR cut of a rollback is kept on every scheduler, for the rest of the run (issue 24).

A rollback restores a snapshot (model, optimizer, scheduler: the LR the snapshot had) and cuts the LR
(``rollback_lr``). From then on, the LR at every step must be exactly ``lr_scale`` times what the uninterrupted
schedule gives at the scheduler's own step: a scheduler that recomputes its LR from a constant the cut missed
(``base_lrs``, a group's ``initial_lr``/``max_lr``/``min_lr``, ``eta_min``, ``max_lrs``, a child of ``SequentialLR``)
leaves the cut schedule at its next milestone, restart or phase. Whole LR sequences of 200 steps are compared, in a
plain loop (the core functions) and in a Trainer (NaNGuard rolling back after a NaN written into a weight).
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as lrs

from lightning_gradguard.core.recover._lr_scaling import scale_lr
from lightning_gradguard.core.recover._rules import rollback_lr
from lightning_gradguard.core.recover._snapshot import restore_snapshot, take_snapshot

STEPS = 200

SCHEDULERS = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=30, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[40, 90, 160], gamma=0.3),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.99),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=70, eta_min=1e-4),  # past T_max: it climbs again
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=20, T_mult=2, eta_min=1e-4),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=STEPS + 10),
    "OneCycleLR(three_phase)": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=STEPS + 10, three_phase=True),
    "LambdaLR(warm-up+cosine)": lambda o: lrs.LambdaLR(
        o, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS))
    ),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=100),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=15, cycle_momentum=False),
    "SequentialLR(LinearLR->Cosine)": lambda o: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, start_factor=0.05, total_iters=20), lrs.CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-4)],
        milestones=[20],
    ),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=STEPS + 10, power=2.0),
}

LRS = (0.01, 0.003)  # two param groups with different LRs


def _optimizer(kind: str, groups: int) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    spec = [{"params": [p], "lr": LRS[i]} for i, p in enumerate(params)]
    if kind == "adam":
        return torch.optim.Adam(spec, lr=LRS[0])
    return torch.optim.SGD(spec, lr=LRS[0], momentum=0.9)


def reference(name: str, kind: str, groups: int, steps: int = STEPS) -> list[list[float]]:
    """The LR of each group after n scheduler steps, n = 0 ... steps (an uninterrupted schedule)."""
    opt = _optimizer(kind, groups)
    sch = SCHEDULERS[name](opt)
    out = []
    for _ in range(steps + 1):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sch.step()
    return out


def run_with_rollbacks(name, kind, groups, plan, factor):
    """A plain loop of STEPS steps. ``plan``: (snapshot step, rollback step) pairs, each snapshot taken at the end of
    its step and restored (then the LR cut by ``factor``) at the end of the rollback step. Returns, per step, the
    group LRs in force, the scheduler's step count and the cumulative LR scale."""
    torch.manual_seed(0)
    opt = _optimizer(kind, groups)
    sch = SCHEDULERS[name](opt)
    model = torch.nn.Linear(2, 1)
    snaps, scale, rows = {}, 1.0, []
    taken = {s for s, _ in plan}
    for t in range(STEPS):
        rows.append(([g["lr"] for g in opt.param_groups], sch.last_epoch, scale))
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.full_like(p, 0.1)
        opt.step()
        sch.step()
        if t in taken:
            snaps[t] = take_snapshot(model, [opt], [sch], step=t + 1, meta={"lr_scale": scale})
        for s, k in plan:
            if k == t:
                snap = snaps[s]
                restore_snapshot(snap, model, [opt], [sch])
                scale = rollback_lr([opt], [sch], scale, snap.meta["lr_scale"], factor)
    return rows


def check(rows, ref, factor):
    exact = math.log2(factor).is_integer()  # powers of two scale without rounding
    for t, (got, step, scale) in enumerate(rows):
        want = [scale * v for v in ref[step]]
        if exact:
            assert got == want, (t, step, got, want)
        else:
            assert got == pytest.approx(want, rel=1e-12), (t, step, got, want)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_rollback_keeps_the_cut_for_the_whole_run(name, kind):
    ref = reference(name, kind, 2)
    rows = run_with_rollbacks(name, kind, 2, [(49, 80)], 0.5)
    assert rows[81][1] == 50  # the scheduler went back with the snapshot
    assert rows[81][2] == 0.5
    check(rows, ref, 0.5)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_repeated_rollbacks_and_a_snapshot_restored_twice(name):
    """Two rollbacks to one snapshot (a restore must not alias its state), then one to a snapshot taken after the
    first cut (its own LR scale is in its meta)."""
    ref = reference(name, "sgd", 2)
    rows = run_with_rollbacks(name, "sgd", 2, [(29, 60), (29, 75), (99, 130)], 0.5)
    assert [rows[t][2] for t in (61, 76, 131)] == [0.5, 0.25, 0.125]
    check(rows, ref, 0.5)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(list(SCHEDULERS)),
    kind=st.sampled_from(["sgd", "adam"]),
    groups=st.integers(1, 2),
    snap=st.integers(0, 150),
    gap=st.integers(1, 45),
    factor=st.sampled_from([0.5, 0.25, 0.3, 0.9]),
)
def test_any_rollback_keeps_the_lr_at_factor_times_the_schedule(name, kind, groups, snap, gap, factor):
    ref = reference(name, kind, groups)
    rows = run_with_rollbacks(name, kind, groups, [(snap, snap + gap)], factor)
    check(rows, ref, factor)


def test_an_in_place_cut_then_a_rollback_to_before_it():
    """A stability cut in place (scale_lr), then a rollback to a snapshot taken before it: the LR ends at the
    guard's cumulative scale, never above the schedule x that scale."""
    name, kind = "OneCycleLR", "sgd"
    ref = reference(name, kind, 2)
    torch.manual_seed(0)
    opt = _optimizer(kind, 2)
    sch = SCHEDULERS[name](opt)
    model = torch.nn.Linear(2, 1)
    scale, rows, snap = 1.0, [], None
    for t in range(STEPS):
        rows.append(([g["lr"] for g in opt.param_groups], sch.last_epoch, scale))
        opt.step()
        sch.step()
        if t == 40:
            snap = take_snapshot(model, [opt], [sch], step=t + 1, meta={"lr_scale": scale})
        if t == 60:
            scale_lr([opt], [sch], 0.5)
            scale *= 0.5
        if t == 90:
            restore_snapshot(snap, model, [opt], [sch])
            scale = rollback_lr([opt], [sch], scale, snap.meta["lr_scale"], 0.5)
    assert scale == 0.25
    check(rows, ref, 0.5)


# ------------------------------------------------------------------------------------------------ in a Trainer

TRAINER_STEPS = 120
FAULT = 70  # a NaN written into a weight before this step's forward


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_nan_guard_rollback_keeps_the_cut_on_every_scheduler(name):
    from lightning.pytorch import Callback

    from lightning_gradguard import NaNGuard
    from tests.compat.common import FullBatch
    from tests.models import make_trainer

    class Probe(Callback):
        def __init__(self) -> None:
            self.rows: dict[int, tuple[float, int]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sch = trainer.lr_scheduler_configs[0].scheduler
            self.rows[trainer.global_step] = (trainer.optimizers[0].param_groups[0]["lr"], sch.last_epoch)
            if trainer.global_step == FAULT:
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = math.nan

    torch.manual_seed(0)
    model = FullBatch(lr=LRS[0], optimizer="sgd", scheduler=SCHEDULERS[name])
    # the non-finite fault alone decides (the finite-signal rules are not what this test is about)
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=20, snapshot_confirm_steps=5, divergence=False,
                     stability=False)  # fmt: skip
    probe = Probe()
    with tempfile.TemporaryDirectory() as tmp:
        make_trainer(tmp, [guard, probe], max_steps=TRAINER_STEPS, logger=False).fit(model)
    events = [(e["step"], e["kind"], e["snapshot_step"]) for e in guard.events]
    assert events == [(FAULT, "rollback", 60)]
    ref = reference(name, "sgd", 1, steps=TRAINER_STEPS)
    for t, (lr, step) in sorted(probe.rows.items()):
        scale = 0.5 if t > FAULT else 1.0
        assert lr == scale * ref[step][0], (t, step, lr, scale * ref[step][0])
    assert probe.rows[FAULT + 1][1] == 60
