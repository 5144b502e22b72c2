"""Which strategies and parameters the callbacks accept at setup, and the messages of what they refuse."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn

from lightning_gradguard import NaNGuard
from lightning_gradguard.callbacks._strategy_support import check_parameters, check_supported_strategy
from tests.compat.common import build_all
from tests.models import TinyRegression, make_trainer


class DeepSpeedLike(DDPStrategy):  # Lightning's DeepSpeedStrategy subclasses DDPStrategy; deepspeed is not installed
    pass


DeepSpeedLike.__name__ = "DeepSpeedStrategy"


def test_fsdp1_refused_with_the_reason_and_what_is_supported():
    trainer = SimpleNamespace(strategy=FSDPStrategy())  # FSDP1 cannot be built into a CPU Trainer
    with pytest.raises(RuntimeError, match=r"NaNGuard does not support FSDPStrategy: FSDP1 .*fully_shard.*Supported:"):
        check_supported_strategy(trainer, "NaNGuard")


def test_deepspeed_refused_although_it_is_a_ddp_subclass():
    with pytest.raises(RuntimeError, match=r"does not support DeepSpeedStrategy: DeepSpeed's engine owns"):
        check_supported_strategy(SimpleNamespace(strategy=DeepSpeedLike()), "AdaptiveGradientClipping")


@pytest.mark.parametrize(
    "strategy",
    [SingleDeviceStrategy("cpu"), DDPStrategy(), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)],
)
def test_supported_strategies_pass(strategy):
    check_supported_strategy(SimpleNamespace(strategy=strategy), "GradientNormMonitor")


class _Sparse(nn.Module):
    def __init__(self, cls=nn.Embedding, **kw):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 2), cls(10, 3, sparse=True, **kw))


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_sparse_parameter_refused_by_name(cls):
    with pytest.raises(ValueError, match=r"GradientNormMonitor: parameter 'body.1.weight' gets sparse gradients"):
        check_parameters(_Sparse(cls), "GradientNormMonitor")
    trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), lightning_module=_Sparse(cls))
    with pytest.raises(ValueError, match="Allowed: sparse=False"):
        check_supported_strategy(trainer, "NaNGuard")


def test_dense_and_complex_parameters_pass():
    m = nn.Sequential(nn.Linear(2, 2), nn.Embedding(4, 2))
    m.register_parameter("z", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    check_parameters(m, "NaNGuard")


class _SparseModel(TinyRegression):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 8, sparse=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x + self.emb(torch.zeros(len(x), dtype=torch.long))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_sparse_embedding_refused_at_setup_before_any_step(tmp_path, which):
    cb = build_all()[which]
    model = _SparseModel()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, [cb], max_steps=3, logger=False)
    with pytest.raises(ValueError, match=r"parameter 'emb.weight' gets sparse gradients"):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _OutsideTensorModel(TinyRegression):
    """An optimizer over the module's parameters and a plain tensor the module does not register."""

    def __init__(self):
        super().__init__()
        self.scale = torch.ones(1, requires_grad=True)  # not an nn.Parameter: not in state_dict, not in a snapshot

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x) * self.scale, y)

    def configure_optimizers(self):
        return torch.optim.SGD([*self.parameters(), self.scale], lr=0.01)


def test_an_optimizer_over_a_tensor_outside_the_module_is_refused_before_any_step(tmp_path):
    """A rollback could not restore ``scale``: refused at the start of the fit, naming the optimizer and the shape."""
    model = _OutsideTensorModel()
    trainer = make_trainer(tmp_path, [NaNGuard()], max_steps=3, logger=False)
    with pytest.raises(ValueError, match=r"NaNGuard: the optimizer \(SGD\) updates 1 tensor\(s\) .*shapes \(1,\)"):
        trainer.fit(model)
    assert trainer.global_step == 0
