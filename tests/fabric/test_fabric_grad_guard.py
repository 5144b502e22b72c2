"""FabricGradGuard: the example's Fabric loop in one process (same result as the plain loop) and on 2 CPU processes
with ``Fabric(accelerator="cpu", devices=2)`` DDP in a subprocess (bounded time)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from lightning_gradguard import FabricGradGuard
from tests.ddp_runner import launcher_env, run_on_free_port
from tests.plain.test_examples import EXPECTED_EVENTS, load_example

REPO = Path(__file__).resolve().parents[2]


def test_fabric_loop_matches_the_plain_loop_and_is_rescued() -> None:
    fabric_example = load_example("fabric_guarded")
    plain_example = load_example("plain_torch")
    fabric = Fabric(accelerator="cpu", devices=1)
    guarded = fabric_example.train(fabric, True)
    unguarded = fabric_example.train(fabric, False)
    plain = plain_example.train(True)
    assert math.isnan(unguarded["test_mse"])
    assert [list(e) for e in guarded["events"]] == EXPECTED_EVENTS
    assert guarded["test_mse"] == pytest.approx(plain["test_mse"], rel=1e-6)


def test_fabric_arguments_are_checked() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="FabricGradGuard: fabric must be a lightning.fabric.Fabric, got str"):
        FabricGradGuard("cpu", model, opt)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="GradGuard: action must be one of"):
        FabricGradGuard(Fabric(accelerator="cpu", devices=1), model, opt, action="retry")
    with pytest.raises(TypeError, match="FabricGradGuard: scaler comes from the Fabric .* do not pass them"):
        FabricGradGuard(Fabric(accelerator="cpu", devices=1), model, opt, scaler="yes")
    with pytest.raises(TypeError, match="GradGuard: writer must be a TensorBoard SummaryWriter"):
        FabricGradGuard(Fabric(accelerator="cpu", devices=1), model, opt, writer=object())


@pytest.mark.ddp
def test_fabric_ddp_two_processes_agree(tmp_path: Path) -> None:
    out = tmp_path / "fabric"
    cmd = [
        sys.executable,
        str(REPO / "examples" / "fabric_guarded.py"),
        "--devices",
        "2",
        "--guarded",
        "--json",
        str(out),
    ]
    proc = run_on_free_port(lambda _port: cmd, launcher_env(), timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (json.loads(Path(f"{out}.rank{r}").read_text())[0] for r in (0, 1))
    assert rank1["events"] == EXPECTED_EVENTS
    assert [e[:2] for e in rank0["events"]] == [e[:2] for e in EXPECTED_EVENTS]  # same actions, same steps
    assert {e[2] for e in rank0["events"]} == {"nonfinite_grad"}  # rank 0's own view: the all-reduced gradients
    assert rank0["weights"] == rank1["weights"]
    assert rank0["test_mse"] == rank1["test_mse"] < 0.05
    # each event announced once, by global rank zero (its own view of the cause)
    announced = [line for line in (proc.stdout + proc.stderr).splitlines() if "GradGuard " in line]
    assert len(announced) == len(EXPECTED_EVENTS)
    for line, (step, _, _) in zip(announced, EXPECTED_EVENTS):
        assert line.startswith(f"FabricGradGuard skip at step {step}: nonfinite grad")
