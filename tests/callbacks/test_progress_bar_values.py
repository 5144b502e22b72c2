"""Progress-bar values of the clipper and the guard in real fits: what the bar shows at each step, and how often
``LightningModule.log`` is paid for it (sent on change or every 10 steps, never without a progress bar)."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import pytest

from lightning_gradguard import AdaptiveGradientClipping, NaNGuard
from lightning_gradguard.callbacks._log_writer import announce
from tests.models import TinyRegression, make_trainer

BAR_KEYS = ("clip_rate", "skips", "rollbacks", "lr_cuts", "halts")


class CountingModel(TinyRegression):
    """TinyRegression that counts its ``self.log`` calls per name (callbacks log through the module)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log_calls: Counter[str] = Counter()

    def log(self, name, value, *args, **kwargs):
        self.log_calls[name] += 1
        return super().log(name, value, *args, **kwargs)


class BarRecorder(pl.Callback):
    """After each batch (gradguard's hooks ran first): the bar's values and the clipper's decision."""

    def __init__(self, clipper=None):
        self.clipper = clipper
        self.shown: list[dict[str, float]] = []
        self.clipped: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.clipper is not None:
            self.clipped.append(bool(self.clipper.last[0].clipped))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_metrics
        self.shown.append({k: bar[k] for k in BAR_KEYS if k in bar})


def test_clip_rate_is_refreshed_every_10_steps_with_the_rate_at_that_step(tmp_path):
    spikes = {2: 1e4, 13: 1e4, 14: 1e4, 27: 1e4}  # global steps; the 3rd, 14th, 15th and 28th optimizer steps
    model = CountingModel(loss_scale_at=spikes)
    clipper = AdaptiveGradientClipping("norm", max_norm=100.0, progress_bar=True)
    rec = BarRecorder(clipper)
    make_trainer(tmp_path, [clipper, rec], max_steps=30, enable_progress_bar=True).fit(model)
    assert [i for i, c in enumerate(rec.clipped) if c] == sorted(spikes)  # the scenario is what it claims
    cumulative = [sum(rec.clipped[: t + 1]) for t in range(30)]
    for t in range(30):  # t + 1 steps done; refreshed after steps 1, 11, 21
        r = 1 + 10 * (t // 10)
        assert rec.shown[t]["clip_rate"] == pytest.approx(cumulative[r - 1] / r), t
    # the bar lags between refreshes (the test would not notice a per-step send otherwise)
    assert any(rec.shown[t]["clip_rate"] != pytest.approx(cumulative[t] / (t + 1)) for t in range(30))
    assert model.log_calls["clip_rate"] == 3
    assert clipper.clip_rate() == pytest.approx(4 / 30)  # the exact figure stays available


def test_guard_counters_are_sent_when_they_change(tmp_path):
    model = CountingModel(nan_at_steps=[6, 9])
    guard = NaNGuard(action="skip")
    rec = BarRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=20, enable_progress_bar=True).fit(model)
    skips = [s.get("skips") for s in rec.shown]
    assert skips == [None] * 6 + [1] * 3 + [2] * 11  # shown from the first skip on
    assert not any({"rollbacks", "lr_cuts", "halts"} & set(s) for s in rec.shown)
    # counters go to the bar as ints (tqdm shows "2", not "2.000"), and never through LightningModule.log
    assert all(type(s["skips"]) is int for s in rec.shown[6:])
    assert "skips" not in model.log_calls


def test_each_guard_event_counts_once_under_its_own_kind(tmp_path):
    """Issue 26: a rollback showed as ``nan_skips=1, nan_rollbacks=1`` (its dropped update counted as a skip), and
    ``nan_rollbacks`` was the rollback budget, which refills: each kind of event now has its own counter."""
    model = CountingModel(nan_at_steps=[3, 9, 10])  # a skip, then two faults in a row: a skip and a rollback
    guard = NaNGuard(max_consecutive_skips=1, snapshot_every_n_steps=2, snapshot_confirm_steps=0)
    rec = BarRecorder()
    make_trainer(tmp_path, [guard, rec], max_steps=14, enable_progress_bar=True).fit(model)
    kinds = [(e["step"], e["kind"]) for e in guard.events]
    assert kinds == [(3, "skip"), (9, "skip"), (10, "rollback")]
    assert guard.skipped_steps == 3  # the engine's counter: updates dropped (the rollback's too)
    assert rec.shown[-1] == {"skips": 2, "rollbacks": 1}
    assert [s.get("rollbacks") for s in rec.shown[9:12]] == [None, 1, 1]


