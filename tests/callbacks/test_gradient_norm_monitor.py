"""GradientNormMonitor: real fits, TensorBoard event files read back, values against independent references."""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard
from lightning_gradguard.callbacks._step_context import context_for, step_record
from tests.models import TinyRegression, make_trainer

GUIDANCE = {"histograms": 0, "scalars": 0, "images": 0, "tensors": 0, "compressedHistograms": 0}


def read_events(log_dir: str | Path) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance=GUIDANCE)
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, name: str) -> dict[int, float]:
    return {e.step: e.value for e in ea.Scalars(name)}


class GradCapture(pl.Callback):
    """Copies every gradient and weight at on_before_optimizer_step (put it first: it sees the pre-clip grads)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[trainer.global_step] = {
            n: (p.grad.detach().double().clone(), p.detach().double().clone())
            for n, p in pl_module.named_parameters()
            if p.grad is not None
        }


def reference_norm(grads: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g, _ in grads.values()])))


def reference_layers(grads: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[float, float, int]]:
    """{layer: (grad norm, update ratio, numel)}, layers grouped from parameter names by hand."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for name, gw in grads.items():
        parts[name.rsplit(".", 1)[0]].append(gw)
    out = {}
    for layer, items in parts.items():
        g = torch.cat([gi.reshape(-1) for gi, _ in items])
        w = torch.cat([wi.reshape(-1) for _, wi in items])
        gn, wn = float(g.norm()), float(w.norm())
        out[layer] = (gn, gn / wn, g.numel())
    return out


# ---------------------------------------------------------------------------- one TensorBoard run, many checks


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("tb_run")
    capture = GradCapture()
    monitor = GradientNormMonitor(log_every_n_steps=3, flow_every_n_logs=2)
    trainer = make_trainer(tmp, [capture, monitor], max_steps=10)
    trainer.fit(TinyRegression(lr=0.01))
    return trainer, monitor, capture, read_events(trainer.logger.log_dir)


def test_scalar_tags_and_steps(tb_run):
    _, monitor, _, ea = tb_run
    tags = ea.Tags()
    for name in ("grad_norm", "lr", "vanishing_layers", "exploding_layers", "nonfinite_layers"):
        assert sorted(scalars(ea, f"gradguard/{name}")) == [0, 3, 6, 9], name
    assert set(tags["histograms"]) == {"gradguard/layer_grad_norms", "gradguard/update_ratio"}  # grads/* is opt-in
    assert monitor.last_step == 9


def test_logged_global_norm_equals_independent_reference(tb_run):
    _, monitor, capture, ea = tb_run
    logged = scalars(ea, "gradguard/grad_norm")
    for step, value in logged.items():
        assert value == pytest.approx(reference_norm(capture.steps[step]), rel=1e-5)
    assert monitor.last_grad_norm == pytest.approx(logged[9], rel=1e-6)
    assert list(scalars(ea, "gradguard/lr").values()) == pytest.approx([0.01] * 4)
    assert set(scalars(ea, "gradguard/vanishing_layers").values()) == {0.0}
    assert set(scalars(ea, "gradguard/nonfinite_layers").values()) == {0.0}


def test_layer_histograms_match_reference(tb_run):
    _, _, capture, ea = tb_run
    norms = {e.step: e.histogram_value for e in ea.Histograms("gradguard/layer_grad_norms")}
    ratios = {e.step: e.histogram_value for e in ea.Histograms("gradguard/update_ratio")}
    assert sorted(norms) == sorted(ratios) == [0, 3, 6, 9]
    for step in norms:
        ref = reference_layers(capture.steps[step])
        assert len(ref) == 3  # net.0, net.2, net.4
        ref_norms = [v[0] for v in ref.values()]
        ref_ratios = [v[1] for v in ref.values()]
        for h, values in ((norms[step], ref_norms), (ratios[step], ref_ratios)):
            assert h.num == 3
            assert h.min == pytest.approx(min(values), rel=1e-5)
            assert h.max == pytest.approx(max(values), rel=1e-5)
            assert h.sum == pytest.approx(sum(values), rel=1e-5)
            assert h.sum_squares == pytest.approx(sum(v * v for v in values), rel=1e-5)


