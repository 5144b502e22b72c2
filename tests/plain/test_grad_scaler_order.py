"""GradGuard and the user's own ``scaler.unscale_``: before_step unscales the gradients itself, so a call of the
user's after it (nanoGPT's ``scaler.unscale_(optimizer); clip_grad_norm_(...)`` kept as it was) must neither raise
torch's "unscale_() has already been called on this optimizer since the last update()" nor unscale a second time;
a call before before_step is seen and not repeated. References: an unguarded twin loop with its own scaler."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lightning_gradguard import GradGuard


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05), torch.amp.GradScaler("cpu", init_scale=1024.0)


def _loss(model: nn.Module, it: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(it)
    x = torch.randn(16, 6, generator=g)
    return nn.functional.mse_loss(model(x), x[:, :1])


def _twin(steps: int) -> tuple[list[float], nn.Module]:
    """The unguarded loop: scale, backward, unscale_, clip to 1, step, update."""
    model, opt, scaler = _setup()
    norms = []
    for it in range(steps):
        scaler.scale(_loss(model, it)).backward()
        scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return norms, model


@pytest.mark.parametrize("where", ["after_before_step", "before_before_step"])
def test_the_users_own_unscale_neither_raises_nor_unscales_twice(where: str) -> None:
    ref_norms, ref_model = _twin(5)
    model, opt, scaler = _setup()
    guard = GradGuard(model, opt, scaler=scaler, clipping="norm", clipping_options={"max_norm": 1e6})  # measure only
    norms = []
    for it in range(5):
        loss = _loss(model, it)
        scaler.scale(loss).backward()
        if where == "before_before_step":
            scaler.unscale_(opt)
        ok = guard.before_step(loss)
        if where == "after_before_step":
            scaler.unscale_(opt)  # already done by before_step: a no-op, not torch's RuntimeError
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        assert ok
        scaler.step(opt)
        scaler.update()
        guard.after_step()
        opt.zero_grad()
    assert norms == pytest.approx(ref_norms, rel=1e-6)  # unscaled once: divided twice they would be 1024x smaller
    assert float(guard.last[0].grad_norm) == pytest.approx(ref_norms[-1], rel=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)


def test_a_users_own_second_unscale_still_raises_torchs_error() -> None:
    model, opt, scaler = _setup()
    GradGuard(model, opt, scaler=scaler, clipping=None)
    scaler.scale(_loss(model, 0)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
        scaler.unscale_(opt)  # the user's own mistake, not the guard's: torch's message stands


def test_a_dropped_step_then_the_users_unscale_and_step_change_nothing() -> None:
    model, opt, scaler = _setup()
    guard = GradGuard(model, opt, scaler=scaler, action="skip", clipping=None)
    before = copy.deepcopy(model.state_dict())
    loss = _loss(model, 0) * float("nan")
    scaler.scale(loss).backward()
    assert not guard.before_step(loss)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    guard.after_step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_the_guarded_scaler_still_pickles_and_deep_copies() -> None:
    model, opt, scaler = _setup()
    GradGuard(model, opt, scaler=scaler)
    for copied in (
        copy.deepcopy(scaler),
        pickle.loads(pickle.dumps(scaler)),
        torch.load(io.BytesIO(_saved(scaler)), weights_only=False),
    ):
        assert copied.get_scale() == 1024.0
        assert copied.state_dict() == scaler.state_dict()
        m2, o2, _ = _setup()
        copied.scale(_loss(m2, 0)).backward()
        copied.unscale_(o2)  # the copy's own method, bound to the copy
        copied.step(o2)
        copied.update()


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
