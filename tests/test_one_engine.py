"""One guard engine behind every adapter: the same scenario through ``NaNGuard`` (a Trainer) and ``GradGuard`` (a
plain loop) gives the same outcomes, events, event text, logged tags and warnings.

Each test names the drift of issue 23 it pins (the two copies of the orchestration had drifted six ways):
1. a rollback with no snapshot: a skip (finite weights) on both, the rollback budget untouched;
2. ``clip_threshold`` is written only when finite; 3. every norm-like tag has its ``_log10`` twin, on both;
4. the outcome is one enum (:class:`~lightning_gradguard.core.guard.GuardDecision`) on both;
5. the event text names the adapter, built by the same code; 6. a failed snapshot warns ``UserWarning`` on both.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import AdaptiveGradientClipping, GradGuard, GuardDecision, NaNGuard
from tests.models import TinyRegression, loader, make_trainer

STEPS = 16
#: the tags both adapters write for the guard and the clipper (the Trainer's monitor writes the rest)
SHARED = {
    "gradguard/clip_threshold",
    "gradguard/clip_threshold_log10",
    "gradguard/skipped_steps",
    "gradguard/rollbacks",
    "gradguard/lr_scale",
    "gradguard/flagged_steps",
    "gradguard/loss_max",
    "gradguard/loss_max_log10",
}


class FlakyStateDict(TinyRegression):
    """``state_dict()`` raises the first time it is called (the snapshot of the starting state fails)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.failed = False

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            self.failed = True
            raise RuntimeError("simulated failure while copying the model")
        return super().state_dict(*args, **kwargs)


class _Outcomes(pl.Callback):
    """The guard's outcome after each step (listed after the guard)."""

    def __init__(self, guard: NaNGuard) -> None:
        self.guard = guard
        self.rows: list[GuardDecision] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append(self.guard.reason)


def _model(flaky: bool, nan_at: tuple[int, ...]) -> TinyRegression:
    torch.manual_seed(0)
    cls = FlakyStateDict if flaky else TinyRegression
    return cls(lr=0.02, nan_at_steps=nan_at)


def _trainer_side(tmp_path: Path, flaky: bool, nan_at: tuple[int, ...], guard_args: dict, clip_args: dict) -> dict:
    model = _model(flaky, nan_at)
    init = {k: v.clone() for k, v in TinyRegression.state_dict(model).items()}
    clip = AdaptiveGradientClipping("zscore", **clip_args)
    guard = NaNGuard(**guard_args)
    outcomes = _Outcomes(guard)
    trainer = make_trainer(tmp_path / "trainer", [clip, guard, outcomes], max_steps=STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader())
    return {
        "init": init,
        "events": guard.events,
        "outcomes": outcomes.rows,
        "warnings": _ours(caught),
        "tags": _read(Path(trainer.logger.log_dir)),
        "rollbacks": guard.rollbacks,
    }


def _plain_side(tmp_path: Path, init: dict, flaky: bool, nan_at: tuple[int, ...], guard_args: dict, clip_args: dict):
    model = _model(flaky, nan_at)
    TinyRegression.load_state_dict(model, init)
    opt = torch.optim.Adam(model.parameters(), lr=model.lr)
    writer = SummaryWriter(str(tmp_path / "plain"))
    outcomes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = GradGuard(
            model, opt, clipping="zscore", clipping_options=clip_args, writer=writer, log_every_n_steps=1, **guard_args
        )
        step = 0
        while step < STEPS:  # the Trainer's epochs: the same batches in the same order
            for x, y in loader():
                if step >= STEPS:
                    break
                loss = nn.functional.mse_loss(model(x), y)
                if step in nan_at:
                    loss = loss * float("nan")
                loss.backward()
                again = lambda x=x, y=y: nn.functional.mse_loss(model(x), y)  # noqa: E731  (the NaN was a one-off)
                if guard.before_step(loss, recompute=again):
                    opt.step()
                guard.after_step()
                opt.zero_grad()
                outcomes.append(guard.reason)
                step += 1
        guard.close()
    writer.close()
    return {
        "events": guard.events,
        "outcomes": outcomes,
        "warnings": _ours(caught),
        "tags": _read(tmp_path / "plain"),
        "rollbacks": guard.rollbacks,
    }


