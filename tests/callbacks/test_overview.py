"""One picture and everything written at a halt (issue 26): the ``gradguard/overview`` image in TensorBoard, and the
last value of every gradguard scalar at the step where the run stopped, read back from real event files."""

from __future__ import annotations

import io
import math
import sys
import warnings

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import DivergenceError, NaNGuard, default_callbacks
from lightning_gradguard import overview as overview_module
from lightning_gradguard.core.engine._scalars import LOG10_NAMES, split_tag
from lightning_gradguard.core.engine._timeline import Timeline
from lightning_gradguard.overview import OVERVIEW_TAG, OverviewBudget
from tests.models import TinyRegression, make_trainer

GUIDANCE = {"scalars": 0, "images": 0, "tensors": 0, "histograms": 1}


def _events(trainer) -> EventAccumulator:
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance=GUIDANCE)
    acc.Reload()
    return acc


def _png(event):
    from PIL import Image

    img = Image.open(io.BytesIO(event.encoded_image_string))
    img.load()
    return img


@pytest.fixture(scope="module")
def halted(tmp_path_factory):
    """default_callbacks() with a halting guard, log_every_n_steps=50, a NaN loss at step 30 (60 steps asked)."""
    root = tmp_path_factory.mktemp("halted")
    callbacks = default_callbacks(guard="halt")
    trainer = make_trainer(root, callbacks, max_steps=60, log_every_n_steps=50)
    with pytest.raises(DivergenceError, match="step 30"):
        trainer.fit(TinyRegression(nan_at_steps=[30]))
    return trainer, _events(trainer)


def test_every_gradguard_scalar_has_a_value_at_the_halt_step(halted):
    _, acc = halted
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("gradguard/")]
    assert len(tags) >= 20  # monitor, clipper and guard all wrote
    for t in tags:
        steps = [e.step for e in acc.Scalars(t)]
        assert any(29 <= s <= 31 for s in steps), (t, steps)  # before: the level tags ended at step 0
    # the level tags hold their value at the halt step itself; the LR and the norm are the step's own
    at = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}
    for name in ("lr", "grad_norm", "grad_norm_clipped", "lr_scale", "skipped_steps", "vanishing_layers"):
        assert 30 in at[f"gradguard/{name}"], name
    assert at["gradguard/lr"][30] == pytest.approx(0.01)
    assert math.isnan(at["gradguard/grad_norm"][30])  # the judged norm of the faulty step, not the one of step 0
    assert at["gradguard/skipped_steps"][30] == 1.0


def test_log10_twins_are_written_with_their_value_always(halted):
    _, acc = halted
    tags = set(acc.Tags()["scalars"])
    for t in sorted(tags):
        parts = split_tag(t)
        if parts is None or parts[0] not in LOG10_NAMES:
            continue
        twin = t.replace(parts[0], parts[0] + "_log10", 1)
        values = {e.step: e.value for e in acc.Scalars(t)}
        twins = {e.step: e.value for e in acc.Scalars(twin)}
        assert sorted(twins) == sorted(values), t  # the same steps, non-finite values included
        for step, v in values.items():
            if math.isfinite(v) and v > 0:
                assert twins[step] == pytest.approx(math.log10(v), abs=1e-6)
            else:
                assert not math.isfinite(twins[step])
    maxima = {e.step: e.value for e in acc.Scalars("gradguard/grad_norm_max")}
    assert not math.isfinite(maxima[30])  # the explosion, on the log10 chart as well
    assert not math.isfinite({e.step: e.value for e in acc.Scalars("gradguard/grad_norm_max_log10")}[30])


def test_overview_image_at_the_halt_and_where_the_run_stopped(halted):
    trainer, acc = halted
    assert OVERVIEW_TAG in acc.Tags()["images"]
    images = acc.Images(OVERVIEW_TAG)
    assert [e.step for e in images] == [30, 31]  # the halt event, then the exception at the step count
    for event in images:
        img = _png(event)
        assert img.format == "PNG"
        assert (img.width, img.height) == (event.width, event.height) == (800, 600)  # one TensorBoard card
        assert len(set(img.convert("L").getdata())) > 10  # something drawn, not a blank canvas


def test_a_healthy_fit_draws_the_overview_only_at_the_end(tmp_path, monkeypatch):
    calls = []
    real = overview_module.render_overview
    monkeypatch.setattr(overview_module, "render_overview", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = make_trainer(tmp_path, default_callbacks(), max_steps=12, log_every_n_steps=5)
    trainer.fit(TinyRegression())
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NaNGuard))
    assert guard.events == []
    acc = _events(trainer)
    assert [e.step for e in acc.Images(OVERVIEW_TAG)] == [12]
    assert len(calls) == 1  # drawn once: never on a healthy step
    # the picture's last points are the run's last steps: every level tag reaches the end of the fit
    for t in ("gradguard/grad_norm", "gradguard/lr", "gradguard/clip_threshold"):
        assert max(e.step for e in acc.Scalars(t)) >= 11, t