ALL_TAGS = [
    f"gradguard/{n}{suffix}"
    for n in (
        "grad_norm",
        "grad_norm_max",
        "grad_norm_mean",
        "grad_norm_clipped",
        "clip_threshold",
        "lr",
        "loss_max",
        "clipped_steps",
        "flagged_steps",
        "skipped_steps",
        "rollbacks",
        "lr_scale",
        "clip_fraction",
        "vanishing_layers",
        "exploding_layers",
        "nonfinite_layers",
    )
    for suffix in ("", "_log10")
]


def test_custom_scalars_layout_is_readable(tb_run):
    _, _, _, ea = tb_run
    events = ea.Tensors("custom_scalars__config__")
    assert len(events) == 1  # written once per run
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["gradguard"]
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    # the plugin matches each regex with re.match against the scalar tags: each picks exactly its own tag
    for regexes in charts.values():
        for r in regexes:
            assert [t for t in ALL_TAGS if re.match(r, t)] == [r.removesuffix("$")], r
    # norms on a log10 axis next to the threshold; the LR in its own chart; layer counts apart from norms
    assert charts["grad norm vs clip threshold (log10)"][:3] == [
        "gradguard/grad_norm_log10$",
        "gradguard/grad_norm_max_log10$",
        "gradguard/clip_threshold_log10$",
    ]
    assert charts["learning rate"] == ["gradguard/lr$"]
    assert not any(
        "lr" in r for title, rs in charts.items() if title != "learning rate" for r in rs if "lr_scale" not in r
    )
    # every tag this run wrote that a chart names exists, and the log10 twins hold log10 of their norm
    written = set(ea.Tags()["scalars"])
    for base in ("grad_norm", "grad_norm_max"):
        for step, value in scalars(ea, f"gradguard/{base}").items():
            assert scalars(ea, f"gradguard/{base}_log10")[step] == pytest.approx(math.log10(value), abs=1e-6)
    assert {"gradguard/grad_norm_log10", "gradguard/grad_norm_max_log10", "gradguard/lr"} <= written


def test_gradient_flow_image_every_n_logs_is_png(tb_run):
    from PIL import Image

    _, _, _, ea = tb_run
    images = ea.Images("gradguard/gradient_flow")
    assert [e.step for e in images] == [0, 6]  # logs at 0, 3, 6, 9; every 2nd log
    for e in images:
        assert e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(e.encoded_image_string))
        img.verify()
        assert (e.width, e.height) == img.size
        assert e.width > 100
        assert e.height > 100


# ---------------------------------------------------------------------------- clipping and shared statistics


def test_one_measurement_per_step_and_pre_clip_norm(tmp_path):
    capture = GradCapture()
    clip = AdaptiveGradientClipping(method="norm", max_norm=1e-4, log_every_n_steps=1)
    guard = NaNGuard(action="skip", log_every_n_steps=1)
    monitor = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0)
    # the clipper runs BEFORE the monitor, so a monitor that measured again would see the clipped gradients
    trainer = make_trainer(tmp_path, [capture, clip, guard, monitor], max_steps=5)
    trainer.fit(TinyRegression())
    assert context_for(trainer).cache.computations == 5
    ea = read_events(trainer.logger.log_dir)
    logged = scalars(ea, "gradguard/grad_norm")
    clipped = scalars(ea, "gradguard/grad_norm_clipped")
    assert sorted(logged) == [0, 1, 2, 3, 4]
    for step, value in logged.items():
        assert value == pytest.approx(reference_norm(capture.steps[step]), rel=1e-5)
        assert value > 100 * 1e-4  # far above the clip bound: really the pre-clip norm
        assert clipped[step] == pytest.approx(1e-4, rel=1e-3)


def test_monitor_measures_once_per_step_and_writes_on_logging_steps_only(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=4, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=10)
    trainer.fit(TinyRegression())
    # every step folds its norm into the interval maximum (on the device); nothing else is computed in between
    assert context_for(trainer).cache.computations == 10
    ea = read_events(trainer.logger.log_dir)
    assert sorted(scalars(ea, "gradguard/grad_norm")) == [0, 4, 8]
    assert sorted(scalars(ea, "gradguard/grad_norm_max")) == [0, 4, 8, 9]  # step 9: the fit's end


# ---------------------------------------------------------------------------- opt-in per-layer value histograms


