"""The deep plain CNN example: architecture options, the digits split, a tiny fit with accuracy against a reference."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_gradguard.examples.deep_cnn import DeepPlainCNN, DigitsDataModule, load_digits_tensors
from tests.models import make_trainer

pytest.importorskip("sklearn")


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_default_is_deep_and_plain():
    model = DeepPlainCNN()
    assert len(_convs(model)) >= 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(getattr(m, "residual", False) for m in model.modules())
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_batch_norm_and_residual_options():
    model = DeepPlainCNN(depth=5, batch_norm=True, residual=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    block = model.features[1]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        nn.init.zeros_(block.conv.weight)
        block.eval()
        # zero conv weights: a residual block passes relu(BN(0) + x); BN in eval of a zero input is its bias (0)
        torch.testing.assert_close(block(x), torch.relu(x))


@pytest.mark.parametrize(("init", "gain2"), [("he", 2.0), ("xavier", 1.0)])
def test_init_options_set_weight_variance(init, gain2):
    torch.manual_seed(0)
    model = DeepPlainCNN(depth=20, channels=32, init=init)
    weights = torch.cat([c.weight.detach().flatten() for c in _convs(model)[1:]])
    fan_in = 32 * 9
    expected = gain2 / fan_in if init == "he" else 2.0 / (2 * fan_in)
    assert float(weights.var()) == pytest.approx(expected, rel=0.05)
    assert all(float(c.bias.detach().abs().max()) == 0 for c in _convs(model))


def test_digits_split_is_disjoint_and_complete():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8)
    assert int(y.max()) == 9
    dm = DigitsDataModule(val_fraction=0.1, seed=0)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797
    assert sizes[1] == sizes[2] == 179
    xtr = dm.train_set.tensors[0]
    assert abs(float(xtr.mean())) < 1e-5
    assert float(xtr.std()) == pytest.approx(1.0, rel=1e-4)


def test_tiny_fit_val_acc_matches_reference(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = DeepPlainCNN(depth=3, channels=8, lr=0.01, optimizer="adam", init="he")
    dm = DigitsDataModule(batch_size=64, seed=0)
    trainer = make_trainer(
        tmp_path, [], max_steps=30, logger=False, val_check_interval=30, check_val_every_n_epoch=None
    )
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert "train_loss_step" in metrics
    assert "val_acc" in metrics
    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        ref = float((model(x).argmax(dim=1) == y).float().mean())
    assert float(metrics["val_acc"]) == pytest.approx(ref, abs=1e-6)
    assert ref > 0.2  # 30 Adam steps on a 3-layer CNN already beat chance (0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"depth": 1}, "depth"), ({"optimizer": "lbfgs"}, "optimizer"), ({"init": "x"}, "init")]
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepPlainCNN(**kwargs)
