"""Placeholder: being written in this session."""

from lightning.pytorch.callbacks import Callback

__all__ = ["GradientNormMonitor"]


class GradientNormMonitor(Callback):
    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError("GradientNormMonitor is not written yet")
