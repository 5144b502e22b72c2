"""GradGuard's overview figure and the last values at an event (issue 26), through its own ``SummaryWriter``."""

from __future__ import annotations

import math
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import DivergenceError, GradGuard
from lightning_gradguard.overview import OVERVIEW_TAG
from tests.plain.test_grad_guard import _setup, _step


def _run(tmp_path: Any, bad: set[int], steps: int, **kwargs: Any) -> tuple[GradGuard, EventAccumulator]:
    model, opt, sched = _setup()
    writer = SummaryWriter(str(tmp_path))
    guard = GradGuard(model, opt, sched, writer=writer, log_every_n_steps=50, **kwargs)
    try:
        for step in range(steps):
            _step(model, opt, sched, guard, step, nan=step in bad)
    finally:
        guard.close()
        writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return guard, acc


def test_overview_at_each_event_and_at_close(tmp_path):
    guard, acc = _run(tmp_path, {5, 12}, 20, action="skip")
    assert [(e["step"], e["kind"]) for e in guard.events] == [(5, "skip"), (12, "skip")]
    images = acc.Images(OVERVIEW_TAG)
    assert [e.step for e in images] == [5, 12, 20]
    assert all((e.width, e.height) == (800, 600) for e in images)
    lr = {e.step: e.value for e in acc.Scalars("gradguard/lr")}
    assert {0, 5, 12} <= set(lr)  # logged every 50 steps, yet the LR chart reaches every event
    norm = {e.step: e.value for e in acc.Scalars("gradguard/grad_norm")}
    assert math.isnan(norm[5])  # the event step's own (judged) norm


def test_a_healthy_loop_draws_only_at_close(tmp_path):
    guard, acc = _run(tmp_path, set(), 8)
    assert guard.events == []
    assert [e.step for e in acc.Images(OVERVIEW_TAG)] == [8]


def test_a_halt_writes_every_tag_at_its_step(tmp_path):
    with pytest.raises(DivergenceError):
        _run(tmp_path, {9}, 20, action="halt")
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for t in acc.Tags()["scalars"]:
        assert any(8 <= e.step <= 10 for e in acc.Scalars(t)), t
    assert 9 in [e.step for e in acc.Images(OVERVIEW_TAG)]