def test_grad_value_histograms_only_when_enabled(tmp_path):
    capture = GradCapture()
    monitor = GradientNormMonitor(log_every_n_steps=2, log_grad_histograms=True, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [capture, monitor], max_steps=4)
    trainer.fit(TinyRegression())
    ea = read_events(trainer.logger.log_dir)
    layer_tags = sorted(t for t in ea.Tags()["histograms"] if t.startswith("gradguard/grads/"))
    assert layer_tags == ["gradguard/grads/net.0", "gradguard/grads/net.2", "gradguard/grads/net.4"]
    assert "gradguard/gradient_flow" not in ea.Tags()["images"]  # flow_every_n_logs=0: never
    for t in layer_tags:
        layer = t.removeprefix("gradguard/grads/")
        events = ea.Histograms(t)
        assert [e.step for e in events] == [0, 2]
        for e in events:
            values = torch.cat([g.reshape(-1) for n, (g, _) in capture.steps[e.step].items() if n.startswith(layer)])
            h = e.histogram_value
            assert h.num == values.numel()
            assert h.min == pytest.approx(float(values.min()), rel=1e-5)
            assert h.max == pytest.approx(float(values.max()), rel=1e-5)
            assert h.sum == pytest.approx(float(values.sum()), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------- other loggers


def _metrics_csv(logger: CSVLogger) -> dict[int, dict[str, str]]:
    rows: dict[int, dict[str, str]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v != ""})
    return rows


def test_csv_logger_gets_scalars(tmp_path):
    capture = GradCapture()
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = GradientNormMonitor(log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [capture, monitor], max_steps=6, logger=logger)
    trainer.fit(TinyRegression())
    rows = _metrics_csv(logger)
    logged = {s: float(r["gradguard/grad_norm"]) for s, r in rows.items() if "gradguard/grad_norm" in r}
    assert sorted(logged) == [0, 2, 4]
    for step, value in logged.items():
        assert value == pytest.approx(reference_norm(capture.steps[step]), rel=1e-5)
        assert float(rows[step]["gradguard/lr"]) == pytest.approx(0.01)
        assert float(rows[step]["gradguard/vanishing_layers"]) == 0.0


def test_two_loggers_at_once(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = GradientNormMonitor(log_every_n_steps=2, flow_every_n_logs=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, logger=[csv_logger, tb])
    trainer.fit(TinyRegression())
    ea = read_events(tb.log_dir)
    tb_norms = scalars(ea, "gradguard/grad_norm")
    rows = _metrics_csv(csv_logger)
    csv_norms = {s: float(r["gradguard/grad_norm"]) for s, r in rows.items() if "gradguard/grad_norm" in r}
    assert sorted(tb_norms) == sorted(csv_norms) == [0, 2]
    for step in tb_norms:
        assert tb_norms[step] == pytest.approx(csv_norms[step], rel=1e-6)
    assert [e.step for e in ea.Histograms("gradguard/layer_grad_norms")] == [0, 2]
    assert [e.step for e in ea.Images("gradguard/gradient_flow")] == [0, 2]
    assert len(ea.Tensors("custom_scalars__config__")) == 1


def test_no_logger_runs_and_says_so_once(tmp_path, caplog):
    monitor = GradientNormMonitor(log_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [monitor], max_steps=3, logger=False).fit(TinyRegression())
        make_trainer(tmp_path, [monitor], max_steps=5, logger=False).fit(TinyRegression())
    messages = [r.getMessage() for r in caplog.records if "has no logger" in r.getMessage()]
    assert len(messages) == 1
    assert "GradientNormMonitor" in messages[0]
    assert monitor.last_grad_norm is not None
    assert math.isfinite(monitor.last_grad_norm)
    assert monitor.last_step == 4


def test_progress_bar(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=5, progress_bar=True)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, logger=False)
    trainer.fit(TinyRegression())
    assert "grad_norm" in trainer.progress_bar_metrics
    assert "grad_norm" not in trainer.logged_metrics


# ---------------------------------------------------------------------------- vanishing / exploding


def deep_mlp(activation: type[nn.Module], he_init: bool, depth: int = 12) -> TinyRegression:
    model = TinyRegression(depth=depth, hidden=32, activation=activation, lr=0.01)
    if he_init:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return model


