"""The gradient-flow figure: per-layer |grad| statistics vs a reference, the rendered image, missing matplotlib."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch

from lightning_gradguard.callbacks import _gradient_flow as gradient_flow
from lightning_gradguard.callbacks._gradient_flow import layer_abs_stats, render_gradient_flow
from lightning_gradguard.core.measure._grad_stats import compute_grad_stats


def test_layer_abs_stats_match_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    model(torch.randn(7, 5)).pow(2).sum().backward()
    names, params = zip(*model.named_parameters())
    stats = compute_grad_stats(list(params), list(names))
    mean_abs, max_abs = layer_abs_stats(stats.grads, stats.layer_index, len(stats.layer_names))
    assert stats.layer_names == ["0", "2", "3"]
    for i, layer in enumerate(stats.layer_names):
        module = model[int(layer)]
        values = torch.cat([module.weight.grad.reshape(-1), module.bias.grad.reshape(-1)]).abs().double()
        assert float(mean_abs[i]) == pytest.approx(float(values.mean()), rel=1e-6)
        assert float(max_abs[i]) == pytest.approx(float(values.max()), rel=1e-6)


def test_layer_abs_stats_nan_marks_its_layer_only():
    grads = [torch.tensor([1.0, -3.0]), torch.tensor([math.nan]), torch.tensor([2.0]), torch.zeros(4)]
    mean_abs, max_abs = layer_abs_stats(grads, torch.tensor([0, 1, 1, 2]), 3)
    assert mean_abs[0] == 2.0
    assert max_abs[0] == 3.0
    assert math.isnan(mean_abs[1])
    assert math.isnan(max_abs[1])
    assert mean_abs[2] == max_abs[2] == 0.0


def test_render_returns_hwc_uint8_and_leaves_no_figures():
    image = render_gradient_flow(
        ["net.0", "net.2", "net.4", "net.6"], [1e-9, 1e-5, math.nan, 0.0], [1e-8, 1e-4, math.inf, 0.0], title="t"
    )
    assert image is not None
    assert image.dtype == np.uint8
    assert image.ndim == 3
    assert image.shape[2] == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100
    assert image.std() > 0  # something was drawn
    if "matplotlib.pyplot" in sys.modules:  # rendering never registers a pyplot figure
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_render_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="expected 2 values per series"):
        render_gradient_flow(["a", "b"], [1.0], [1.0, 2.0])


def test_missing_matplotlib_returns_none_with_one_warning(monkeypatch):
    monkeypatch.setattr(gradient_flow, "_warned_missing", False)
    # an entry of None in sys.modules makes the import raise ImportError, as when the package is absent
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.warns(UserWarning, match="matplotlib is not installed") as record:
        assert render_gradient_flow(["a"], [1.0], [1.0]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert render_gradient_flow(["a"], [1.0], [1.0]) is None  # no second warning
    assert len(record) == 1


def test_fit_without_matplotlib_skips_image_only(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_gradguard import GradientNormMonitor
    from tests.models import TinyRegression, make_trainer

    monkeypatch.setattr(gradient_flow, "_warned_missing", False)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    trainer = make_trainer(tmp_path, [GradientNormMonitor(log_every_n_steps=1, flow_every_n_logs=1)], max_steps=3)
    with pytest.warns(UserWarning, match="matplotlib is not installed") as record:
        trainer.fit(TinyRegression())
    assert sum("matplotlib" in str(w.message) for w in record) == 1
    ea = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "images": 0})
    ea.Reload()
    assert ea.Tags()["images"] == []
    assert [e.step for e in ea.Histograms("gradguard/layer_grad_norms")] == [0, 1, 2]
