"""FabricGradGuard's events (a SummaryWriter, global rank zero only), hand-set LRs and ``fabric.clip_gradients``
under a ``16-mixed`` GradScaler. The wording of its lines against the Trainer's NaNGuard is checked with GradGuard's
in ``tests/plain/test_announce.py``."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision
from torch import nn

from lightning_gradguard import FabricGradGuard
from tests.models import TinyRegression, loader
from tests.plain.test_announce import NAN_AT, _event_line, _fabric_guard, _lines, _Writer
from tests.plain.test_hand_set_lr import _batch, _setup, _Used, schedule


def test_fabric_writes_the_callbacks_tags_to_a_summary_writer(capfd: pytest.CaptureFixture[str]) -> None:
    writer = _Writer()
    guard, _ = _fabric_guard(writer=writer, log_every_n_steps=1)
    line = _event_line(guard, "FabricGradGuard")
    assert writer.texts == [("gradguard/nan_guard_events", line, NAN_AT)]
    assert (NAN_AT, 1.0) in writer.scalars["gradguard/skipped_steps"]
    assert "gradguard/lr_scale" in writer.scalars
    assert _lines(capfd.readouterr().err) == [line]


def test_fabric_announces_on_global_rank_zero_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(Fabric, "global_rank", property(lambda self: 1))
    monkeypatch.setattr(Fabric, "is_global_zero", property(lambda self: False))
    writer = _Writer()
    with caplog.at_level(logging.DEBUG, logger="lightning_gradguard"):
        guard, _ = _fabric_guard(writer=writer)
    assert [e["kind"] for e in guard.events] == ["skip"]  # the same decision on every rank
    assert _lines(capfd.readouterr().err) == []
    assert [r for r in caplog.records if "Guard" in r.getMessage()] == []
    assert writer.texts == []


def test_a_hand_set_lr_keeps_the_cut_in_a_fabric_loop() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model, opt = _setup()
    used = _Used(opt)
    model, fopt = fabric.setup(model, opt)
    guard = FabricGradGuard(
        fabric, model, fopt, action="rollback", lr_factor=0.5, stability=False, divergence=False, clipping=None
    )
    for it in range(12):
        used.it = it
        for j, group in enumerate(fopt.param_groups):
            group["lr"] = schedule(it, j)
        x, y = _batch(it)
        loss = nn.functional.mse_loss(model(x), y)
        if it == 6:
            loss = loss * float("nan")
        fabric.backward(loss)
        guard.before_step(loss)
        fopt.step()
        guard.after_step()
        fopt.zero_grad()
    assert [(e["step"], e["kind"]) for e in guard.events] == [(6, "rollback")]
    assert used.lrs[5] == [schedule(5, j) for j in range(2)]
    for it in range(7, 12):
        assert used.lrs[it] == [schedule(it, j) * 0.5 for j in range(2)]


def test_fabric_clip_gradients_after_before_step_under_a_grad_scaler() -> None:
    """``fabric.clip_gradients`` unscales through the GradScaler; before_step already did: no second unscale, no
    "unscale_() has already been called" error."""
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=MixedPrecision("16-mixed", "cpu", scaler))
    module = TinyRegression()
    model, opt = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.01))
    guard = FabricGradGuard(fabric, model, opt, action="skip", clipping="norm", clipping_options={"max_norm": 1e6})
    assert guard.scaler is scaler
    for x, y in loader():
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)  # scaled by 1024
        assert guard.before_step(loss)
        clipped = fabric.clip_gradients(model, opt, max_norm=1e6)
        assert float(clipped) == pytest.approx(float(guard.last[0].grad_norm), rel=1e-5)  # unscaled once, not twice
        opt.step()
        guard.after_step()
        opt.zero_grad()
    assert guard.events == []
    assert guard.amp_overflow_steps == 0
