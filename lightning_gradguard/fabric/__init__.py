"""gradguard in a Lightning Fabric loop: :class:`FabricGradGuard`."""

from lightning_gradguard.fabric.fabric_grad_guard import FabricGradGuard

__all__ = ["FabricGradGuard"]
