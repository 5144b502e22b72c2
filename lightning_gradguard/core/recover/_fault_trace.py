"""Where a fault came from: did the batch hold NaN/inf, and which module *produced* the first non-finite value.

Used only on a fault (never on a healthy step): :func:`nonfinite_in` walks the batch, :func:`trace_fault` replays it
once with forward hooks on every submodule that see each call's inputs and outputs. The replay runs without gradients
and with the random number generators restored afterwards, so it changes neither the run's randomness nor any
gradient; buffers it changes (BatchNorm) are the caller's to restore.

Producer, not propagator (pytorch/pytorch#182156 asks for this of a NaN tracer): a module whose *input* already held
the NaN only passed it on. The producer is the first call, in the order calls finish (innermost modules first), whose
output holds a NaN while its inputs hold none. Infinities are judged by what happens to them, since some are
legitimate (an attention mask of ``-inf`` that a softmax turns into zeros; ``log(0)`` masked out later): an infinite
output is only a producer when no later call takes that very tensor and returns finite values (it was absorbed).
A NaN is never legitimate. A batch that held NaN/inf itself has no producing module: the data did it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_gradguard.core.recover._untouched import left_as_found


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
        return any(
            (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all())
            for t in _tensors(obj)
        )


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


@dataclass
class FaultTrace:
    """What a replay of a flagged batch found.

    Attributes:
        producer: the qualified name of the module that produced the fault's first NaN (or unabsorbed inf) from
            finite inputs, ``"(whole model)"`` when only the root's own code did; None when no module did (the
            batch held it, the loss function made it, or the fault does not reproduce).
        kind: ``"nan"`` or ``"inf"``: what the producer produced (None without one).
        first_nonfinite: the first module whose output held NaN/inf (a producer or a propagator).
        reproduced: whether any output of the replay was non-finite.
    """

    producer: str | None = None
    kind: str | None = None
    first_nonfinite: str | None = None
    reproduced: bool = False


def _flags(obj: Any) -> tuple[bool, bool]:
    """(holds a NaN, holds an inf) over the floating-point tensors of ``obj``."""
    nan = inf = False
    for t in _tensors(obj):
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            nan = nan or bool(torch.isnan(t).any())
            inf = inf or bool(torch.isinf(t).any())
    return nan, inf


def trace_fault(module: torch.nn.Module, replay: Callable[[], Any]) -> FaultTrace:
    """Run ``replay()`` (which calls ``module`` on the flagged batch) and find the producer of the fault.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = net[2].weight.fill_(float("nan"))
        >>> trace = trace_fault(net, lambda: net(torch.ones(1, 2)))
        >>> trace.producer, trace.kind, trace.first_nonfinite
        ('2', 'nan', '2')
        >>> trace_fault(net, lambda: net(torch.full((1, 2), float("nan")))).producer is None  # the data did it
        True
    """
    trace = FaultTrace()
    origin: dict[int, str | None] = {}  # id of an infinite output -> the call that made it from finite inputs
    absorbed: set[str | None] = set()  # origins whose infinities a later call turned into finite outputs
    inf_made: list[tuple[str, str | None]] = []  # (call, origin) of calls whose output held an inf
    keep: list[Any] = []  # infinite outputs stay alive during the replay, so their ids are not reused

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            in_nan, in_inf = _flags((args, kwargs))
            out_nan, out_inf = _flags(output)
            sources = [origin[id(t)] for t in _tensors((args, kwargs)) if id(t) in origin] if in_inf else []
            if trace.first_nonfinite is None and (out_nan or out_inf):
                trace.first_nonfinite, trace.reproduced = name, True
            if in_inf and not (out_nan or out_inf):
                absorbed.update(sources)  # e.g. a softmax over a -inf mask: those infinities were meant
            if out_nan and not in_nan and trace.kind != "nan":
                # a NaN from finite inputs, or from an infinity another module made (inf - inf): that one is the cause
                trace.producer, trace.kind = (sources[0] if sources and sources[0] else name), "nan"
            if out_inf:
                made_here = not (in_nan or in_inf)
                source = name if made_here else (sources[0] if sources else None)
                keep.append(output)
                origin.update((id(t), source) for t in _tensors(output))
                if made_here:
                    inf_made.append((name, source))

        return hook

    handles = []
    for name, sub in module.named_modules():
        if name:  # the root last: its output is the sum of its children's
            handles.append(sub.register_forward_hook(hook_for(name), with_kwargs=True))
    handles.append(module.register_forward_hook(hook_for("(whole model)"), with_kwargs=True))
    try:
        with left_as_found(module), torch.no_grad():  # the replay leaves no trace (random numbers, the step's effects)
            replay()
    except Exception:  # a replay that cannot run is no diagnosis, never a new failure
        pass
    finally:
        for h in handles:
            h.remove()
    if trace.producer is None:  # no NaN: the first module whose infinities no later call absorbed
        for name, source in inf_made:
            if source not in absorbed:
                trace.producer, trace.kind = name, "inf"
                break
    return trace