def test_deep_sigmoid_mlp_early_layers_vanish(tmp_path):
    # 12 sigmoid layers, PyTorch's default init: sigmoid' <= 1/4 and ||W|| ~ 0.6 shrink the gradient ~7x per layer.
    # Measured update ratios over 8 steps, seeds 0-2: net.0 <= 2.6e-10, net.2 <= 1.7e-9, net.4 <= 1.1e-8 (all well
    # under the default 1e-7); the output layer ~1e1. So the default threshold is used as is.
    monitor = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=5)
    with pytest.warns(UserWarning, match="vanishing") as record:
        trainer.fit(deep_mlp(nn.Sigmoid, he_init=False))
    assert {"net.0", "net.2", "net.4"} <= monitor.vanishing_layers
    assert "net.24" not in monitor.vanishing_layers  # the output layer learns
    warned = [str(w.message) for w in record if "vanishing" in str(w.message)]
    for layer in ("net.0", "net.2", "net.4"):
        assert sum(f"'{layer}'" in m for m in warned) == 1, layer  # one warning per layer
    ea = read_events(trainer.logger.log_dir)
    counts = scalars(ea, "gradguard/vanishing_layers")
    assert counts[0] == counts[1] == 0  # patience 3: flagged from the 3rd logged step on
    assert counts[2] >= 3
    assert counts[4] >= 3
    assert counts[2] == len([e for e in monitor.events if e["kind"] == "vanishing" and e["step"] == 2])
    text = ea.Tensors("gradguard/layer_health_events/text_summary")
    assert text[0].step == 2
    line = text[0].tensor_proto.string_val[0].decode()
    assert "step 2" in line
    assert "net.0" in line
    assert "vanishing" in line


def test_same_net_relu_he_init_has_no_vanishing_layers(tmp_path, recwarn):
    monitor = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=5)
    trainer.fit(deep_mlp(nn.ReLU, he_init=True))
    assert monitor.vanishing_layers == set()
    assert not [w for w in recwarn if "vanishing" in str(w.message)]
    ea = read_events(trainer.logger.log_dir)
    assert set(scalars(ea, "gradguard/vanishing_layers").values()) == {0.0}
    assert sorted(scalars(ea, "gradguard/vanishing_layers")) == [0, 1, 2, 3, 4]


def test_loss_spike_flags_exploding_layers_at_that_step(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0, exploding_warmup=3)
    trainer = make_trainer(tmp_path, [monitor], max_steps=10)
    with pytest.warns(UserWarning, match="exploding") as record:
        trainer.fit(TinyRegression(loss_scale_at={7: 1e4}))
    ea = read_events(trainer.logger.log_dir)
    counts = scalars(ea, "gradguard/exploding_layers")
    assert counts == {s: (3.0 if s == 7 else 0.0) for s in range(10)}
    assert {(e["step"], e["layer"]) for e in monitor.events if e["kind"] == "exploding"} == {
        (7, "net.0"),
        (7, "net.2"),
        (7, "net.4"),
    }
    assert monitor.exploding_layers == set()  # step 9 is healthy again: the spike did not poison the history
    assert sum("exploding" in str(w.message) for w in record) == 3
    (event,) = ea.Tensors("gradguard/layer_health_events/text_summary")
    assert event.step == 7
    assert event.tensor_proto.string_val[0].decode() == "step 7: exploding: net.0, net.2, net.4"


