"""No silent death (issue 24): a network killed by an exploding initialisation gets an event saying so.

A deep plain CNN (20 convolutions, no normalisation) whose He-initialised weights are scaled by 1.25 explodes at
initialisation: its first loss is 15-100 where chance is 2.3. Unguarded, with SGD and momentum, its ReLUs die within
~20 steps and it sits at chance for ever. ``NaNGuard`` alone has no clipper to prevent that, but it must say what
happened: a ``dead_network`` warning within a few windows, with the numbers.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_gradguard import NaNGuard
from lightning_gradguard.examples.deep_cnn import DeepPlainCNN, DigitsDataModule


def exploding_cnn(seed: int, gain: float = 1.25) -> DeepPlainCNN:
    pl.seed_everything(seed, verbose=False)
    model = DeepPlainCNN(depth=20, channels=16, lr=0.01, optimizer="sgd", init="he")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(gain)
    return model


@pytest.mark.slow
def test_a_network_killed_by_its_initialisation_is_reported_dead(tmp_path):
    guard = NaNGuard()
    model = exploding_cnn(seed=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=160,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, seed=0))
    dead = [e for e in guard.events if e["cause"] == "dead_network"]
    assert dead, guard.events
    event = dead[0]
    assert event["kind"] == "warn"
    assert event["step"] <= 120  # within a few windows of the death (~step 20)
    assert "the network looks dead" in event["reason"]
    assert "gradient norm collapsed" in event["reason"]
    assert guard.lr_scale == 1.0  # a warning changes nothing
