"""The guard engine with the smallest real host: a model, an SGD optimizer, a list that collects what is written.

No Trainer and no plain-loop guard: these tests drive ``GuardEngine`` directly, as an adapter does, and check what
only the engine decides (the orchestration), against values computed here.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard.core.engine import EngineField, GuardEngine, GuardHost, GuardOptions, check_guard_options
from lightning_gradguard.core.guard import GuardDecision
from lightning_gradguard.core.measure import compute_grad_stats
from lightning_gradguard.errors import DivergenceError


class ListHost(GuardHost):
    """A loop of one model and one optimizer; everything the engine writes goes into lists."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.net, self.opt = model, opt
        self.lines: list[str] = []
        self.scalars: list[tuple[int, dict[str, float]]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.stopped = False
        self.changed = 0

    def model(self) -> nn.Module:
        return self.net

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    def schedulers(self) -> list[Any]:
        return []

    def announce(self, line: str) -> None:
        self.lines.append(line)

    def emit_scalars(self, values: dict[str, float], step: int) -> None:
        self.scalars.append((step, dict(values)))

    def emit_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text, step))

    def state_changed(self) -> None:
        self.changed += 1

    def stop_training(self) -> None:
        self.stopped = True


def _setup(**options: Any) -> tuple[GuardEngine, ListHost, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = GuardEngine(check_guard_options("TestGuard", "test_report", **options))
    host = ListHost(model, opt)
    engine.start(host, 0)
    return engine, host, model, opt


def _step(engine: GuardEngine, model: nn.Module, opt: torch.optim.Optimizer, step: int, bad: bool = False) -> bool:
    """One optimizer step as an adapter runs it; returns whether the engine flagged it."""
    engine.open_window(model)
    x = torch.randn(16, 4)
    loss = model(x).pow(2).mean() * (float("nan") if bad else 1.0)
    loss.backward()
    stats = compute_grad_stats(list(model.parameters()), [n for n, _ in model.named_parameters()])
    verdict = engine.judge(step, [stats], loss.detach())
    if verdict.health is not None:
        for p in model.parameters():
            p.grad = None
    else:
        opt.step()
    opt.zero_grad()
    return engine.end_step(step, [])


def test_a_nan_step_is_skipped_bit_for_bit_and_written_through_the_host() -> None:
    engine, host, model, opt = _setup(action="skip")
    for s in range(3):
        _step(engine, model, opt, s)
    before = copy.deepcopy(model.state_dict())
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    assert _step(engine, model, opt, 3, bad=True) is True
    for key, value in before.items():  # BatchNorm's running statistics included: restored after the bad forward
        assert torch.equal(model.state_dict()[key], value), key
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert engine.outcome is GuardDecision.SKIPPED
    assert engine.skipped_steps == 1
    assert [(e["step"], e["kind"], e["cause"]) for e in engine.events] == [(3, "skip", "nonfinite_loss")]
    assert host.lines == [host.texts[0][1]]
    assert host.lines[0].startswith("TestGuard skip at step 3: nonfinite loss")
    assert host.texts[0][0] == "gradguard/nan_guard_events"
    step, values = host.scalars[-1]
    assert step == 3
    assert values["gradguard/skipped_steps"] == 1.0
    assert values["gradguard/flagged_steps"] == 1.0
    assert math.isnan(values["gradguard/loss_max"])
    assert _step(engine, model, opt, 4) is False
    assert engine.outcome is GuardDecision.HEALTHY


def test_a_rollback_restores_the_trusted_snapshot_and_cuts_the_lr_once() -> None:
    engine, host, model, opt = _setup(action="rollback", snapshot_every_n_steps=2, snapshot_confirm_steps=1)
    states = {}
    for s in range(6):
        states[s] = copy.deepcopy(model.state_dict())  # a snapshot of step s holds the state before update s
        _step(engine, model, opt, s)
    trusted = engine.store.compute()
    assert trusted is not None
    expected = states[trusted.step]
    _step(engine, model, opt, 6, bad=True)
    assert engine.outcome is GuardDecision.ROLLED_BACK
    assert engine.events[-1]["snapshot_step"] == trusted.step
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert (engine.lr_scale, engine.rollbacks, host.changed) == (0.5, 1, 1)


def test_without_a_snapshot_a_rollback_becomes_a_skip_and_spends_no_budget() -> None:
    engine, host, model, opt = _setup(action="rollback", snapshot_every_n_steps=50)
    engine.store.reset()  # the start snapshot is gone (e.g. its copy failed)
    _step(engine, model, opt, 0)
    _step(engine, model, opt, 1, bad=True)
    assert engine.events[-1]["kind"] == "skip"
    assert "no trusted snapshot yet" in engine.events[-1]["reason"]
    assert engine.rollbacks == 0


def test_a_halt_writes_through_the_host_stops_the_loop_and_raises() -> None:
    engine, host, model, opt = _setup(action="halt")
    _step(engine, model, opt, 0)
    with pytest.raises(DivergenceError, match="nonfinite loss; action='halt'") as info:
        _step(engine, model, opt, 1, bad=True)
    assert info.value.step == 1
    assert host.stopped
    assert engine.halted
    assert engine.events[-1]["kind"] == "halt"


def test_state_round_trip_keeps_counters_events_and_outcome() -> None:
    engine, _, model, opt = _setup(action="skip")
    _step(engine, model, opt, 0)
    _step(engine, model, opt, 1, bad=True)
    other = GuardEngine(check_guard_options("TestGuard", "test_report", action="skip"))
    other.load_state_dict(engine.state_dict())
    assert (other.skipped_steps, other.events, other.outcome) == (1, engine.events, GuardDecision.SKIPPED)
    assert other.judge_.loss_history == engine.judge_.loss_history


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"action": "panic"}, ValueError, "TestGuard: action"),
        ({"lr_factor": 0.0}, ValueError, "lr_factor"),
        ({"max_rollbacks": -1}, ValueError, "max_rollbacks"),
        ({"divergence": 1}, TypeError, "divergence"),
        ({"report_dir": 3}, TypeError, "report_dir must be a path or None"),
        ({"spike_zscore": math.inf}, ValueError, "spike_zscore"),
        ({"unknown": 1}, TypeError, "unknown guard option"),
    ],
)
def test_options_are_checked_once_naming_the_adapter(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        check_guard_options("TestGuard", "test_report", **options)


def test_engine_fields_read_and_write_the_engine_and_its_options() -> None:
    class Adapter:
        lr_factor = EngineField(options=True)
        reason = EngineField("outcome")

        def __init__(self) -> None:
            self.engine = GuardEngine(GuardOptions())

    a = Adapter()
    assert (a.lr_factor, a.reason) == (0.5, GuardDecision.HEALTHY)
    a.lr_factor = 0.25
    assert a.engine.options.lr_factor == 0.25


class _Weighted(nn.Module):
    """A regression whose loss weight is a buffer (an objective the user changes during the fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("loss_weight", torch.tensor(1.0))


class _RerunHost(ListHost):
    """ListHost that recomputes a batch's loss (as the Lightning and plain-loop hosts do) and records the loss weight
    every recomputation saw."""

    def __init__(self, model: _Weighted, opt: torch.optim.Optimizer) -> None:
        super().__init__(model, opt)
        self.weights_seen: list[float] = []

    def rerun_takes_items(self) -> bool:
        return True

    def rerun(self, items: list, rngs: list, weights: dict | None, step: int | None = None) -> Any:
        from lightning_gradguard.core.recover._rerun import rerun_step

        net = self.net

        def loss() -> torch.Tensor:
            x, y = items[0][0]
            self.weights_seen.append(float(net.loss_weight))
            return net.loss_weight * (net.lin(x) - y).pow(2).mean()

        return rerun_step(net, [loss], rngs[:1], weights)


def test_an_earlier_state_is_scored_with_todays_buffers_and_the_model_is_left_as_found() -> None:
    """The test "does a kept state do better on the same batches" runs the kept weights with the buffers the model
    has now: a loss weight kept in a buffer is today's objective. Scored under its own (older, smaller) weight, the
    kept state would always look better, and a rollback would take the user's objective back with it."""
    torch.manual_seed(0)
    model = _Weighted()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    host = _RerunHost(model, opt)
    engine = GuardEngine(check_guard_options("TestGuard", "test_report"))
    engine.start(host, 0)
    kept = {k: v.clone() for k, v in model.state_dict().items()}  # the kept state: weight 1.0, the initial weights
    from lightning_gradguard.core.recover._snapshot import Snapshot

    snap = Snapshot(step=0, model=kept, optimizers=[], schedulers=[])
    with torch.no_grad():  # the run moved on: new weights, and the user raised the loss weight to 5
        model.lin.weight.add_(0.5)
        model.loss_weight.fill_(5.0)
    now_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    measured = engine._rerun_pair([([((x, y), 0)], [None])], snap, 1)
    assert measured is not None
    now, then = measured
    assert host.weights_seen == [5.0, 5.0]  # both runs under today's objective
    with torch.no_grad():
        reference_then = 5.0 * (x @ kept["lin.weight"].T + kept["lin.bias"] - y).pow(2).mean()
        reference_now = 5.0 * (model.lin(x) - y).pow(2).mean()
    assert then == pytest.approx(float(reference_then), rel=1e-6)
    assert now == pytest.approx(float(reference_now), rel=1e-6)
    for key, value in now_state.items():  # the model is left as it was: weights and the user's buffer
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(("share", "stands"), [(1 / 3, False), (2 / 3, True)])
def test_a_climbs_rollback_stands_only_if_the_earlier_state_buys_back_most_of_the_climb(share: float, stands: bool):
    """The state from before a climb is rerun on today's batch. Clearly better on it is not enough: it must buy back
    more than half of the climb from the best window, or the batches got harder and a rollback would leave the run
    near today's level (a healthy scheduled-sampling run whose task hardened while its LR warmed up: the earlier
    state did 18 % better on the batches, a sixth of the climb, and the rollback cost 10 % of its final metric)."""
    from lightning_gradguard.core.guard._stability import StabilityFinding

    torch.manual_seed(0)
    model = _Weighted()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    host = _RerunHost(model, opt)
    engine = GuardEngine(check_guard_options("TestGuard", "test_report"))
    engine.start(host, 0)  # the trusted snapshot of step 0 is the state from before the climb
    with torch.no_grad():
        w0, b0 = model.lin.weight.clone(), model.lin.bias.clone()
    x = torch.randn(64, 4)
    with torch.no_grad():
        y = x @ w0.T + b0 + 0.5 * torch.randn(64, 1)
        model.lin.weight.add_(0.2)  # the run moved on, and does worse on this batch
        then = float((x @ w0.T + b0 - y).pow(2).mean())
        now = float((model.lin(x) - y).pow(2).mean())
    assert then < 0.85 * now  # clearly better on the batch, as the rule asks
    best = now - (now - then) / share  # the earlier state buys back `share` of the climb
    finding = StabilityFinding(
        "loss_above_best", {"best": best, "old_loss": now, "new_loss": now}, "climbed", target="before_climb"
    )
    engine._batches, engine._rngs = [((x, y), 0)], [None]
    refuted = engine._refute_restart(200, finding)
    if stands:
        assert refuted is None
        assert "the state of step 0 does better" in engine._claim_note
    else:
        assert refuted is not None
        assert "buys back less than half of the climb" in refuted[0]
