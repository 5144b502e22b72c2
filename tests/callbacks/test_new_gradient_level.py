"""A new gradient level that the guard adopts is handed to the adaptive clipper (issue 24).

The zoo's ``class_incremental``: a digits MLP shown classes 0 and 1 only for 1400 steps (separable: cross-entropy
drives the gradient norm to ~1e-3), then all ten (norms ~7, 5000x). The divergence detector adopts the new level (the
far norms hold while the loss does not rise), but the z-score clipper kept its statistics of ~1e-3 and may raise its
threshold only 1 % a step: it clipped all 300 steps after the switch (and ~700 in the zoo's 2800-step run), and the
run ended 2-3 % below the unclipped one. Now the guard hands the adopted norms to the clipper, whose statistics
restart from them (``Clipper.rebase``): a few steps are clipped, and the run ends where the unclipped one does. The
plain loop takes the same path (one engine)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from lightning_gradguard import AdaptiveGradientClipping, GradGuard, default_callbacks
from tests.models import make_trainer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from zoo_shapes import ClassIncremental  # noqa: E402

SWITCH, AFTER = 1400, 300


class _ClipCount(pl.Callback):
    """The clipped steps of optimizer 0 so far, after every batch."""

    def __init__(self) -> None:
        self.clipped: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        clip = next(c for c in trainer.callbacks if isinstance(c, AdaptiveGradientClipping))  # type: ignore[attr-defined]
        rate = clip.clip_rate(0)
        self.clipped[trainer.global_step] = round((rate or 0.0) * trainer.global_step)


def _fit(tmp_path: Path, callbacks: list[pl.Callback]) -> ClassIncremental:
    pl.seed_everything(0, verbose=False)
    model = ClassIncremental(0, SWITCH + AFTER, switch=SWITCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks, max_steps=SWITCH + AFTER, logger=False).fit(model)
    return model


def test_the_clipper_follows_a_new_gradient_level_the_guard_adopted(tmp_path: Path) -> None:
    reference = _fit(tmp_path / "none", []).metric()
    count = _ClipCount()
    guarded = _fit(tmp_path / "defaults", [*default_callbacks(), count])
    after = count.clipped[SWITCH + AFTER] - count.clipped[SWITCH]
    assert after < AFTER // 10, count.clipped  # before: every one of the 300 steps
    assert guarded.metric() >= 0.98 * reference  # before: 0.884 against 0.945


def test_the_plain_loop_hands_the_new_level_to_its_clipper() -> None:
    torch.manual_seed(0)
    model = ClassIncremental(0, SWITCH + AFTER, switch=SWITCH)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    guard = GradGuard(model, opt, raise_on_halt=False)
    clipped_after = 0
    for step in range(SWITCH + AFTER):
        g = torch.Generator().manual_seed(step)
        pool = model.easy if step < SWITCH else torch.arange(len(model.y))
        idx = pool[torch.randint(0, len(pool), (32,), generator=g)]
        loss = F.cross_entropy(model.net(model.x[idx]), model.y[idx])
        loss.backward()
        if guard.before_step(loss):
            opt.step()
        guard.after_step()
        opt.zero_grad()
        if step >= SWITCH and guard.last[0].clipped:
            clipped_after += 1
    assert not [e for e in guard.events if e["kind"] in ("skip", "rollback", "halt", "lower_lr")], guard.events
    assert clipped_after < AFTER // 10  # before: every step after the switch
