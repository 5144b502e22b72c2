"""What an optimizer's own arithmetic can hold in the parameters' precision: read once, when a fit starts.

Adam-family optimizers divide by ``sqrt(v) + eps``, computed in the parameters' dtype. With weights kept in float16
(``precision="16-true"``, ``model.half()``) the default ``eps=1e-8`` rounds to 0 (float16's smallest positive
value is 2**-24, about 6e-8), and the running second moment ``v`` underflows to 0 for small gradient entries
(with ``beta2=0.999``, any below ~5e-3: ``0.001 * g**2`` is below half of 2**-24). The update is then ``m / 0``:
inf or NaN, written into the weights at the first steps (``tests/core/measure/test_numerics.py`` checks this against
torch's Adam). An ``eps`` that float16 can hold but whose reciprocal exceeds float16's maximum (65504) can fail the
same way, when ``m / eps`` overflows. Mixed precision keeps float32 weights and has neither problem; so does
bfloat16, whose range is float32's, and so do torch's fused kernels (``fused=True``), which compute in float32.
Other optimizers that divide by ``eps`` (RMSprop, Adagrad, AdamW, ...) are read the same way: any param group with a
numeric ``eps``.

:func:`eps_hazards` finds these param groups from the optimizers' ``param_groups`` alone (no step, no state): the
guard warns when the fit starts and names the finding in every event about non-finite values, so a run that halts
on it says why instead of blaming the learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EpsHazard:
    """One param group whose ``eps`` the parameters' dtype cannot use as a divisor's floor.

    ``rounds_to``: ``eps`` stored in ``dtype`` (0.0: the division can be by zero); ``limit``: the smallest ``eps``
    whose reciprocal ``dtype`` holds (``1 / finfo(dtype).max``).
    """

    optimizer: int
    group: int
    name: str
    eps: float
    dtype: torch.dtype
    rounds_to: float
    limit: float

    @property
    def advised_eps(self) -> float:
        """The smallest ``eps`` of two significant digits at or above :attr:`limit` (rounded up, not to nearest)."""
        scale = 10.0 ** (math.floor(math.log10(self.limit)) - 1)
        return math.ceil(self.limit / scale) * scale

    def describe(self) -> str:
        where = f"{self.name} (optimizer {self.optimizer}, param group {self.group})"
        kind = str(self.dtype).replace("torch.", "")
        if self.rounds_to == 0.0:
            what = f"eps={self.eps:g} rounds to 0 in {kind}, so where a gradient's second moment underflows to 0 the "
            what += "update divides by zero"
        else:
            what = f"eps={self.eps:g} is below {self.limit:.3g}, so where a gradient's second moment underflows the "
            what += f"update m / eps overflows {kind}"
        return (
            f"{where} keeps {kind} parameters: {what} and writes inf/NaN into the weights; keep float32 weights "
            f"(precision='16-mixed') or use eps >= {self.advised_eps:.2g}"
        )


def _half_dtypes(params: Iterable[torch.Tensor]) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for p in params:
        dt = p.dtype
        if isinstance(p, torch.Tensor) and dt.is_floating_point and torch.finfo(dt).bits <= 16 and dt not in seen:
            seen.append(dt)
    return seen


def eps_hazards(optimizers: Sequence[torch.optim.Optimizer]) -> list[EpsHazard]:
    """The param groups of ``optimizers`` with a numeric ``eps`` that their 16-bit parameters round to 0 or whose
    reciprocal overflows them (see the module docstring). Groups without ``eps`` (SGD), with a non-numeric one
    (Adafactor's pair), with ``fused=True`` (the fused kernels compute in float32) or with 32/64-bit parameters give
    nothing. Never raises: an optimizer it cannot read is
    skipped."""
    found: list[EpsHazard] = []
    for i, opt in enumerate(optimizers):
        try:
            groups = list(opt.param_groups)
        except Exception:  # noqa: BLE001 - an optimizer wrapper without param_groups: nothing to read
            continue
        for j, group in enumerate(groups):
            eps = group.get("eps") if isinstance(group, dict) else None
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
                continue
            if group.get("fused"):  # a fused kernel computes in float32 ("opmath"): the division is not float16's
                continue
            for dt in _half_dtypes(group.get("params", ())):
                info = torch.finfo(dt)
                rounds_to = float(torch.tensor(float(eps), dtype=dt))
                limit = 1.0 / float(info.max)
                if rounds_to == 0.0 or float(eps) < limit:
                    found.append(EpsHazard(i, j, type(opt).__name__, float(eps), dt, rounds_to, limit))
    return found