def test_events_draw_the_overview_at_their_own_step(tmp_path):
    guard = NaNGuard(action="skip")
    callbacks = default_callbacks(guard=None) + [guard]
    trainer = make_trainer(tmp_path, callbacks, max_steps=20, log_every_n_steps=50)
    trainer.fit(TinyRegression(nan_at_steps=[7, 13]))
    assert [(e["step"], e["kind"]) for e in guard.events] == [(7, "skip"), (13, "skip")]
    acc = _events(trainer)
    assert [e.step for e in acc.Images(OVERVIEW_TAG)] == [7, 13, 20]
    lr = {e.step: e.value for e in acc.Scalars("gradguard/lr")}
    assert {0, 7, 13} <= set(lr)  # the LR chart reaches every event (logged every 50 steps only)


def test_only_logging_steps_feed_the_timeline(tmp_path, monkeypatch):
    steps: list[int] = []
    real = Timeline.update

    def update(self, values, step):
        steps.append(step)
        return real(self, values, step)

    monkeypatch.setattr(Timeline, "update", update)
    trainer = make_trainer(tmp_path, default_callbacks(), max_steps=40, log_every_n_steps=10)
    trainer.fit(TinyRegression())
    assert set(steps) <= {0, 10, 20, 30, 39, 40}  # logging steps and the end of the fit: nothing per healthy step


def test_without_matplotlib_the_fit_runs_and_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(overview_module, "_warned", set())
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # the import raises ImportError, as when absent
    guard = NaNGuard(action="skip")
    trainer = make_trainer(
        tmp_path, [*default_callbacks(guard=None, monitor_kwargs={"flow_every_n_logs": 0}), guard], max_steps=12
    )
    with pytest.warns(UserWarning, match="gradguard/overview image is skipped") as record:
        trainer.fit(TinyRegression(nan_at_steps=[3, 8]))
    assert len(guard.events) == 2
    assert sum("overview image is skipped" in str(w.message) for w in record) == 1  # three pictures, one warning
    assert _events(trainer).Tags()["images"] == []


def test_a_failing_drawing_never_ends_the_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(overview_module, "_warned", set())

    def broken(*args, **kwargs):
        raise RuntimeError("font cache exploded")

    monkeypatch.setattr(overview_module, "render_overview", broken)
    trainer = make_trainer(tmp_path, [NaNGuard(action="skip")], max_steps=6)
    with pytest.warns(UserWarning, match="font cache exploded"):
        trainer.fit(TinyRegression(nan_at_steps=[2]))
    assert trainer.global_step == 6


def test_no_pyplot_figure_is_left_behind(tmp_path):
    trainer = make_trainer(tmp_path, [NaNGuard(action="skip")], max_steps=6)
    trainer.fit(TinyRegression(nan_at_steps=[2]))
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_the_budget_keeps_a_storm_of_events_cheap():
    budget = OverviewBudget(share=0.05, free=2)
    assert budget.due()
    budget.add(1.0)
    budget.add(1.0)
    assert not budget.due()  # 2 s of drawing just now: the next event picture waits
    assert budget.due(force=True)  # a halt and the end always draw
    budget.start -= 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert budget.due()  # 2 s in 100 s: within 5 %


def _drawn_notes(plot) -> dict[str, list[str]]:
    """The notes' texts as drawn on each panel, each checked to lie inside its panel."""
    texts: dict[str, list[str]] = {}
    for name, ax in plot.axes.items():
        frame = ax.bbox
        for t in ax.texts:
            box = t.get_window_extent()
            if t.get_text() in {n.text for n in plot.notes if n.panel == name}:
                assert frame.x0 <= box.x0 <= box.x1 <= frame.x1, t.get_text()
                assert frame.y0 <= box.y0 <= box.y1 <= frame.y1, t.get_text()
                texts.setdefault(name, []).append(t.get_text())
    return texts


@pytest.fixture
def overview_data(monkeypatch):
    """The data of every overview a fit draws, in order."""
    seen = []
    real = overview_module.render_overview
    monkeypatch.setattr(
        overview_module, "render_overview", lambda data, *a, **k: seen.append(data) or real(data, *a, **k)
    )
    return seen