def _ours(caught: list[warnings.WarningMessage]) -> list[tuple[type, str]]:
    return [(w.category, str(w.message)) for w in caught if "snapshot" in str(w.message)]


def _read(logdir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"] if t in SHARED}
    # torch's SummaryWriter adds "/text_summary" to a text tag, tensorboardX (the Trainer's) does not
    texts = {
        t.removesuffix("/text_summary"): {e.step: 1.0 for e in acc.Tensors(t)}
        for t in acc.Tags()["tensors"]
        if "nan_guard_events" in t
    }
    return {**scalars, **texts}


def _same_text(event_lines: list[dict], other: list[dict]) -> None:
    assert [e["kind"] for e in event_lines] == [e["kind"] for e in other]
    assert [(e["step"], e["cause"], e["reason"]) for e in event_lines] == [
        (e["step"], e["cause"], e["reason"]) for e in other
    ]


def test_rollback_without_a_snapshot_skips_alike_with_the_same_warning_outcomes_and_text(tmp_path: Path) -> None:
    # drifts 1, 4, 5, 6: the start snapshot fails (a warning), a NaN at step 3 under action="rollback" has nothing
    # to roll back to and finite weights: both skip it, spend no rollback, and say so the same way
    guard_args = {"action": "rollback", "snapshot_every_n_steps": 50, "raise_on_halt": False}
    ref = _trainer_side(tmp_path, True, (3,), guard_args, {})
    got = _plain_side(tmp_path, ref["init"], True, (3,), guard_args, {})
    assert [(e["step"], e["kind"]) for e in ref["events"]] == [(3, "skip")]
    assert "no trusted snapshot" in ref["events"][0]["reason"]
    _same_text(got["events"], ref["events"])
    assert got["rollbacks"] == ref["rollbacks"] == 0
    assert got["outcomes"] == ref["outcomes"]
    assert ref["outcomes"][3] is GuardDecision.SKIPPED
    assert ref["outcomes"][4] is GuardDecision.HEALTHY
    assert [c for c, _ in got["warnings"]] == [c for c, _ in ref["warnings"]] == [UserWarning]
    assert got["warnings"][0][1] == ref["warnings"][0][1].replace("NaNGuard", "GradGuard")
    assert "could not take a snapshot at step 0" in got["warnings"][0][1]


def test_the_same_tags_at_the_same_steps_with_an_infinite_threshold_and_a_fault(tmp_path: Path) -> None:
    # drifts 2, 3: without the warm-up cap the first threshold is inf (never written, on either side); every
    # norm-like tag has its log10 twin at the same steps; the event text is written at the event's step
    clip_args = {"fallback_max_norm": None}
    guard_args = {"snapshot_every_n_steps": 5, "snapshot_confirm_steps": 2}
    ref = _trainer_side(tmp_path, False, (6,), guard_args, clip_args)
    got = _plain_side(tmp_path, ref["init"], False, (6,), guard_args, clip_args)
    assert [(e["step"], e["kind"]) for e in ref["events"]] == [(6, "skip")]
    _same_text(got["events"], ref["events"])
    assert set(got["tags"]) == set(ref["tags"]) == SHARED | {"gradguard/nan_guard_events"}
    for name, steps in ref["tags"].items():
        assert sorted(got["tags"][name]) == sorted(steps), name
        for step, value in steps.items():
            assert got["tags"][name][step] == pytest.approx(value, rel=1e-5, nan_ok=True), (name, step)
    assert 0 not in ref["tags"]["gradguard/clip_threshold"]  # the inf threshold of step 0
    for name in ("clip_threshold", "loss_max"):
        twin, plain = ref["tags"][f"gradguard/{name}_log10"], ref["tags"][f"gradguard/{name}"]
        assert sorted(twin) == sorted(plain)  # written together, always (issue 26)
        for step, value in twin.items():
            v = plain[step]
            if math.isfinite(v) and v > 0:
                assert value == pytest.approx(math.log10(v), rel=1e-5)
            else:  # the NaN loss of the faulty step: its twin is NaN too (TensorBoard marks it at the edge)
                assert math.isnan(value) == math.isnan(v)
    assert got["outcomes"] == ref["outcomes"]
