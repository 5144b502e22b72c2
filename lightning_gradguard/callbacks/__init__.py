"""Thin Lightning callbacks over :mod:`lightning_gradguard.core`."""

from lightning_gradguard.callbacks.adaptive_gradient_clipping import AdaptiveGradientClipping
from lightning_gradguard.callbacks.gradient_norm_monitor import GradientNormMonitor
from lightning_gradguard.callbacks.nan_guard import NaNGuard

__all__ = ["AdaptiveGradientClipping", "GradientNormMonitor", "NaNGuard"]
