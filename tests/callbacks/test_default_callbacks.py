"""default_callbacks: the three callbacks in one call, sharing one gradient measurement per step."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard, default_callbacks
from lightning_gradguard.callbacks._step_context import context_for
from tests.models import TinyRegression, make_trainer


def test_default_order_and_types():
    cbs = default_callbacks()
    assert [type(c) for c in cbs] == [GradientNormMonitor, AdaptiveGradientClipping, NaNGuard]
    assert cbs[1].method == "zscore"
    assert cbs[2].action == "auto"  # the guard's own default policy


def test_options_reach_the_callbacks():
    cbs = default_callbacks(
        monitor=False,
        clipping="percentile",
        guard="skip",
        log_every_n_steps=7,
        clipping_kwargs={"percentile": 90.0},
        guard_kwargs={"lr_factor": 0.25},
    )
    clip, guard = cbs
    assert (clip.method, clip.percentile, clip.log_every_n_steps) == ("percentile", 90.0, 7)
    assert (guard.action, guard.lr_factor, guard.log_every_n_steps) == ("skip", 0.25, 7)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clipping": "zclip"}, ValueError, r"^default_callbacks: `clipping` must be one of .*'zscore'.*got 'zclip'"),
        ({"clipping": 3}, TypeError, r"^default_callbacks: `clipping` must be a str"),
        ({"guard": "retry"}, ValueError, r"`guard` must be one of \('auto', 'rollback', 'skip', 'halt'\)"),
        ({"monitor": False, "clipping": None, "guard": None}, ValueError, "at least one"),
        ({"monitor": "yes"}, TypeError, "`monitor` must be a bool"),
        ({"guard_kwargs": [("lr_factor", 0.5)]}, TypeError, "`guard_kwargs` must be a mapping"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        default_callbacks(**kwargs)


def test_fit_shares_one_measurement_per_step_and_recovers(tmp_path):
    cbs = default_callbacks(
        log_every_n_steps=2, guard_kwargs={"snapshot_every_n_steps": 2, "snapshot_confirm_steps": 1}
    )
    model = TinyRegression(nan_at_steps={7})
    trainer = make_trainer(tmp_path, cbs, max_steps=12)
    trainer.fit(model)
    # one gradient measurement per optimizer step, whatever the number of gradguard callbacks
    assert context_for(trainer).cache.computations == 12
    guard = cbs[2]
    # "auto": an isolated bad batch is skipped, the LR kept
    assert [(e["step"], e["kind"]) for e in guard.events] == [(7, "skip")]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for name in ("grad_norm", "lr", "clip_threshold", "clip_fraction", "skipped_steps", "rollbacks", "lr_scale"):
        assert f"gradguard/{name}" in scalars, name
    assert "gradguard/layer_grad_norms" in acc.Tags()["histograms"]
    lr_scale = [e.value for e in acc.Scalars("gradguard/lr_scale")]
    assert math.isclose(lr_scale[-1], 1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"guard": "halt", "guard_kwargs": {"action": "skip"}}, ValueError, "sets 'action', which `guard`"),
        ({"clipping_kwargs": {"method": "norm"}}, ValueError, "`clipping_kwargs` sets 'method', which `clipping`"),
        ({"guard": None, "guard_kwargs": {"lr_factor": 0.3}}, ValueError, "`guard=None` leaves that callback out"),
        ({"clipping": None, "clipping_kwargs": {"z_threshold": 3.0}}, ValueError, "`clipping=None` leaves"),
        ({"monitor": False, "monitor_kwargs": {"norm_type": 1.0}}, ValueError, "`monitor=False` leaves"),
        ({"monitor_kwargs": {"bogus": 1}}, TypeError, r"`monitor_kwargs` has unknown keys \['bogus'\]; allowed: .*"),
        ({"guard_kwargs": {"lr_factr": 0.3}}, TypeError, r"unknown keys \['lr_factr'\]; .*lr_factor"),
        ({"clipping_kwargs": {"zthreshold": 3}}, TypeError, r"unknown keys \['zthreshold'\]; .*z_threshold"),
    ],
)
def test_conflicting_or_unknown_keyword_arguments_are_refused_by_name(kwargs: dict, error: type, match: str) -> None:
    """One of two settings silently won (``guard="halt"`` with ``guard_kwargs={"action": "skip"}`` gave a skipping
    guard), options of a left-out callback were dropped, and a wrong key gave Python's bare message."""
    with pytest.raises(error, match=match):
        default_callbacks(**kwargs)