def test_nonfinite_grads_counted_not_histogrammed(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=1, exploding_warmup=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(TinyRegression(nan_at_steps=[3]))  # the last step: NaN reaches every layer
    ea = read_events(trainer.logger.log_dir)
    assert scalars(ea, "gradguard/nonfinite_layers") == {0: 0.0, 1: 0.0, 2: 0.0, 3: 3.0}
    assert math.isnan(scalars(ea, "gradguard/grad_norm")[3])
    assert [e.step for e in ea.Histograms("gradguard/layer_grad_norms")] == [0, 1, 2]  # nothing finite at step 3
    assert [e.step for e in ea.Images("gradguard/gradient_flow")] == [0, 1, 2, 3]
    detector = monitor._states[0].exploding
    assert int(detector.count.min()) == 3
    assert torch.isfinite(detector.running_norm()).all()
    assert monitor.exploding_layers == set()


# ---------------------------------------------------------------------------- resume and multiple optimizers


def test_detector_history_survives_resume(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=4)
    first = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [first, ckpt], max_steps=4, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="vanishing"):
        trainer.fit(deep_mlp(nn.Sigmoid, he_init=False))
    assert "net.0" in first.vanishing_layers
    streak = first._states[0].vanishing.streak.clone()

    second = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [second, ckpt], max_steps=5, enable_checkpointing=True)
    trainer.fit(deep_mlp(nn.Sigmoid, he_init=False), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # without the restored streaks a layer would need 3 new logged steps; here it is flagged at its first one
    assert "net.0" in second.vanishing_layers
    assert second.last_step == 4
    assert torch.equal(second._states[0].vanishing.streak[: len(streak)], streak + (streak > 0).long())
    assert not [e for e in second.events if e["kind"] == "vanishing"]  # already known: no new event or warning


class TwoOptimizers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss = nn.functional.mse_loss(self.head(torch.tanh(self.enc(x))), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.enc.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=0.002)

    def train_dataloader(self):
        return TinyRegression().train_dataloader()


def test_two_optimizers_get_suffixed_tags(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=2, flow_every_n_logs=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=8)  # 4 batches, 2 optimizer steps each
    trainer.fit(TwoOptimizers())
    ea = read_events(trainer.logger.log_dir)
    assert sorted(scalars(ea, "gradguard/grad_norm")) == [0, 4]  # optimizer 0 steps at global steps 0, 2, 4, 6
    assert sorted(scalars(ea, "gradguard/grad_norm_opt1")) == [1, 5]
    assert list(scalars(ea, "gradguard/lr").values()) == pytest.approx([0.1, 0.1])
    assert list(scalars(ea, "gradguard/lr_opt1").values()) == pytest.approx([0.002, 0.002])
    assert "gradguard/layer_grad_norms_opt1" in ea.Tags()["histograms"]
    assert "gradguard/gradient_flow_opt1" in ea.Tags()["images"]
    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["gradguard", "gradguard (optimizer 1)"]
    charts = {c.title: list(c.multiline.tag) for c in layout.category[1].chart}
    assert charts["learning rate"] == ["gradguard/lr_opt1$"]
    assert charts["grad norm vs clip threshold"] == [
        "gradguard/grad_norm_opt1$",
        "gradguard/grad_norm_max_opt1$",
        "gradguard/clip_threshold_opt1$",
    ]


# ---------------------------------------------------------------------------- state and validation


def test_state_dict_round_trip_loads_with_weights_only(tmp_path):
    monitor = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, logger=False)
    trainer.fit(TinyRegression())
    path = tmp_path / "state.pt"
    torch.save(monitor.state_dict(), path)
    state = torch.load(path, weights_only=True)
    other = GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=0)
    other.load_state_dict(state)
    a, b = monitor._states[0], other._states[0]
    assert a.logs == b.logs == 3
    assert a.exploding.names == b.exploding.names == ["net.0", "net.2", "net.4"]
    assert torch.equal(a.exploding.running_norm(), b.exploding.running_norm())
    assert torch.equal(a.vanishing.streak, b.vanishing.streak)
    assert other.last_grad_norm == monitor.last_grad_norm
    GradientNormMonitor().load_state_dict({})  # tolerant of missing keys


def test_state_key_distinguishes_configurations():
    assert GradientNormMonitor().state_key != GradientNormMonitor(norm_type=1.0).state_key


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"log_every_n_steps": 0}, ValueError, r"log_every_n_steps must be an int >= 1 or None, got 0"),
        ({"log_every_n_steps": 2.0}, TypeError, r"log_every_n_steps must be an int >= 1 or None"),
        ({"norm_type": 0}, ValueError, r"norm_type must be > 0 \(inf allowed\), got 0"),
        ({"norm_type": float("nan")}, ValueError, r"norm_type must be > 0"),
        ({"norm_type": "2"}, TypeError, r"norm_type must be a number"),
        ({"log_grad_histograms": 1}, TypeError, r"log_grad_histograms must be a bool, got int"),
        ({"flow_every_n_logs": -1}, ValueError, r"flow_every_n_logs must be an int >= 0 or None, got -1"),
        ({"flow_every_n_logs": "10"}, TypeError, r"flow_every_n_logs must be an int"),
        ({"vanishing_threshold": 0.0}, ValueError, r"vanishing_threshold must be finite and > 0, got 0.0"),
        ({"vanishing_threshold": float("inf")}, ValueError, r"vanishing_threshold must be finite and > 0"),
        ({"vanishing_patience": 0}, ValueError, r"vanishing_patience must be an int >= 1, got 0"),
        ({"vanishing_patience": True}, TypeError, r"vanishing_patience must be an int"),
        ({"exploding_factor": 1.0}, ValueError, r"exploding_factor must be finite and > 1, got 1.0"),
        ({"exploding_factor": None}, TypeError, r"exploding_factor must be a number"),
        ({"exploding_ema_decay": 1.0}, ValueError, r"exploding_ema_decay must be in \(0, 1\), got 1.0"),
        ({"exploding_ema_decay": 0}, ValueError, r"exploding_ema_decay must be in \(0, 1\), got 0"),
        ({"exploding_warmup": 0}, ValueError, r"exploding_warmup must be an int >= 1, got 0"),
        ({"exploding_z": -1.0}, ValueError, r"exploding_z must be finite and >= 0, got -1.0"),
        ({"exploding_z": math.inf}, ValueError, r"exploding_z must be finite and >= 0, got inf"),
        ({"progress_bar": "yes"}, TypeError, r"progress_bar must be a bool, got str"),
    ],
)
def test_argument_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientNormMonitor(**kwargs)


