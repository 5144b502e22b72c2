"""eps_hazards: which optimizer settings a 16-bit parameter dtype cannot divide by, checked against torch's own Adam."""

from __future__ import annotations

import pytest
import torch

from lightning_gradguard.core.measure._numerics import eps_hazards


def _param(dtype: torch.dtype, n: int = 64) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.linspace(-1, 1, n).to(dtype))


def _adam_steps(dtype: torch.dtype, eps: float, steps: int = 5, fused: bool = False) -> torch.Tensor:
    """Torch's Adam on one parameter of ``dtype`` with small and large gradient entries (an independent reference:
    does the update stay finite?)."""
    p = _param(dtype)
    opt = torch.optim.Adam([p], lr=1e-3, eps=eps, fused=fused)
    grad = torch.cat([torch.full((32,), 1e-4), torch.full((32,), 0.5)]).to(dtype)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize(
    ("dtype", "eps", "zero", "hazard"),
    [
        (torch.float16, 1e-8, True, True),  # Adam's default: rounds to 0 in float16
        (torch.float16, 1e-6, False, True),  # held (a subnormal), but 1 / eps overflows float16
        (torch.float16, 1e-4, False, False),
        (torch.bfloat16, 1e-8, False, False),  # bfloat16 has float32's range
        (torch.float32, 1e-8, False, False),
    ],
)
def test_finding_matches_what_torch_adam_does(dtype, eps, zero, hazard):
    found = eps_hazards([torch.optim.Adam([_param(dtype)], eps=eps)])
    assert bool(found) is hazard
    if found:
        (h,) = found
        assert (h.optimizer, h.group, h.name, h.dtype, h.eps) == (0, 0, "Adam", dtype, eps)
        assert (h.rounds_to == 0.0) is zero
        assert h.limit == pytest.approx(1 / 65504)
        text = h.describe()
        assert f"eps={eps:g}" in text
        assert "float16" in text
        assert "16-mixed" in text
    # the reference: a zero eps in float16 really writes non-finite values; the settings without a finding do not
    if zero:
        assert not bool(torch.isfinite(_adam_steps(dtype, eps)).all())
    if not hazard:
        assert bool(torch.isfinite(_adam_steps(dtype, eps)).all())


def test_the_advised_eps_keeps_float16_adam_finite():
    (h,) = eps_hazards([torch.optim.Adam([_param(torch.float16)])])
    advised = h.advised_eps
    assert h.limit <= advised < 1.1 * h.limit
    assert f"eps >= {advised:.2g}" in h.describe()
    assert bool(torch.isfinite(_adam_steps(torch.float16, advised, steps=50)).all())
    assert not eps_hazards([torch.optim.Adam([_param(torch.float16)], eps=advised)])


def test_each_group_and_optimizer_is_named_and_other_optimizers_are_left_alone():
    half, full = _param(torch.float16), _param(torch.float32)
    adamw = torch.optim.AdamW([{"params": [full]}, {"params": [half], "eps": 1e-10}])
    sgd = torch.optim.SGD([_param(torch.float16)], lr=0.1)  # no eps: nothing to divide by
    rms = torch.optim.RMSprop([_param(torch.float16)])
    found = eps_hazards([sgd, adamw, rms])
    assert [(h.optimizer, h.group, h.name) for h in found] == [(1, 1, "AdamW"), (2, 0, "RMSprop")]


class _Odd(torch.optim.Optimizer):
    """An optimizer with an eps pair (as Adafactor has) and one whose param groups cannot be read."""

    def __init__(self, params):
        super().__init__(params, {"eps": (1e-30, 1e-3)})


class _Broken:
    @property
    def param_groups(self):
        raise RuntimeError("not readable")


def test_unreadable_or_non_numeric_settings_give_nothing_and_never_raise():
    assert eps_hazards([_Odd([_param(torch.float16)]), _Broken()]) == []  # type: ignore[list-item]
    assert eps_hazards([]) == []


def test_fused_adam_computes_in_float32_and_is_left_alone():
    assert bool(torch.isfinite(_adam_steps(torch.float16, 1e-8, fused=True)).all())  # the reference: no harm
    assert not eps_hazards([torch.optim.Adam([_param(torch.float16)], fused=True)])