class CutAt(pl.Callback):
    """The stability controller's finding replaced by an in-place LR cut at one step (as tests/compat/
    test_resume_exact.py injects it)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_start(self, trainer, pl_module):
        from lightning_gradguard.core.guard._stability import StabilityFinding

        guard = next(cb for cb in trainer.callbacks if isinstance(cb, NaNGuard))
        controller = guard.engine.judge_.controller
        update = controller.update

        def injected(*args, **kwargs):
            finding = update(*args, **kwargs)
            if trainer.global_step == self.step:
                return StabilityFinding(rule="injected", evidence={}, reason="learning rate looks too high: test")
            return finding

        controller.update = injected


def test_lr_cuts_and_halts_have_their_own_counters(tmp_path):
    guard = NaNGuard()
    rec = BarRecorder()
    make_trainer(tmp_path, [guard, CutAt(4), rec], max_steps=8, enable_progress_bar=True).fit(CountingModel())
    assert [e["kind"] for e in guard.events] == ["lower_lr"]
    assert rec.shown[-1] == {"lr_cuts": 1}
    halting = NaNGuard(action="halt", raise_on_halt=False, report_dir=tmp_path / "report")
    trainer = make_trainer(tmp_path / "halt", [halting], max_steps=8, enable_progress_bar=True)
    trainer.fit(CountingModel(nan_at_steps=[2]))
    assert {k: v for k, v in trainer.progress_bar_metrics.items() if k in BAR_KEYS} == {"halts": 1}


def test_nothing_is_sent_without_a_progress_bar(tmp_path):
    model = CountingModel(nan_at_steps=[3], loss_scale_at={5: 1e4})
    cbs = [AdaptiveGradientClipping("norm", max_norm=100.0, progress_bar=True), NaNGuard(action="skip")]
    trainer = make_trainer(tmp_path, cbs, max_steps=12, enable_progress_bar=False)
    trainer.fit(model)
    assert not any(k in model.log_calls for k in BAR_KEYS)
    assert not any(k in trainer.progress_bar_metrics for k in BAR_KEYS)


def test_values_show_again_in_the_next_fit(tmp_path):
    """Lightning clears the bar's values at each fit: the callbacks must send them again, unchanged or not. (A fit
    that continues the run, the same Trainer with more steps: a new Trainer from step 0 is a new run,
    tests/callbacks/test_new_run.py.)"""
    clipper = AdaptiveGradientClipping("norm", max_norm=100.0, progress_bar=True)
    guard = NaNGuard(action="skip")
    model = CountingModel(nan_at_steps=[2])
    rec = BarRecorder()
    trainer = make_trainer(tmp_path, [clipper, guard, rec], max_steps=5, enable_progress_bar=True)
    trainer.fit(model)
    first = len(rec.shown)
    trainer.fit_loop.epoch_loop.max_steps = 8
    trainer.fit(model)
    assert len(rec.shown) > first
    assert rec.shown[first]["skips"] == 1  # the counter from the first fit, shown from the first step
    assert "clip_rate" in rec.shown[first]


class Announcer(pl.Callback):
    """Announces an event line at one step, as the guard does at a rollback."""

    def __init__(self, at_step: int, text: str):
        self.at_step, self.text = at_step, text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            announce(trainer, self.text)


def test_announce_prints_its_own_line_above_the_tqdm_bar(tmp_path, capsys):
    text = "NaNGuard rollback at step 5: demo line"
    trainer = make_trainer(tmp_path, [Announcer(5, text)], max_steps=8, enable_progress_bar=True, logger=False)
    trainer.fit(TinyRegression())
    out = capsys.readouterr().out
    assert text in out
    before, after = out.split(text, 1)
    # the bar was cleared (carriage return, or a fresh line) before the text, and the text ended its line
    assert before.endswith(("\r", "\n")), repr(before[-80:])
    assert after.startswith("\n"), repr(after[:80])
    assert before.count("Epoch 0") > 0  # the bar really was drawn before the line


def test_announce_without_a_bar_logs_a_warning_record(tmp_path, caplog):
    text = "NaNGuard skip at step 3: demo line"
    trainer = make_trainer(tmp_path, [Announcer(3, text)], max_steps=5, logger=False)
    with caplog.at_level("WARNING", logger="lightning_gradguard"):
        trainer.fit(TinyRegression())
    assert [r.getMessage() for r in caplog.records if r.name == "lightning_gradguard"] == [text]