def test_inf_norm_type_accepted():
    assert GradientNormMonitor(norm_type=math.inf).norm_type == math.inf


# ---------------------------------------------------------------------------- pre-clip whatever the order


def _monitor_outputs(tmp_path, order):
    capture = GradCapture()
    made = {
        "monitor": GradientNormMonitor(log_every_n_steps=2, flow_every_n_logs=1, log_grad_histograms=True),
        "clip": AdaptiveGradientClipping("norm", max_norm=1e-3, log_every_n_steps=2),
        "guard": NaNGuard(action="skip", log_every_n_steps=2),
    }
    trainer = make_trainer(tmp_path, [capture, *(made[k] for k in order)], max_steps=5)
    torch.manual_seed(0)
    trainer.fit(TinyRegression())
    ea = read_events(trainer.logger.log_dir)
    hist = {
        t: [(e.step, e.histogram_value.min, e.histogram_value.max, e.histogram_value.sum) for e in ea.Histograms(t)]
        for t in ea.Tags()["histograms"]
    }
    images = [(e.step, e.encoded_image_string) for e in ea.Images("gradguard/gradient_flow")]
    monitor_scalars = {
        t: scalars(ea, t) for t in ("gradguard/grad_norm", "gradguard/grad_norm_max", "gradguard/grad_norm_mean")
    }
    return capture, monitor_scalars, hist, images, scalars(ea, "gradguard/grad_norm_clipped")


def test_monitor_shows_pre_clip_gradients_in_every_callback_order(tmp_path):
    import itertools

    orders = list(itertools.permutations(("monitor", "clip", "guard")))
    results = [_monitor_outputs(tmp_path / "-".join(o), o) for o in orders]
    capture, first_scalars, first_hist, first_images, clipped = results[0]
    assert list(clipped.values()) == pytest.approx([1e-3] * 3, rel=1e-3)  # the clipper really clipped, every log
    for _, other_scalars, other_hist, other_images, _ in results[1:]:
        assert other_scalars == first_scalars
        assert other_hist == first_hist
        assert other_images == first_images  # the same bars, drawn from the same pre-clip values
    # and what they show is the raw gradient, from an independent copy taken before any gradguard callback
    for step, (lo, hi, total) in ((s, (mn, mx, sm)) for s, mn, mx, sm in first_hist["gradguard/grads/net.0"]):
        g = torch.cat([capture.steps[step][n][0].reshape(-1) for n in ("net.0.weight", "net.0.bias")])
        assert (lo, hi) == (pytest.approx(float(g.min()), rel=1e-5), pytest.approx(float(g.max()), rel=1e-5))
        assert total == pytest.approx(float(g.sum()), rel=1e-4, abs=1e-7)
        assert float(g.norm()) > 10 * 1e-3  # far above what the clipper left
    assert sorted(s for s, _ in first_images) == [0, 2, 4]


# ---------------------------------------------------------------------------- spikes between log steps


