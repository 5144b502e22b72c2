"""Where a fault came from: did the batch hold NaN/inf, and which module's output went non-finite first.

Used only on a fault (never on a healthy step): :func:`nonfinite_in` walks the batch, :func:`first_nonfinite_module`
replays it once with forward hooks on every submodule and names the first one, in execution order, whose output
held a NaN/inf. The replay runs without gradients and with the random number generators restored afterwards, so it
changes neither the run's randomness nor any gradient; buffers it changes (BatchNorm) are the caller's to restore.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def nonfinite_in(obj: Any) -> bool:
    """Whether any floating-point tensor in ``obj`` (nested dicts, lists, tuples) holds NaN/inf.

    Example:
        >>> nonfinite_in({"x": torch.tensor([1.0, float("nan")]), "y": torch.tensor([1])})
        True
    """
    with torch.no_grad():
        return any(t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()) for t in _tensors(obj))


def first_nonfinite_module(module: torch.nn.Module, replay: Callable[[], Any]) -> str | None:
    """Run ``replay()`` (which calls ``module`` on the bad batch) and name the first submodule with a NaN/inf output.

    Returns:
        The qualified name of that module (``"net.2"``), or None when every output stayed finite (the fault then
        came after the modules, e.g. in the loss, or does not reproduce).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(float("inf"))
        >>> first_nonfinite_module(net, lambda: net(torch.ones(1, 2)))
        '0'
    """
    found: list[str] = []
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if not found and nonfinite_in(output):
                found.append(name)

        return hook

    for name, sub in module.named_modules():
        if name:  # the root last: its output is the sum of its children's
            handles.append(sub.register_forward_hook(hook_for(name)))
    handles.append(module.register_forward_hook(hook_for("(whole model)")))
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with torch.no_grad():
            replay()
    except Exception:  # a replay that cannot run is no diagnosis, never a new failure
        return found[0] if found else None
    finally:
        for h in handles:
            h.remove()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return found[0] if found else None
