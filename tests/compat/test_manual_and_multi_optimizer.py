"""The three callbacks with manual optimization (one optimizer; two optimizers GAN-style) and with one optimizer
holding two parameter groups. Lightning 2.x refuses several optimizers in automatic mode (checked below), so
"two optimizers" means manual optimization.

What this proves: each optimizer gets its own statistics and tags (``_opt1``); a NaN in one optimizer's loss rolls
both optimizers (and the model) back to the snapshot bit for bit with the LR cut in every optimizer and param group.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from tests.compat.common import StateRecorder, assert_restored, seeded, split, tb_scalars
from tests.models import TinyRegression, loader, make_trainer


class GAN(LightningModule):
    """Two nets, two optimizers, manual optimization; ``nan_b_at`` puts a NaN into the second loss at that batch."""

    def __init__(self, nan_b_at: int | None = None, spike_a_at: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        self.disc = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
        self.nan_b_at, self.spike_a_at = nan_b_at, spike_a_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        loss_g = nn.functional.mse_loss(self.gen(x), y)
        if batch_idx == self.spike_a_at:
            loss_g = loss_g * 1e4
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        loss_d = nn.functional.mse_loss(self.disc(x), y) * 10.0
        if batch_idx == self.nan_b_at:
            loss_d = loss_d * float("nan")
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), lr=0.01), torch.optim.Adam(self.disc.parameters(), lr=0.02)

    def train_dataloader(self):
        return loader()


def test_gan_style_two_optimizers(tmp_path, all_callbacks):
    callbacks = all_callbacks(guard={"snapshot_every_n_steps": 1})
    mon, clip, guard = split(callbacks)
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [*callbacks, rec], max_steps=16)  # 8 batches x 2 optimizer steps
    model = seeded(GAN, nan_b_at=5, spike_a_at=6)
    trainer.fit(model)
    assert trainer.global_step == 16
    # batch 5 = global steps 10 (gen) and 11 (disc, NaN): one event, both optimizers restored
    assert [(e["step"], e["kind"], e["cause"]) for e in guard.events] == [(11, "rollback", "nonfinite_loss")]
    snap_step = guard.events[0]["snapshot_step"]
    assert snap_step == 10  # the state after batch 4 (global_step counts both optimizers)
    assert_restored(rec.states[12], rec.states[snap_step], lr_ratio=0.5)
    assert [g["lr"] for o in trainer.optimizers for g in o.param_groups] == [0.005, 0.01]
    # separate statistics per optimizer, the spike of the first clipped against its own threshold
    state = clip.state_dict()["optimizers"]
    assert set(state) == {0, 1}
    assert state[0]["steps"] == state[1]["steps"] == 8
    tb = tb_scalars(tmp_path / "run" / "version_0")
    for name in ("clip_threshold", "grad_norm_clipped"):
        assert f"gradguard/{name}" in tb
        assert f"gradguard/{name}_opt1" in tb
    assert tb["gradguard/grad_norm_clipped"][12] <= tb["gradguard/clip_threshold"][12] * (1 + 1e-5)
    assert "gradguard/grad_norm" in tb
    assert "gradguard/grad_norm_opt1" in tb
    assert mon.state_dict()["optimizers"].keys() == {0, 1}
    assert all(torch.isfinite(p).all() for p in model.parameters())


class ManualOne(TinyRegression):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_single_optimizer(tmp_path, all_callbacks):
    callbacks = all_callbacks(guard={"snapshot_every_n_steps": 1})
    mon, clip, guard = split(callbacks)
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [*callbacks, rec], max_steps=8)
    trainer.fit(seeded(ManualOne, nan_at_steps=[4]))
    assert [(e["step"], e["kind"], e["snapshot_step"]) for e in guard.events] == [(4, "rollback", 4)]
    assert_restored(rec.states[5], rec.states[4], lr_ratio=0.5)
    assert clip.state_dict()["optimizers"][0]["steps"] == 8


class TwoGroups(TinyRegression):
    def configure_optimizers(self):
        first, rest = self.net[0].parameters(), [p for m in list(self.net)[1:] for p in m.parameters()]
        opt = torch.optim.Adam([{"params": first, "lr": 0.01}, {"params": rest, "lr": 0.001}])
        sch = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}


def test_one_optimizer_two_param_groups(tmp_path, all_callbacks):
    callbacks = all_callbacks(guard={"snapshot_every_n_steps": 1})
    _, _, guard = split(callbacks)
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [*callbacks, rec], max_steps=8)
    trainer.fit(seeded(TwoGroups, nan_at_steps=[5]))
    assert [(e["step"], e["kind"]) for e in guard.events] == [(5, "rollback")]
    assert_restored(rec.states[6], rec.states[5], lr_ratio=0.5)
    # StepLR: restored to 5 scheduler steps, then 2 more: 0.5**(7 // 2), times the 0.5 cut
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([0.01 * 0.5**4, 0.001 * 0.5**4])


def test_two_optimizers_in_automatic_mode_are_refused_by_lightning(tmp_path, all_callbacks):
    class TwoAuto(TinyRegression):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    trainer = make_trainer(tmp_path, all_callbacks(), max_steps=2)
    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual optimization"):
        trainer.fit(TwoAuto())