def test_spike_between_log_steps_is_in_grad_norm_max_at_the_next_log(tmp_path):
    capture = GradCapture()
    monitor = GradientNormMonitor(log_every_n_steps=5, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [capture, monitor], max_steps=12)
    trainer.fit(TinyRegression(loss_scale_at={7: 1e3}))  # step 7 is not a logging step (0, 5, 10 are)
    true = {s: reference_norm(g) for s, g in capture.steps.items()}
    ea = read_events(trainer.logger.log_dir)
    logged = scalars(ea, "gradguard/grad_norm")
    assert sorted(logged) == [0, 5, 10]
    assert max(logged.values()) < true[7] / 100  # the plain norm misses the spike entirely
    top, mean = scalars(ea, "gradguard/grad_norm_max"), scalars(ea, "gradguard/grad_norm_mean")
    assert sorted(top) == [0, 5, 10, 11]  # each log covers the steps since the previous one; 11 is the fit's end
    for step, since in ((0, 0), (5, 1), (10, 6), (11, 11)):
        window = [true[s] for s in range(since, step + 1)]
        assert top[step] == pytest.approx(max(window), rel=1e-5)
        assert mean[step] == pytest.approx(sum(window) / len(window), rel=1e-5)
    assert top[10] == pytest.approx(true[7], rel=1e-5)


class DropAt(pl.Callback):
    """Marks a step as dropped in the shared step record, as NaNGuard does when it skips an update."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            step_record(trainer).dropped = True


class FailAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("stop here")


def test_norm_aggregates_are_written_at_a_dropped_step_and_when_the_fit_fails(tmp_path):
    capture = GradCapture()
    monitor = GradientNormMonitor(log_every_n_steps=5, flow_every_n_logs=0)
    trainer = make_trainer(tmp_path, [capture, monitor, DropAt(3), FailAt(8)], max_steps=20)
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.fit(TinyRegression(loss_scale_at={3: 50.0, 7: 1e3}))
    true = {s: reference_norm(g) for s, g in capture.steps.items()}
    assert sorted(true) == list(range(8))
    top = scalars(read_events(trainer.logger.log_dir), "gradguard/grad_norm_max")
    # 0 and 5: logs; 3: the dropped step (an event) shows the interval so far; 7: written when the fit failed
    assert sorted(top) == [0, 3, 5, 7]
    assert top[3] == pytest.approx(max(true[s] for s in (1, 2, 3)), rel=1e-5)
    assert top[5] == pytest.approx(max(true[s] for s in (4, 5)), rel=1e-5)
    assert top[7] == pytest.approx(true[7], rel=1e-5)


def test_interval_scalars_are_the_same_on_the_cpu_fast_paths_and_the_tensor_paths(tmp_path, monkeypatch):
    """The monitor folds the CPU fast path's host float32 total into its interval; the accelerators' way (tensors
    throughout) must log exactly the same values."""
    from lightning_gradguard.core.measure._grad_stats import GradStats
    from lightning_gradguard.core.measure._interval_stats import IntervalAggregate

    logged = []
    for fast in (True, False):
        monkeypatch.setattr(GradStats, "host_fast_path", fast)
        monkeypatch.setattr(IntervalAggregate, "host_fast_path", fast)
        monitor = GradientNormMonitor(log_every_n_steps=5, flow_every_n_logs=0)
        trainer = make_trainer(tmp_path / str(fast), [monitor], max_steps=12)
        torch.manual_seed(0)
        trainer.fit(TinyRegression(loss_scale_at={7: 1e3}))
        ea = read_events(trainer.logger.log_dir)
        logged.append({t: scalars(ea, f"gradguard/{t}") for t in ("grad_norm", "grad_norm_max", "grad_norm_mean")})
    assert logged[0] == logged[1]
    assert sorted(logged[0]["grad_norm_max"]) == [0, 5, 10, 11]


def test_the_default_flow_image_is_spaced_in_steps_not_logs(tmp_path):
    """An image takes tens of milliseconds to draw: every 10 logs was every 10 steps for a run logging every step
    (a small model's fit 5x slower). The default now spaces them about 500 steps apart: one image in 24 steps
    logged every step; at log_every_n_steps=250, every 2 logs."""
    monitor = GradientNormMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=24)
    trainer.fit(TinyRegression())
    ea = read_events(trainer.logger.log_dir)
    assert [e.step for e in ea.Images("gradguard/gradient_flow")] == [0]
    assert GradientNormMonitor(flow_every_n_logs=None).flow_every_n_logs is None
