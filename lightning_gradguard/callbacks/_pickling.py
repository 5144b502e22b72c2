"""Callbacks that pickle although they hold weak references.

Lightning's ``ddp_spawn`` launcher pickles the Trainer with its callbacks into each new process, and hyperparameter
search tools pickle callbacks too. A weak reference (to the Trainer last seen, to the loggers a layout was written
to) cannot be pickled; it only remembers something the next setup finds again. So it is left out of the pickle: a
``weakref.ref`` comes back as None, a ``WeakSet`` as an empty one.
"""

from __future__ import annotations

import weakref
from typing import Any


class _EmptyWeakSet:
    """Stands in the pickle for a ``weakref.WeakSet`` (which cannot be pickled)."""


class WeakrefsNotPickled:
    """Mixin: ``__getstate__``/``__setstate__`` without the instance's weak references (see the module docstring)."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, weakref.ref):
                state[key] = None
            elif isinstance(value, weakref.WeakSet):
                state[key] = _EmptyWeakSet()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            {key: weakref.WeakSet() if isinstance(value, _EmptyWeakSet) else value for key, value in state.items()}
        )
