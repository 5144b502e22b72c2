"""Incompatible combinations fail at setup (before any training step) with a message that says what to change.

Covers: Trainer(gradient_clip_val>0) with AdaptiveGradientClipping (0 = off is accepted); two
AdaptiveGradientClipping or two NaNGuard callbacks; NaNGuard(snapshot="checkpoint") without a ModelCheckpoint or
with weights-only checkpoints; anomaly detection with NaNGuard; FSDP1 and DeepSpeed strategies
refused by each of the three callbacks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard
from tests.compat.common import seeded
from tests.models import make_trainer


class NoStep(Callback):
    """Fails the test if a training batch starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise AssertionError("a training step ran before the configuration error")


def _fit_fails(tmp_path, callbacks, match, error=ValueError, **kwargs):
    trainer = make_trainer(tmp_path, [*callbacks, NoStep()], max_steps=3, **kwargs)
    with pytest.raises(error, match=match):
        trainer.fit(seeded())
    assert trainer.global_step == 0


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_trainer_gradient_clipping_is_refused(tmp_path, all_callbacks, algorithm):
    _fit_fails(
        tmp_path,
        all_callbacks(),
        r"cannot run together with Trainer\(gradient_clip_val=0.5\): remove gradient_clip_val",
        gradient_clip_val=0.5,
        gradient_clip_algorithm=algorithm,
    )


def test_gradient_clip_val_zero_means_off_and_is_accepted(tmp_path, all_callbacks):
    trainer = make_trainer(tmp_path, all_callbacks(), max_steps=3, gradient_clip_val=0.0)
    trainer.fit(seeded())
    assert trainer.global_step == 3


def test_two_clippers_are_refused(tmp_path, all_callbacks):
    extra = AdaptiveGradientClipping("norm", max_norm=1.0)
    _fit_fails(tmp_path, [*all_callbacks(), extra], r"Found 2 AdaptiveGradientClipping callbacks \('zscore', 'norm'\)")


def test_two_guards_are_refused(tmp_path, all_callbacks):
    extra = NaNGuard(action="skip")
    _fit_fails(tmp_path, [*all_callbacks(), extra], r"Found 2 NaNGuard callbacks; use one")


def test_two_monitors_are_refused(tmp_path, all_callbacks):
    _fit_fails(tmp_path, [*all_callbacks(), GradientNormMonitor()], r"Found 2 GradientNormMonitor callbacks; use one")


def test_checkpoint_snapshots_need_a_full_modelcheckpoint(tmp_path, all_callbacks):
    guard = {"snapshot": "checkpoint"}
    _fit_fails(tmp_path / "a", all_callbacks(guard=guard), "the Trainer has no ModelCheckpoint callback")
    weights_only = ModelCheckpoint(dirpath=tmp_path / "w", save_weights_only=True, every_n_train_steps=1)
    _fit_fails(
        tmp_path / "b",
        [*all_callbacks(guard=guard), weights_only],
        "every ModelCheckpoint has save_weights_only=True",
        enable_checkpointing=True,
    )
    # Lightning's default ModelCheckpoint (enable_checkpointing=True) is enough
    trainer = make_trainer(tmp_path / "c", all_callbacks(guard=guard), max_steps=3, enable_checkpointing=True)
    trainer.fit(seeded())
    assert trainer.global_step == 3


def test_anomaly_detection_is_refused_with_the_guard(tmp_path, all_callbacks):
    _fit_fails(tmp_path, all_callbacks(), r"NaNGuard cannot act with anomaly detection on", detect_anomaly=True)


def _deepspeed_without_deepspeed():
    # DeepSpeedStrategy() needs the deepspeed package (absent here); the check only looks at the strategy's type
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


@pytest.mark.parametrize("make_strategy", [FSDPStrategy, _deepspeed_without_deepspeed], ids=["fsdp1", "ds"])
@pytest.mark.parametrize("cls", [GradientNormMonitor, AdaptiveGradientClipping, NaNGuard])
def test_sharded_strategies_are_refused_by_each_callback(cls, make_strategy):
    # ModelParallelStrategy (FSDP2 / tensor parallel) is supported: tests/compat/test_fsdp.py
    strategy = make_strategy()
    callback = cls()
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback], gradient_clip_val=None, log_every_n_steps=50)
    with pytest.raises(RuntimeError, match=rf"{cls.__name__} does not support {type(strategy).__name__}: .*ddp"):
        callback.setup(trainer, None, "fit")


def test_fsdp_on_cpu_is_refused_by_lightning_itself():
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        Trainer(strategy="fsdp", accelerator="cpu", devices=1)


def test_anomaly_detection_is_refused_in_setup_before_the_fit_starts(tmp_path):
    """The refusal came in on_train_start, after the sanity validation had run; the README says setup."""

    class Started(Callback):
        started = False

        def on_fit_start(self, trainer, pl_module):
            Started.started = True

    trainer = make_trainer(tmp_path, [NaNGuard(), Started()], max_steps=3, detect_anomaly=True)
    with pytest.raises(ValueError, match=r"NaNGuard cannot act with anomaly detection on"):
        trainer.fit(seeded())
    assert not Started.started
