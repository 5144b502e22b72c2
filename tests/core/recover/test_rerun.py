"""Rerun diagnosis in pure PyTorch: transient, data and state faults told apart by recomputing the step."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn

from lightning_gradguard.core.recover._rerun import BackwardRecorder, RerunResult, RngState, classify, rerun_step
from lightning_gradguard.core.recover._untouched import nonfinite_attributes


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1))


def diagnose(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trusted: dict | None, step_rng: RngState):
    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    fault = RerunResult(math.nan, math.nan)
    same = rerun_step(model, [loss], [step_rng])
    again = rerun_step(model, [loss], [step_rng], weights=trusted) if trusted is not None else None
    weights_bad = any(not bool(torch.isfinite(p).all()) for p in model.parameters())
    return classify(fault, False, weights_bad, same, again if same is not None and not same.finite else None, 7)


def test_a_one_off_corruption_that_does_not_reproduce_is_transient() -> None:
    model = net()
    calls = []

    def corrupt_once(_mod, _inp, out):
        calls.append(1)
        return out * math.nan if len(calls) == 1 else out

    model[0].register_forward_hook(corrupt_once)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    rng = RngState.capture()
    first = nn.functional.mse_loss(model(x), y)  # the flagged step
    assert math.isnan(float(first.detach()))
    found = diagnose(model, x, y, {k: v.clone() for k, v in model.state_dict().items()}, rng)
    assert found.kind == "transient"
    assert "does not reproduce" in found.evidence


def test_a_finite_batch_that_fails_from_any_state_is_data() -> None:
    model = net()
    trusted = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4), torch.full((8, 1), 1e30)  # a corrupt label: the squared error overflows
    found = diagnose(model, x, y, trusted, RngState.capture())
    assert found.kind == "data"
    assert "trusted state of step 7" in found.evidence


def test_a_batch_that_fails_from_the_trusted_state_is_not_data_while_unheld_state_is_non_finite() -> None:
    """The flagged batch fails from the trusted state too: "data", unless the module carries NaN/inf in a plain
    tensor attribute (no snapshot holds it: a hidden state kept across steps); then that is what fails."""
    bad = RerunResult(math.nan, math.nan)
    assert classify(bad, False, False, bad, bad, 7).kind == "data"
    unheld = classify(bad, False, False, bad, bad, 7, unheld=["rnn_state"])
    assert unheld.kind == "unrestorable"
    assert "rnn_state" in unheld.evidence
    assert "register_buffer" in unheld.evidence
    m = net()
    m.carried = torch.tensor([1.0, math.nan])
    m[0].cache = torch.full((2,), math.nan)
    m.fine, m.count = torch.zeros(3), torch.tensor([3])
    m[3].hidden = (torch.zeros(2), torch.tensor([math.nan]))  # an LSTM's (h, c)
    m[3].mask = torch.nn.Transformer.generate_square_subsequent_mask(3)  # -inf by design: a cached attention mask
    assert nonfinite_attributes(m) == ["carried", "0.cache", "3.hidden"]


def test_weights_gone_bad_since_the_trusted_snapshot_are_the_state() -> None:
    model = net()
    trusted = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[3].weight.fill_(3e38)  # finite, but every output overflows
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = diagnose(model, x, y, trusted, RngState.capture())
    assert found.kind == "state"
    assert "the state went bad" in found.evidence
    for k, v in model.state_dict().items():  # the rerun from the snapshot put the module's own weights back
        assert torch.equal(v, before[k])


def test_the_rerun_replays_the_same_random_numbers_and_leaves_the_generator_alone() -> None:
    model = net()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    rng = RngState.capture()
    loss = nn.functional.mse_loss(model(x), y)  # dropout draws from the generator
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    after = torch.get_rng_state()
    again = rerun_step(model, [lambda: nn.functional.mse_loss(model(x), y)], [rng])
    assert again.loss == float(loss)
    assert again.grad_norm == norm
    assert torch.equal(torch.get_rng_state(), after)
    assert all(p.grad is None for p in model.parameters())  # .grad never touched


class _SideEffects(nn.Module):
    """A step with the side effects real training steps have: a counter, a queue kept as a plain tensor, a replay
    list and a dict, its own generators, an in-place target-network update, an attribute it creates, draws from
    Python's and NumPy's global generators."""

    def __init__(self) -> None:
        super().__init__()
        self.online, self.target = nn.Linear(4, 1), nn.Linear(4, 1)
        self.calls = 0
        self.queue = torch.zeros(6)
        self.replay: list[int] = [1, 2]
        self.seen: dict[str, int] = {"a": 1}
        self.gen = torch.Generator().manual_seed(3)
        self.py_gen = random.Random(4)
        self.np_gen = np.random.default_rng(5)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.queue[self.calls % 6] = float(torch.rand(1, generator=self.gen))
        self.replay.append(self.py_gen.randint(0, 9))
        self.seen[str(self.np_gen.integers(9))] = 1
        self.created = random.random() + float(np.random.rand())
        with torch.no_grad():
            for t, o in zip(self.target.parameters(), self.online.parameters()):
                t.mul_(0.5).add_(o, alpha=0.5)
        return nn.functional.mse_loss(self.online(x) + self.target(x), y)


def _state_of(m: _SideEffects) -> tuple:
    return (
        m.calls, m.queue.clone(), list(m.replay), dict(m.seen), m.gen.get_state(), m.py_gen.getstate(),
        m.np_gen.bit_generator.state, hasattr(m, "created"), {k: v.clone() for k, v in m.state_dict().items()},
        random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(),
    )  # fmt: skip


def test_a_rerun_leaves_the_steps_side_effects_undone() -> None:
    """A rerun checks a finding on a run that may be healthy: whatever the user's step changes in its module (and
    the global generators it draws from) must be as it was afterwards, or the check itself changed the run. Before,
    a TD3-style step's target-network update, counters and its own generator's draws stayed changed."""
    m = _SideEffects()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    before = _state_of(m)
    replay, seen, queue = m.replay, m.seen, m.queue
    for weights in (None, {k: v + 1 for k, v in m.state_dict().items()}):
        result = rerun_step(m, [lambda: m.step(x, y), lambda: m.step(x, y)], [RngState.capture()], weights)
        assert result is not None
        assert math.isfinite(result.loss)
        after = _state_of(m)
        for a, b in zip(before, after):
            if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
                assert all(torch.equal(a[k], b[k]) for k in a)
            elif isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            elif isinstance(a, np.ndarray):
                assert (a == b).all()
            else:
                assert a == b
        assert m.replay is replay  # restored in place: references the user holds stay valid
        assert m.seen is seen
        assert m.queue is queue
    m.step(x, y)  # the real step still has its effects
    assert m.calls == 1
    assert len(m.replay) == 3
    assert m.created


def test_a_rerun_that_cannot_run_is_no_diagnosis() -> None:
    model = net()

    def broken() -> torch.Tensor:
        raise RuntimeError("data loader gone")

    assert rerun_step(model, [broken]) is None
    assert classify(RerunResult(math.nan, None), False, False, None, None) is None
    assert classify(RerunResult(math.nan, None), True, False, None, None).kind == "data"


def test_a_manual_step_with_two_losses_reports_their_sum_and_the_norm_of_all_its_gradients() -> None:
    model = net()
    model.eval()  # no dropout: the reference below draws no random numbers
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    recorder = BackwardRecorder(model)

    def step() -> BackwardRecorder:  # what a GAN-style training_step does with manual_backward
        recorder.reset()
        hidden = model[2](model[0](x))
        first = nn.functional.mse_loss(model[3](hidden), y)
        recorder(first)
        second = hidden.pow(2).mean()  # through the same graph: retain_graph kept it
        recorder(second)
        return recorder

    result = rerun_step(model, [step])
    params = list(model.parameters())
    first = nn.functional.mse_loss(model(x), y)
    second = model[2](model[0](x)).pow(2).mean()
    grads = [g for loss in (first, second) for g in torch.autograd.grad(loss, params, allow_unused=True)]
    sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    assert result is not None
    assert math.isclose(result.loss, float(first) + float(second), rel_tol=1e-6)
    assert math.isclose(result.grad_norm, math.sqrt(sq), rel_tol=1e-9)
    assert all(p.grad is None for p in params)


def test_a_forward_only_rerun_cannot_call_a_gradient_only_fault_transient() -> None:
    model = net()
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    same = rerun_step(model, [lambda: nn.functional.mse_loss(model(x), y)], grads=False)
    assert same is not None
    assert same.grad_norm is None
    assert math.isfinite(same.loss)
    # the step's loss was finite, its gradients were not: a finite loss says nothing about them
    assert classify(RerunResult(0.5, math.nan), False, False, same, None) is None
    assert classify(RerunResult(0.5, math.nan), False, False, same, None, loss_nonfinite=True).kind == "transient"
    assert classify(RerunResult(math.nan, math.nan), False, False, same, None).kind == "transient"


def test_a_rerun_non_finite_on_another_rank_is_not_finite() -> None:
    result = RerunResult(0.25, None, others_finite=False)
    assert not result.finite
    assert result.describe() == "loss 0.25 here, non-finite on another rank"
    found = classify(RerunResult(0.25, math.nan), False, False, result, None, loss_nonfinite=True)
    assert found.kind == "reproducible"


def _bce_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(model(x).squeeze(1))
    return -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()  # log(0) once the sigmoid saturates


def test_a_batch_only_the_trained_model_cannot_take_is_data_when_an_ordinary_batch_passes() -> None:
    """A hand-written BCE on an outlier row: the untrained model takes the batch, the trained one (larger weights)
    saturates its sigmoid and gives log(0). The current state passes an ordinary batch, so the state is sound: data.
    A state that fails the ordinary batch too is the state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    trusted = {k: v.clone() for k, v in model.state_dict().items()}  # untrained: logits within +-2
    with torch.no_grad():
        model[2].weight.mul_(40.0)  # "trained": confident outputs
    x = torch.randn(8, 4) * 50  # outlier rows: the trained model's logits reach ~+-35
    with torch.no_grad():
        logits = model(x).squeeze(1)
    y = (logits > 0).float()
    y[int(logits.argmax())] = 0.0  # confidently wrong beyond float32's sigmoid: log(1 - 1) = log(0)
    x_ok = torch.randn(8, 4) * 0.05  # an ordinary batch: logits ~10, no sigmoid saturates
    y_ok = torch.ones(8)
    rng = RngState.capture()
    fault = RerunResult(math.nan, math.nan)
    same = rerun_step(model, [lambda: _bce_by_hand(model, x, y)], [rng])
    again = rerun_step(model, [lambda: _bce_by_hand(model, x, y)], [rng], weights=trusted)
    ordinary = rerun_step(model, [lambda: _bce_by_hand(model, x_ok, y_ok)], [rng])
    assert not same.finite
    assert again.finite
    assert ordinary.finite
    found = classify(fault, False, False, same, again, 7, ordinary=ordinary)
    assert found.kind == "data"
    assert "the state is sound" in found.evidence
    assert "last healthy step's batch" in found.evidence
    bad = RerunResult(math.inf, math.nan)
    found = classify(fault, False, False, same, again, 7, ordinary=bad)
    assert found.kind == "state"
    assert "on the last healthy step's batch too" in found.evidence
    assert classify(fault, False, False, same, again, 7).kind == "state"  # no ordinary batch known: the state
