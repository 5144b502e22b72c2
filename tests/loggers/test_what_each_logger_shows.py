"""What TensorBoard, CSVLogger and MLflow users see from one guarded fit (README "What each logger shows").

One real fit writes to the three loggers at once (MLflow through its offline file store in ``tmp_path``); each test
reads one logger back with that logger's own reader (TensorBoard's ``EventAccumulator``, the ``csv`` module,
``MlflowClient``) and compares it with the others: every ``gradguard/`` scalar reaches every logger with the same
steps and values, histograms, images, text and the custom-scalars layout reach TensorBoard only.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import default_callbacks
from tests.models import TinyRegression, loader

mlflow = pytest.importorskip("mlflow", reason="install the dev extra (mlflow-skinny) for the MLflow checks")

NAN_STEP = 12
EVERY = 5
STEPS = 30
# a stable subset: the three callbacks may add tags, these are the README's promises
PROMISED = (
    "gradguard/grad_norm",
    "gradguard/lr",
    "gradguard/clip_threshold",
    "gradguard/clip_fraction",
    "gradguard/skipped_steps",
    "gradguard/rollbacks",
    "gradguard/lr_scale",
)
Series = dict[str, list[tuple[int, float]]]


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as mp:
        # MLflow 3 refuses the plain-file tracking store unless asked; it is the offline store that needs no server
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        tb = TensorBoardLogger(root, name="tb")
        csv_logger = CSVLogger(root, name="csv")
        ml = MLFlowLogger(experiment_name="gradguard", tracking_uri=f"file:{root / 'mlruns'}")
        trainer = pl.Trainer(
            max_steps=STEPS,
            logger=[tb, csv_logger, ml],
            log_every_n_steps=EVERY,
            callbacks=default_callbacks(progress_bar=False, guard="skip"),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(TinyRegression(nan_at_steps=[NAN_STEP]), loader(n=256))
        client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{root / 'mlruns'}")
        ml_keys = sorted(client.get_run(ml.run_id).data.metrics)
        ml_series = {k: [(m.step, m.value) for m in client.get_metric_history(ml.run_id, k)] for k in ml_keys}
    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tb_series = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    csv_series: Series = defaultdict(list)
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    csv_series[key].append((int(row["step"]), float(value)))
    return {"tb": tb_series, "tb_tags": acc.Tags(), "csv": dict(csv_series), "mlflow": ml_series}


def _gradguard(series: Series) -> Series:
    return {k: sorted(v) for k, v in series.items() if k.startswith("gradguard/")}


def _same(a: Series, b: Series) -> None:
    assert set(a) == set(b)
    for key in a:
        assert [s for s, _ in a[key]] == [s for s, _ in b[key]], key
        for (_, x), (_, y) in zip(a[key], b[key]):
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12) or (math.isnan(x) and math.isnan(y)), key


def test_every_gradguard_scalar_reaches_every_logger_with_the_same_steps_and_values(logged: dict[str, Any]) -> None:
    tb, csv_s, ml = (_gradguard(logged[k]) for k in ("tb", "csv", "mlflow"))
    assert set(PROMISED) <= set(tb)
    _same(tb, csv_s)  # TensorBoard stores float32: compared to 1e-6
    _same(csv_s, ml)


def test_step_axis_is_the_optimizer_step_and_events_are_written_when_they_happen(logged: dict[str, Any]) -> None:
    for series in (logged["csv"], logged["mlflow"]):
        norm_steps = [s for s, _ in sorted(series["gradguard/grad_norm"])]
        # the 0-based optimizer step (trainer.global_step when the step is taken), every EVERY-th step
        assert norm_steps[0] < EVERY
        grid = [s for s in norm_steps if (s - norm_steps[0]) % EVERY == 0]
        assert all(b - a == EVERY for a, b in zip(grid, grid[1:]))
        # and the last value again at the event's step (issue 26: no chart ends before the run did)
        assert set(norm_steps) - set(grid) == {NAN_STEP}
        skipped = dict(sorted(series["gradguard/skipped_steps"]))
        assert skipped[NAN_STEP] == 1.0, "the skip is written at the step it happened, between two log steps"
        assert all(v == 0.0 for s, v in skipped.items() if s < NAN_STEP)
        assert all(v == 1.0 for s, v in skipped.items() if s >= NAN_STEP)


def test_histograms_images_text_and_layout_are_tensorboard_only(logged: dict[str, Any]) -> None:
    tags = logged["tb_tags"]
    tb_only = set(tags["histograms"]) | set(tags["images"]) | {t.split("/text_summary")[0] for t in tags["tensors"]}
    assert {"gradguard/layer_grad_norms", "gradguard/update_ratio", "gradguard/gradient_flow"} <= tb_only
    assert "gradguard/nan_guard_events" in tb_only
    assert "custom_scalars__config__" in tags["tensors"]
    for other in ("csv", "mlflow"):
        assert not tb_only & set(logged[other]), f"{other} received a TensorBoard-only item"


def test_the_plain_guard_writes_the_callbacks_tags(logged: dict[str, Any], tmp_path: Path) -> None:
    """GradGuard's SummaryWriter output uses the Trainer callbacks' tag names (none of its own)."""
    import torch
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard import GradGuard

    model = TinyRegression()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    writer = SummaryWriter(str(tmp_path))
    guard = GradGuard(model, opt, clipping="zscore", action="skip", writer=writer, log_every_n_steps=EVERY)
    for step, (x, y) in enumerate(loader(n=256)):
        loss = nn.functional.mse_loss(model(x), y) * (float("nan") if step == NAN_STEP else 1.0)
        loss.backward()
        if guard.before_step(loss):
            opt.step()
        guard.after_step()
        opt.zero_grad()
    guard.close()
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    plain_scalars = set(acc.Tags()["scalars"])
    assert set(PROMISED) <= plain_scalars
    assert plain_scalars <= set(logged["tb"]), f"tags the callbacks do not write: {plain_scalars - set(logged['tb'])}"
    text = {t.split("/text_summary")[0] for t in acc.Tags()["tensors"]}
    assert text == {"gradguard/nan_guard_events"}
