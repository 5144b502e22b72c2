"""Sharded strategies are refused plainly; single-device and DDP pass."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_gradguard.callbacks.strategy_support import check_supported_strategy


def test_fsdp_refused_with_what_is_supported():
    trainer = SimpleNamespace(strategy=FSDPStrategy())  # FSDP cannot be built into a CPU Trainer
    with pytest.raises(RuntimeError, match=r"NaNGuard does not support FSDPStrategy.*Supported: single-device and DDP"):
        check_supported_strategy(trainer, "NaNGuard")


@pytest.mark.parametrize("strategy", [SingleDeviceStrategy("cpu"), DDPStrategy()])
def test_supported_strategies_pass(strategy):
    check_supported_strategy(SimpleNamespace(strategy=strategy), "GradientNormMonitor")
