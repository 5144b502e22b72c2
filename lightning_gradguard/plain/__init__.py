"""gradguard for plain PyTorch loops: :class:`GradGuard` (no Lightning needed)."""

from lightning_gradguard.plain.grad_guard import GradGuard

__all__ = ["GradGuard"]
