"""The adding-problem LSTM example: data against an independent reference, a tiny fit, options and validation."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_gradguard.examples.lstm import BASELINE_MSE, AddingProblemDataModule, AddingProblemLSTM, adding_problem
from tests.models import make_trainer


def test_adding_problem_data_matches_definition():
    x, y = adding_problem(500, 20, torch.Generator().manual_seed(3))
    assert x.shape == (500, 20, 2)
    assert y.shape == (500, 1)
    xs, ys = x.numpy(), y.numpy()[:, 0]
    markers = xs[:, :, 1]
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert (markers.sum(axis=1) == 2).all()
    assert (markers[:, :10].sum(axis=1) == 1).all()
    assert (markers[:, 10:].sum(axis=1) == 1).all()
    expected = np.array([xs[i, markers[i] == 1, 0].sum() for i in range(500)])
    np.testing.assert_allclose(ys, expected, rtol=1e-6)
    assert ((xs[:, :, 0] >= 0) & (xs[:, :, 0] < 1)).all()


def test_constant_one_baseline_is_one_sixth():
    _, y = adding_problem(100_000, 10, torch.Generator().manual_seed(0))
    mse = float(((y - 1.0) ** 2).mean())
    assert mse == pytest.approx(BASELINE_MSE, abs=0.005)


def test_datamodule_is_seeded_and_splits_differ():
    a, b = (
        AddingProblemDataModule(seq_len=8, num_train=64, num_val=16, seed=1),
        AddingProblemDataModule(seq_len=8, num_train=64, num_val=16, seed=1),
    )
    a.setup("fit")
    b.setup("fit")
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], a.test_set.tensors[0])
    first_a = next(iter(a.train_dataloader()))[0]
    first_b = next(iter(b.train_dataloader()))[0]
    assert torch.equal(first_a, first_b)


def test_tiny_fit_logs_train_loss_and_val_mse_matching_reference(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = AddingProblemLSTM(hidden_size=8, lr=0.01, optimizer="adam")
    dm = AddingProblemDataModule(seq_len=6, num_train=64, num_val=32, batch_size=16, seed=0)
    trainer = make_trainer(tmp_path, [], max_steps=-1, max_epochs=2, logger=False)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    for key in ("train_loss_step", "train_loss_epoch", "val_mse"):
        assert key in metrics, key
    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        ref = float(((model(x) - y) ** 2).mean())
    assert float(metrics["val_mse"]) == pytest.approx(ref, rel=1e-5)
    out = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(model, dm, verbose=False)
    xt, yt = dm.test_set.tensors
    with torch.no_grad():
        assert out[0]["test_mse"] == pytest.approx(float(((model(xt) - yt) ** 2).mean()), rel=1e-5)


def test_head_bias_starts_at_target_mean():
    model = AddingProblemLSTM()
    assert torch.all(model.head.bias == 1.0)


@pytest.mark.parametrize("init", ["orthogonal", "xavier"])
def test_orthogonal_recurrent_init(init):
    model = AddingProblemLSTM(hidden_size=6, init=init)
    for chunk in model.rnn.weight_hh_l0.detach().chunk(4, dim=0):
        torch.testing.assert_close(chunk @ chunk.T, torch.eye(6), atol=1e-5, rtol=0)
    assert torch.all(model.rnn.bias_ih_l0 == 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"init": "he"}, "init"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_model_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AddingProblemLSTM(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [({"seq_len": 1}, "seq_len"), ({"batch_size": 0}, "batch_size")])
def test_datamodule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AddingProblemDataModule(**kwargs)
