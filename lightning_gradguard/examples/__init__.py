"""Example models that show exploding gradients and their cures.

- :mod:`lightning_gradguard.examples.lstm`: an LSTM on the adding problem (:class:`AddingProblemLSTM`,
  :class:`AddingProblemDataModule`).
- :mod:`lightning_gradguard.examples.deep_cnn`: a deep plain CNN on scikit-learn's digits (:class:`DeepPlainCNN`,
  :class:`DigitsDataModule`).

They live inside the package so that the installed ``gradguard demo`` command can run them; the scripts in the
repository's ``examples/`` folder expose them through LightningCLI. Importing this package does not import
lightning; the names below are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from lightning_gradguard.examples.deep_cnn import DeepPlainCNN, DigitsDataModule
    from lightning_gradguard.examples.lstm import AddingProblemDataModule, AddingProblemLSTM

_LAZY = {
    "AddingProblemLSTM": "lightning_gradguard.examples.lstm",
    "AddingProblemDataModule": "lightning_gradguard.examples.lstm",
    "DeepPlainCNN": "lightning_gradguard.examples.deep_cnn",
    "DigitsDataModule": "lightning_gradguard.examples.deep_cnn",
}

__all__ = ["AddingProblemDataModule", "AddingProblemLSTM", "DeepPlainCNN", "DigitsDataModule"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard.examples' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