def test_the_spike_and_the_lr_cut_at_a_rollback_are_written_on_the_overview(tmp_path, overview_data):
    # LSTM-like: the loss blows up (x1e4 for three steps), the norm spikes, the guard rolls back and cuts the LR
    trainer = make_trainer(tmp_path, default_callbacks(), max_steps=12, log_every_n_steps=5)
    trainer.fit(TinyRegression(loss_scale_at={5: 1e4, 6: 1e4, 7: 1e4}))
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NaNGuard))
    ((step, kind, lr_scale),) = [(e["step"], e["kind"], e["lr_scale"]) for e in guard.events]
    assert (kind, lr_scale) == ("rollback", 0.5)
    acc = _events(trainer)
    tops = [(e.step, e.value) for e in acc.Scalars("gradguard/grad_norm_max")]
    lr = sorted((e.step, e.value) for e in acc.Scalars("gradguard/lr"))
    peak_value, peak_step = max((v, -s) for s, v in tops)
    assert all(math.isfinite(v) for _, v in tops)
    plot = overview_module.draw_overview(overview_data[-1])  # the picture at the end of the fit
    notes = {(n.panel, n.kind): n for n in plot.notes}
    peak = notes["norm", "peak"]
    assert (peak.step, peak.value) == (-peak_step, pytest.approx(peak_value, rel=1e-6))
    assert peak.value > 100 * sorted(v for _, v in tops)[len(tops) // 2]  # the spike, not an ordinary step
    assert peak.text == f"peak {overview_module._short(peak_value)} @ step {-peak_step}"
    change = notes["lr", "lr_change"]
    assert [n.step for n in plot.notes if n.kind == "lr_change"] == [step]
    assert change.before == pytest.approx(max((s, v) for s, v in lr if s < step)[1]) == pytest.approx(0.01)
    assert change.value == pytest.approx(dict(lr)[step]) == pytest.approx(0.005)
    assert change.text == "0.01 → 0.005"
    drawn = _drawn_notes(plot)
    assert drawn["norm"] == [peak.text]
    assert drawn["lr"] == [change.text]
    assert notes["loss", "peak"].step in (5, 6, 7)  # the blow-up's interval maximum


def test_a_healthy_run_with_a_schedule_has_no_lr_note(tmp_path, overview_data):
    from torch.optim.lr_scheduler import StepLR

    model = TinyRegression(scheduler=lambda opt: StepLR(opt, step_size=4, gamma=0.1))
    trainer = make_trainer(tmp_path, default_callbacks(), max_steps=12, log_every_n_steps=1)
    trainer.fit(model)
    data = overview_data[-1]
    assert data.events == []
    assert len({round(v, 12) for _, v in data.lr}) == 3  # the schedule changed the LR twice
    plot = overview_module.draw_overview(data)
    assert [n for n in plot.notes if n.panel == "lr"] == []
    assert "lr" not in _drawn_notes(plot)
    assert [n.kind for n in plot.notes if n.panel == "norm"] == ["peak"]


def test_a_nonfinite_norm_is_the_peak_note(halted):
    trainer, acc = halted
    data = overview_module.OverviewData(
        grad_norm_max=[(e.step, e.value) for e in acc.Scalars("gradguard/grad_norm_max")],
        events=[(30, "halt")],
    )
    plot = overview_module.draw_overview(data)
    (note,) = [n for n in plot.notes if n.panel == "norm"]
    assert (note.kind, note.step, note.text) == ("nonfinite", 30, "NaN/inf @ step 30")
    assert not math.isfinite(note.value)
    assert _drawn_notes(plot)["norm"] == [note.text]


@pytest.mark.parametrize(
    ("lr", "events", "expected"),
    [
        ([(0, 10.0), (7, 0.03), (10, 0.03)], [(7, "rollback")], [(7, 10.0, 0.03, "10 → 0.03")]),
        (
            [(0, 1e-3), (50, 5e-4), (90, 1e-3)],
            [(50, "lower_lr"), (90, "raise_lr")],
            [(50, 1e-3, 5e-4, "1e-3 → 5e-4"), (90, 5e-4, 1e-3, "5e-4 → 1e-3")],
        ),  # fmt: skip
        ([(0, 0.1), (4, 0.01), (8, 0.001)], [], []),  # a schedule alone
        ([(0, 0.1), (4, 0.01), (8, 0.001)], [(4, "skip"), (8, "warn")], []),  # at other events' steps
        ([(0, 0.1), (5, 0.1)], [(5, "rollback")], []),  # a rollback without a cut
        ([(0, 0.1), (10, 0.05)], [(7, "lower_lr")], [(7, 0.1, 0.05, "0.1 → 0.05")]),  # not logged at its step
        ([(5, 0.1)], [(5, "rollback")], []),  # nothing logged before it
    ],
)
def test_find_lr_changes(lr, events, expected):
    from lightning_gradguard.overview import find_lr_changes

    found = find_lr_changes(lr, events)
    assert [(n.step, n.before, n.value, n.text) for n in found] == expected
    assert all((n.panel, n.kind) == ("lr", "lr_change") for n in found)


def test_find_peak():
    from lightning_gradguard.overview import find_peak

    note = find_peak("norm", ([(0, 1.0), (3, 1164.5), (5, 2.0)], [(3, 486.0), (9, 1164.5)]))
    assert (note.kind, note.step, note.value, note.text) == ("peak", 3, 1164.5, "peak 1.16e3 @ step 3")
    note = find_peak("norm", ([(0, 1.0), (12, math.nan), (14, math.inf)], [(12, math.nan)]))
    assert (note.kind, note.step, note.text) == ("nonfinite", 12, "NaN/inf @ step 12 (+1 more)")
    assert find_peak("loss", ([(0, -1.0), (1, 0.0)],), positive=True) is None
    assert find_peak("loss", ([(0, -1.0), (1, -3.0)],)).text == "peak -1 @ step 0"
    assert find_peak("norm", ()) is None
