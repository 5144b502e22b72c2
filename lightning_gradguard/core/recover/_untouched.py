"""Leaving a module as it was found, around a call of user code the guard makes for itself.

The guard calls the user's ``training_step`` (or loss closure) for its own checks: the rerun of a flagged step, the
test of a finding before it acts, the replay that names the module that produced a NaN. Those calls must leave no
trace: a run the guard only checked must continue exactly as without the check. :func:`left_as_found` puts back
the module's parameters and buffers, the Python-side state of its submodules (:class:`ModuleAttributes`) and the
random-number states (:class:`RngState`: torch's CPU and CUDA generators, Python's ``random``, NumPy's global one).
Pure PyTorch.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RngState:
    """The random-number state a step started from (CPU generator, and every CUDA device's once CUDA is up); with
    ``host=True`` also Python's ``random`` and NumPy's global generator (what a ``training_step`` may draw from:
    an epsilon-greedy policy, an augmentation), captured around a rerun only, not at every step."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    py: Any = None
    np: Any = None

    @classmethod
    def capture(cls, host: bool = False) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        if not host:
            return cls(torch.get_rng_state(), cuda)
        np_random = _numpy_random()
        return cls(
            torch.get_rng_state(), cuda, random.getstate(), np_random.get_state() if np_random is not None else None
        )

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.py is not None:
            random.setstate(self.py)
        if self.np is not None:
            np_random = _numpy_random()
            if np_random is not None:
                np_random.set_state(self.np)


def _numpy_random() -> Any:
    """``numpy.random`` when NumPy is already imported (the user's code could only draw from it then)."""
    np = sys.modules.get("numpy")
    return getattr(np, "random", None) if np is not None else None


#: the ``nn.Module`` attributes that hold parameters, buffers and submodules (restored through the state dict)
_MODULE_SLOTS = frozenset(("_parameters", "_buffers", "_modules"))
#: a plain tensor attribute larger than this is not copied before a rerun (bytes)
_TENSOR_COPY_LIMIT = 64 * 2**20


class ModuleAttributes:
    """The Python-side state of every submodule, put back after a rerun of user code.

    A ``training_step`` may change more than parameters and buffers: a step counter (``self.n += 1``), a queue
    kept as a plain tensor attribute, a replay buffer in a list or deque, a ``torch.Generator`` it draws noise from,
    a torchmetrics metric's accumulated state. A rerun must leave all of that as it found it, or a healthy run that
    the guard only checked would still be changed. Saved: every attribute's binding; the contents of lists, dicts,
    sets and deques; a copy of plain tensors (up to 64 MiB each; restored only when modified in place, by their
    version counter); the state of generators (``torch.Generator``, ``random.Random``, NumPy's). Put back: bindings
    the rerun changed, attributes it added are removed, contents it changed are restored in place (the objects keep
    their identity). Not covered: objects outside the module (an environment the step advances, a file it writes).
    """

    def __init__(self, module: nn.Module) -> None:
        self._saved: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
        for sub in module.modules():
            d = sub.__dict__
            bindings = {k: v for k, v in d.items() if k not in _MODULE_SLOTS}
            contents = {}
            for k, v in bindings.items():
                saved = _save_contents(v)
                if saved is not None:
                    contents[k] = saved
            self._saved.append((d, bindings, contents))

    def restore(self) -> None:
        for d, bindings, contents in self._saved:
            for k in [k for k in d if k not in bindings and k not in _MODULE_SLOTS]:
                del d[k]
            for k, v in bindings.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v
            for k, saved in contents.items():
                _restore_contents(bindings[k], saved)


_MISSING = object()


def _save_contents(v: Any) -> Any:
    """What :func:`_restore_contents` needs to put ``v``'s contents back (None: nothing to save)."""
    if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
        try:
            copy = v.detach().clone() if v.numel() * v.element_size() <= _TENSOR_COPY_LIMIT else None
            return ("tensor", v._version, copy)
        except Exception:  # an inference tensor, a tensor subclass that cannot be copied: left alone
            return None
    if isinstance(v, torch.Generator):
        return ("generator", v.get_state())
    if isinstance(v, random.Random):
        return ("random", v.getstate())
    if isinstance(v, (list, deque)):
        return ("sequence", list(v))
    if isinstance(v, dict):
        return ("dict", dict(v))
    if isinstance(v, set):
        return ("set", set(v))
    kind = type(v).__name__
    if kind == "RandomState" and callable(getattr(v, "get_state", None)):  # numpy.random.RandomState
        return ("np_legacy", v.get_state())
    if kind == "Generator" and hasattr(v, "bit_generator"):  # numpy.random.Generator
        return ("np_generator", v.bit_generator.state)
    return None


def _restore_contents(v: Any, saved: Any) -> None:
    kind = saved[0]
    if kind == "tensor":
        if saved[2] is not None and v._version != saved[1]:
            with torch.no_grad():
                v.copy_(saved[2])
    elif kind == "generator":
        v.set_state(saved[1])
    elif kind == "random":
        v.setstate(saved[1])
    elif kind == "np_legacy":
        v.set_state(saved[1])
    elif kind == "np_generator":
        v.bit_generator.state = saved[1]
    elif kind == "sequence":
        items = saved[1]
        if len(v) != len(items) or any(a is not b for a, b in zip(v, items)):
            v.clear()
            v.extend(items)
    elif kind == "dict":
        items = saved[1]
        if v.keys() != items.keys() or any(v[k] is not items[k] for k in items):
            v.clear()
            v.update(items)
    elif kind == "set" and v != saved[1]:
        v.clear()
        v.update(saved[1])


@contextlib.contextmanager
def left_as_found(module: nn.Module) -> Iterator[None]:
    """Run the block, then put ``module`` back as it was (state dict, Python attributes) and the random-number
    states (torch's, Python's, NumPy's) where they were."""
    rng = RngState.capture(host=True)
    attributes, state = None, None
    try:
        attributes = ModuleAttributes(module)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        yield
    finally:
        if state is not None:
            module.load_state_dict(state)
        if attributes is not None:
            attributes.restore()
        rng.restore()


def nonfinite_attributes(module: nn.Module) -> list[str]:
    """Qualified names of floating tensors kept as plain attributes of ``module``'s submodules, alone or in a tuple or
    list (an LSTM's ``(h, c)``), not parameters or buffers (no state dict or snapshot holds them), that hold NaN.
    Infinities alone do not count: a plain attribute that holds -inf is usually an additive attention mask cached by
    the forward, by design; a state spoiled by a fault carries NaN (NaN propagates; inf - inf is NaN)."""
    found = []
    for prefix, sub in module.named_modules():
        for key, value in sub.__dict__.items():
            if key in _MODULE_SLOTS or isinstance(value, nn.Parameter):
                continue
            items = value if isinstance(value, (tuple, list)) and len(value) <= 16 else (value,)
            if any(_nonfinite_tensor(v) for v in items):
                found.append(f"{prefix}.{key}" if prefix else key)
    return found


def _nonfinite_tensor(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or isinstance(value, nn.Parameter) or not value.is_floating_point():
        return False
    try:
        return bool(torch.isnan(value.detach()).any())
    except Exception:  # a tensor that cannot be read here (meta, a subclass): not known to be bad
        return False
