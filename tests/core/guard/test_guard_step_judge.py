"""The shared step judgement (core/guard/_step_judge.py): what one step's scalars and the cross-rank max decide."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.core.guard._step_judge import StepJudge
from lightning_gradguard.core.measure._grad_stats import compute_grad_stats


@pytest.fixture(autouse=True, params=[True, False], ids=["host_values", "tensor_path"])
def judge_path(request, monkeypatch):
    """Every test runs with the single-process CPU values read directly and on the tensor path."""
    monkeypatch.setattr(StepJudge, "host_fast_path", request.param)
    return request.param


def _stats(grad: list[float]):
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    return compute_grad_stats([p])


class _OtherRank:
    """A two-rank max where the other rank's vector is given: what ``torch.distributed``'s MAX would return."""

    world_size = 2

    def __init__(self, other: list[float]) -> None:
        self.other = other
        self.seen: list[list[float]] = []

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        self.seen.append(local.tolist())
        return torch.maximum(local, torch.tensor(self.other, dtype=torch.float64))


def _judge(reduce=None, **kw) -> StepJudge:
    args = {"divergence": True, "stability": True, "spike_zscore": None, "spike_window": 10}
    args.update(kw)
    return StepJudge(reduce, amp_scale_floor=1.0, history_size=50, **args)


def test_single_process_flags_this_steps_faults_and_reports_norm_and_loss():
    judge = _judge()
    ok = judge.judge(0, [_stats([3.0, 4.0])], torch.tensor(1.5), None)
    assert ok.health is None
    assert ok.norm == pytest.approx(5.0)
    assert ok.loss == pytest.approx(1.5)
    bad = judge.judge(1, [_stats([math.nan, 1.0])], torch.tensor(math.inf), None)
    assert bad.health is not None
    assert bad.health.nonfinite_grad
    assert bad.health.nonfinite_loss
    assert not bad.health.other_rank
    assert [r[0] for r in judge.grad_history] == [0, 1]


def test_a_fault_on_another_rank_is_flagged_as_other_rank_and_nan_reaches_the_reducer_as_inf():
    # the other rank's vector: [norm, loss, loss non-finite, scale collapse, spike]
    reducer = _OtherRank([math.inf, 1.0, 0.0, 0.0, 0.0])
    verdict = _judge(reducer).judge(0, [_stats([3.0, 4.0])], torch.tensor(1.0), None)
    assert verdict.health is not None
    assert verdict.health.other_rank
    assert not verdict.health.nonfinite_grad
    assert verdict.health.cause is not None
    assert verdict.norm == pytest.approx(5.0)  # this rank's own value is what it reports
    reducer2 = _OtherRank([0.0, 0.0, 0.0, 0.0, 0.0])
    _judge(reducer2).judge(0, [_stats([math.nan])], torch.tensor(1.0), None)
    assert reducer2.seen[0][0] == math.inf  # collectives may drop NaN: it travels as +inf


def test_divergence_is_judged_on_the_shared_maximum_so_ranks_stay_in_lockstep():
    # rank A sees a calm loss, the other rank a loss that leaves its healthy range: both must flag the same step
    calm, wild = _judge(_OtherRank([1.0, 1.0, 0, 0, 0])), _judge(_OtherRank([1.0, 1.0, 0, 0, 0]))
    flagged = {}
    for step in range(60):
        big = 1e6 * 3.0 ** (step - 40) if step >= 40 else 1.0  # blown up and climbing
        for name, judge in (("calm", calm), ("wild", wild)):
            judge.reduce.other = [1.0, big if name == "calm" else 1.0, 0, 0, 0]
            own = torch.tensor(big if name == "wild" else 1.0)
            v = judge.judge(step, [_stats([1.0])], own, None)
            if v.health is not None and name not in flagged:
                flagged[name] = step
    assert flagged
    assert flagged.get("calm") == flagged.get("wild")


def test_state_dict_round_trip_keeps_the_detectors_and_the_pending_row():
    judge = _judge(spike_zscore=3.0)
    for step in range(12):
        judge.judge(step, [_stats([1.0 + 0.01 * step])], torch.tensor(2.0 - 0.01 * step), None)
    judge.clip_flags = [True]
    copy = _judge(spike_zscore=3.0)
    copy.load_state_dict(judge.state_dict())
    mine, theirs = judge.state_dict(), copy.state_dict()
    for key in ("divergence", "stability", "grad_history", "loss_history", "pending_row", "clip_flags"):
        assert theirs[key] == mine[key], key
    assert mine["pending_row"] is not None
    a = judge.judge(12, [_stats([9.0])], torch.tensor(50.0), None)
    b = copy.judge(12, [_stats([9.0])], torch.tensor(50.0), None)
    assert (a.health, a.stability) == (b.health, b.stability)
    assert a.lower_lr is a.stability  # the alias


class _Scaler:
    """A GradScaler stand-in: enabled, with its scale tensor."""

    def __init__(self, scale: float) -> None:
        self._scale = torch.tensor(scale)

    def is_enabled(self) -> bool:
        return True


@pytest.mark.parametrize("spike", [None, 2.0])
@pytest.mark.parametrize("loss_kind", ["tensor", "float", "none"])
def test_host_values_and_tensor_path_judge_every_step_alike(spike, loss_kind):
    """The same stream of steps (healthy, NaN/inf, divergence, clipping, AMP overflow and scale collapse) through
    both ways of reading the values: identical verdicts, histories and detector states."""
    g = torch.Generator().manual_seed(3)
    steps = []
    for step in range(280):
        norm = float(torch.rand((), generator=g)) + 0.5
        loss = 2.0 - min(step, 150) / 200 + max(0, step - 150) / 60 + 0.05 * float(torch.rand((), generator=g))
        if step in (30, 31):
            norm = math.nan
        if step == 45:
            loss = math.inf
        if 60 <= step < 66:
            loss *= 1e4  # a loss that leaves its range: divergence
        if 100 <= step < 130:
            norm *= 1.0 + (step - 100) * 0.5  # a rising norm
        scale = 0.5 if step == 140 else 1024.0
        amp = step in (80, 81, 140)
        flags = [bool(step % 3 == 0), torch.tensor(step % 5 == 0)] if step % 2 else [step % 4 == 0]
        if step >= 150:
            flags = [True]  # sustained clipping while the loss stops falling: the stability controller's case
        steps.append((step, norm, loss, flags, _Scaler(scale) if amp else None))
    runs = []
    for host in (True, False):
        StepJudge.host_fast_path = host
        try:
            judge = _judge(spike_zscore=spike, spike_window=20)
            out = []
            for step, norm, loss, flags, scaler in steps:
                judge.clip_flags = list(flags)
                given = {"tensor": torch.tensor(loss), "float": loss, "none": None}[loss_kind]
                v = judge.judge(step, [_stats([norm, 0.5])], given, scaler)
                out.append((v.health, v.overflow, v.stability, v.loss, v.norm))
            state = judge.state_dict()
            state.pop("spike")
            runs.append((out, state))
        finally:
            StepJudge.host_fast_path = True
    assert repr(runs[0]) == repr(runs[1])  # repr: NaN compares unequal to itself
    assert any(r[0] is not None for r in runs[0][0])
    assert loss_kind == "none" or any(r[2] is not None for r in runs[0][0])  # an LR cut happened


def _two_tensor_stats(dead: bool):
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.zeros(3) if dead else torch.full((3,), 0.01)
    b.grad = torch.tensor([0.3, 0.4])
    return compute_grad_stats([a, b])


def test_the_vanished_share_is_measured_only_while_the_controller_asks_and_rides_in_the_pending_row():
    judge = _judge()
    ctl = judge.streams[0].controller
    steps = 0

    def feed(n: int, dead: bool, loss: float) -> None:
        nonlocal steps
        for _ in range(n):
            judge.judge(steps, [_two_tensor_stats(dead)], torch.tensor(loss), None)
            steps += 1

    feed(30, dead=False, loss=2.0)
    assert judge.streams[0].last[3] is None  # a healthy run: measured in its first window only (which tensors live)
    assert ctl._alive == [True, True]
    ctl.wants_vanished = ctl._wants_dead = True  # as after a judgement that saw the dead-network signs
    feed(1, dead=True, loss=2.0)
    mask = judge.streams[0].last[3]
    assert [bool(v) for v in mask] == [True, False]  # the first tensor's gradient vanished, the second's did not
    copy = _judge()
    copy.load_state_dict(judge.state_dict())
    assert copy.streams[0].last == judge.streams[0].last
    # checkpoints of older versions: three values in the pending row; a share instead of the mask
    old = judge.state_dict()
    old["pending_row"] = old["pending_row"][:3]
    legacy = _judge()
    legacy.load_state_dict(old)
    assert legacy.streams[0].last[3] is None
    old["pending_row"] = [*old["pending_row"], 0.5]
    legacy.load_state_dict(old)
    assert legacy.streams[0].last[3] == pytest.approx(0.5)
