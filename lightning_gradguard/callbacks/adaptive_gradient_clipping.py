"""Placeholder: being written in this session."""

from lightning.pytorch.callbacks import Callback

__all__ = ["AdaptiveGradientClipping"]


class AdaptiveGradientClipping(Callback):
    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError("AdaptiveGradientClipping is not written yet")
