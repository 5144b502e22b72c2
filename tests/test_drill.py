"""FaultDrill (issue 27, a drill): faults injected into a real fit, the table of what the guard did, the argument
checks, and the callback configured from a LightningCLI YAML file.

Every verdict below is a category (an action, a diagnosis, yes/no with the drill's margins), never a loss value.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins import MixedPrecision

from lightning_gradguard import FaultDrill, NaNGuard, default_callbacks
from lightning_gradguard.drill import FAULTS, check_faults, recovery_verdict
from tests.models import TinyRegression, make_trainer

FAULT_STEPS = {"nan_weight": 30, "nan_batch": 60, "inf_loss": 90, "spike": 120, "transient": 148, "bad_batches": 180}
# fault -> (the guard's action, its rerun diagnosis); the spike is clipped, or skipped
EXPECTED = {
    "nan_batch": ({"skip"}, "data"),
    "inf_loss": ({"skip"}, "transient"),
    "spike": ({"clip", "skip"}, None),
    "nan_weight": ({"rollback"}, "state"),
    "transient": ({"skip"}, "transient"),
    "bad_batches": ({"skip"}, "data"),
}


def _guarded(**guard: object) -> list:
    # frequent snapshots: a rollback on this 8-batch dataset loses a few steps, not fifty
    return default_callbacks(guard_kwargs={"snapshot_every_n_steps": 5, "snapshot_confirm_steps": 2, **guard})


def _fit(tmp_path, drill: FaultDrill, max_steps: int, **trainer_kwargs):
    torch.manual_seed(0)
    model = TinyRegression()
    trainer = make_trainer(tmp_path, [*_guarded(), drill], max_steps=max_steps, logger=False, **trainer_kwargs)
    trainer.fit(model)
    return trainer


@pytest.fixture(scope="module")
def drilled(tmp_path_factory):
    drill = FaultDrill(FAULT_STEPS, recovery_steps=25, print_report=False)
    _fit(tmp_path_factory.mktemp("drill"), drill, max_steps=210)
    return drill


@pytest.mark.parametrize("fault", list(FAULT_STEPS))
def test_each_fault_is_handled_as_expected(drilled: FaultDrill, fault: str) -> None:
    (row,) = [r for r in drilled.table() if r["fault"] == fault]
    actions, diagnosis = EXPECTED[fault]
    assert row["injected"]
    assert row["step"] == FAULT_STEPS[fault]
    assert set(row["kinds"]) & actions, row
    assert row["diagnosis"] == diagnosis or (diagnosis is None and fault == "spike"), row
    assert row["as_expected"] is True
    assert row["recovered"] is True, row
    assert row["handled"] is True
    if fault == "bad_batches":
        assert row["steps"] == (180, 181, 182)
        assert "x3" in row["guard"]


def test_report_lists_every_fault(drilled: FaultDrill) -> None:
    text = drilled.report()
    for fault in FAULT_STEPS:
        assert fault in text
    assert "6 of 6 injected faults handled" in text
    assert drilled.all_handled


def test_report_is_printed_at_the_end_of_the_fit(tmp_path, capsys) -> None:
    _fit(tmp_path, FaultDrill({"nan_batch": 10}, recovery_steps=10), max_steps=25)
    out = capsys.readouterr().out
    assert "FaultDrill: what the guard did" in out
    assert "skip (nonfinite_loss, diagnosis data)" in out


def test_training_step_is_restored_after_the_fit(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyRegression()
    trainer = make_trainer(
        tmp_path,
        [*_guarded(), FaultDrill({"spike": 5}, recovery_steps=5, print_report=False)],
        max_steps=12,
        logger=False,
    )
    trainer.fit(model)
    assert "training_step" not in model.__dict__


def test_scale_collapse_with_a_grad_scaler(tmp_path) -> None:
    drill = FaultDrill({"scale_collapse": 30}, recovery_steps=20, print_report=False)
    _fit(tmp_path, drill, max_steps=55, plugins=[MixedPrecision("16-mixed", "cpu")])
    (row,) = drill.table()
    assert row["injected"]
    assert row["cause"] == "amp_scale_collapse"
    assert set(row["kinds"]) & {"skip", "rollback"}
    assert row["handled"], row


def test_scale_collapse_without_a_grad_scaler_is_skipped_with_a_reason(tmp_path) -> None:
    drill = FaultDrill({"scale_collapse": 5, "nan_batch": 8}, recovery_steps=5, print_report=False)
    with pytest.warns(UserWarning, match="scale_collapse is skipped: no GradScaler"):
        _fit(tmp_path, drill, max_steps=20)
    rows = {r["fault"]: r for r in drill.table()}
    assert not rows["scale_collapse"]["injected"]
    assert "16-mixed" in rows["scale_collapse"]["note"]
    assert rows["nan_batch"]["handled"]
    assert drill.all_handled  # a fault that does not apply is not a failure


def test_a_guard_without_rerun_cannot_confirm_the_diagnosis(tmp_path) -> None:
    drill = FaultDrill({"transient": 10}, recovery_steps=10, print_report=False)
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [NaNGuard(rerun=False), drill], max_steps=25, logger=False)
    trainer.fit(TinyRegression())
    (row,) = drill.table()
    assert row["kinds"] == ("skip",)
    assert row["as_expected"] is None
    assert "rerun=False" in row["note"]


def test_without_a_guard_nothing_is_handled(tmp_path) -> None:
    drill = FaultDrill({"nan_batch": 5}, recovery_steps=5, print_report=False)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no NaNGuard"):
        make_trainer(tmp_path, [drill], max_steps=15, logger=False).fit(TinyRegression())
    (row,) = drill.table()
    assert row["injected"]
    assert not row["handled"]
    assert row["guard"] == "nothing (no NaNGuard)"
    assert row["recovered"] is False  # NaN weights: the loss never comes back


def test_faults_after_the_end_are_reported_not_injected(tmp_path) -> None:
    drill = FaultDrill({"nan_batch": 5, "transient": 100}, recovery_steps=5, print_report=False)
    with pytest.warns(UserWarning, match="ends the fit before transient at 100"):
        _fit(tmp_path, drill, max_steps=15)
    rows = {r["fault"]: r for r in drill.table()}
    assert not rows["transient"]["injected"]
    assert "not reached" in rows["transient"]["note"]


@pytest.mark.parametrize(
    ("faults", "error", "match"),
    [
        ([("nan_batch", 3)], TypeError, "faults must be a mapping"),
        ({}, ValueError, "faults is empty"),
        ({"nan": 3}, ValueError, "unknown fault 'nan'; the faults are 'nan_batch', 'inf_loss'"),
        ({1: 3}, TypeError, "keys must be fault names"),
        ({"nan_batch": -1}, ValueError, r"faults\['nan_batch'\] steps must be >= 0, got -1"),
        ({"nan_batch": 2.5}, TypeError, r"faults\['nan_batch'\] must be a step"),
        ({"nan_batch": True}, TypeError, r"faults\['nan_batch'\] must be a step"),
        ({"nan_batch": []}, ValueError, "at least one step"),
        ({"nan_batch": [3, "4"]}, TypeError, "must hold int steps"),
        ({"nan_batch": [3, 3]}, ValueError, "names a step twice"),
        ({"bad_batches": [3, 5]}, ValueError, "at least two consecutive steps"),
        ({"bad_batches": [3]}, ValueError, "at least two consecutive steps"),
        ({"nan_batch": 3, "spike": 3}, ValueError, "'nan_batch' and 'spike' are both at step 3"),
        ({"scale_collapse": 0}, ValueError, "must be >= 1 .the GradScaler"),
    ],
)
def test_bad_faults_are_refused_with_the_argument_named(faults, error, match) -> None:
    with pytest.raises(error, match=match):
        FaultDrill(faults)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"recovery_steps": 2}, ValueError, "recovery_steps must be an int >= 5, got 2"),
        ({"recovery_steps": 10.0}, TypeError, "recovery_steps must be an int >= 5"),
        ({"tolerance": 0.5}, ValueError, "tolerance"),
        ({"tolerance": "1"}, TypeError, "tolerance"),
        ({"print_report": "yes"}, TypeError, "print_report"),
    ],
)
def test_bad_options_are_refused(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        FaultDrill({"nan_batch": 3}, **kwargs)


def test_every_fault_name_is_accepted() -> None:
    faults = {name: 10 * (i + 1) for i, name in enumerate(FAULTS)}
    assert set(check_faults(faults)) == set(FAULTS)
    assert check_faults({"bad_batches": 7})["bad_batches"] == (7, 8, 9)


def test_recovery_verdict_has_margins() -> None:
    assert recovery_verdict([1.0] * 5, [1.05] * 5, tolerance=1.1)
    assert not recovery_verdict([1.0] * 5, [1.2] * 5, tolerance=1.1)
    assert recovery_verdict([0.002, 0.006], [0.005], tolerance=1.1)  # within the before-window's own noise
    assert recovery_verdict([float("nan"), 1.0], [0.9], tolerance=1.1)
    assert recovery_verdict([1.0], [float("inf")], tolerance=1.1) is False
    assert recovery_verdict([], [1.0], tolerance=1.1) is None


def test_state_dict_round_trips() -> None:
    drill = FaultDrill({"nan_batch": 3})
    drill.losses, drill.fired, drill.clips = {1: 0.5}, {3: ""}, {3: 0.01}
    other = FaultDrill({"nan_batch": 3})
    other.load_state_dict(drill.state_dict())
    assert (other.losses, other.fired, other.clips) == ({1: 0.5}, {3: ""}, {3: 0.01})
    other.load_state_dict({})  # tolerant of missing keys
    assert other.losses == {}


def test_drill_from_a_lightning_cli_yaml(tmp_path) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 30,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning_gradguard.NaNGuard", "init_args": {"snapshot_every_n_steps": 5}},
                {
                    "class_path": "lightning_gradguard.FaultDrill",
                    "init_args": {
                        "faults": {"nan_batch": 8, "bad_batches": [12, 13], "transient": [16]},
                        "recovery_steps": 10,
                        "print_report": False,
                    },
                },
            ],
        },
    }
    path = tmp_path / "drill.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(TinyRegression, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})
    (drill,) = [c for c in cli.trainer.callbacks if isinstance(c, FaultDrill)]
    assert drill.faults == {"nan_batch": (8,), "bad_batches": (12, 13), "transient": (16,)}
    assert drill.recovery_steps == 10
    assert [r["fault"] for r in drill.table() if r["handled"]] == ["nan_batch", "bad_batches", "transient"]


def test_a_bad_fault_in_yaml_fails_before_training(tmp_path) -> None:
    config = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "callbacks": [{"class_path": "lightning_gradguard.FaultDrill", "init_args": {"faults": {"nan": 3}}}],
        }
    }
    path = tmp_path / "drill.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises((ValueError, SystemExit)):
        LightningCLI(TinyRegression, args=["fit", "--config", str(path)], run=False)


def test_a_state_fault_does_not_put_its_batch_on_the_bad_batch_record(tmp_path) -> None:
    # TinyRegression has 8 batches per epoch: step 38 meets the batch of step 30 again
    drill = FaultDrill({"nan_weight": 30, "transient": 38}, recovery_steps=10, print_report=False)
    _fit(tmp_path, drill, max_steps=50)
    rows = {r["fault"]: r for r in drill.table()}
    assert rows["transient"]["diagnosis"] == "transient", rows["transient"]
    assert not drill.other_events()
