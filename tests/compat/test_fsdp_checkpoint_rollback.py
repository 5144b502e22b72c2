"""``NaNGuard(snapshot="checkpoint")`` under FSDP2 (``ModelParallelStrategy``): rollbacks from this fit's distributed
checkpoints (directories of DCP shards plus ``meta.pt``).

The 2-process run (``fsdp_checkpoint_rollback_script.py``, one subprocess launch) proves that with a fault on rank 1
only both ranks roll back together to the newest confirmed distributed checkpoint of this fit, the event naming the
directory, each rank's local shards of the weights and of the Adam state right after the rollback equal to those the
checkpoint holds (a DCP load of it into a fresh copy, and the state recorded when it was saved) bit for bit, the
schedule restored from ``meta.pt`` and the LR cut applied; that damaged directories (a missing or truncated shard
file, a garbage ``meta.pt``) are passed over for an older one, and that another run's directory in the same
``dirpath``, newer and of a higher step, is never used. Single-process checks cover the cheap per-candidate checks
and a run resumed from a directory.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_gradguard.callbacks._checkpoint_snapshots import CheckpointSnapshots, _missing_shards
from tests.ddp_runner import run_ddp_script

SCRIPT = Path(__file__).with_name("fsdp_checkpoint_rollback_script.py")
TARGET = 8  # the checkpoint the second fault rolls back to (the script's TARGET)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_ckpt")
    proc = run_ddp_script(SCRIPT, out, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = sorted((json.loads(f.read_text()) for f in out.glob("main_rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], proc.stderr[-3000:]
    states = [torch.load(out / f"main_rank{r}.pt", weights_only=True) for r in (0, 1)]
    return ranks, states


def _equal(a, b) -> bool:
    """Nested dicts of tensors (and plain values) equal bit for bit."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_both_ranks_roll_back_to_the_newest_confirmed_distributed_checkpoint_of_this_fit(run):
    ranks, states = run
    r0, r1 = ranks
    for r in ranks:
        first, second = r["events"]
        # step 5: nothing usable (the other run's, a garbage meta.pt, a missing shard): the in-memory start state
        assert (first["step"], first["kind"], first["snapshot_step"]) == (5, "rollback", 0)
        assert first["snapshot_path"] is None
        assert "no usable checkpoint file" in first["reason"]
        assert f"{r['foreign']}: not written by this run" in first["reason"]
        assert f"{r['mine']['2']}: meta.pt unreadable" in first["reason"]
        assert f"{r['mine']['4']}: shard file __1_0.distcp missing" in first["reason"]
        # step 11: the step-8 directory of this fit, named in the event
        assert (second["step"], second["kind"], second["snapshot_step"]) == (11, "rollback", TARGET)
        assert second["snapshot_path"] == r["mine"][str(TARGET)]
        assert second["lr_scale"] == 0.25  # the checkpoint's 0.5, cut once more
        # the newer directories it passed over, and why, are in the event too
        assert f"passed over: {r['foreign']}: not written by this run" in second["reason"]
        assert f"{r['mine']['10']}: shard file __0_0.distcp truncated" in second["reason"]
        assert r["global_step"] == 12
    assert [{k: e[k] for k in ("step", "kind", "snapshot_step", "snapshot_path")} for e in r0["events"]] == [
        {k: e[k] for k in ("step", "kind", "snapshot_step", "snapshot_path")} for e in r1["events"]
    ]
    # the same candidates, in the same order, passed over for the same reasons on both ranks
    assert r0["passed_over"] == r1["passed_over"]
    (foreign, truncated) = r0["passed_over"]
    assert foreign == f"{r0['foreign']}: not written by this run"  # newest mtime, highest step: never used
    assert truncated.startswith(f"{r0['mine']['10']}: shard file __0_0.distcp truncated")


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_local_shards_after_the_rollback_equal_the_checkpoint_bit_for_bit(run):
    ranks, states = run
    for r, s in zip(ranks, states):
        after = s["states"][12]  # right after the rollback done at the end of step 11 (global_step 12)
        assert _equal(after["weights"], s["dcp_target"]["weights"])
        assert _equal(after["opt"], s["dcp_target"]["opt"])
        assert _equal(after, s["states"][TARGET])  # as recorded when the checkpoint was written
        adam = next(iter(after["opt"].values()))
        assert {"step", "exp_avg", "exp_avg_sq"} <= adam.keys()
        assert float(adam["step"]) > 0  # real Adam state
        assert all(torch.isfinite(t).all() for t in after["weights"].values())
        # the schedule comes back from meta.pt, then the LR is cut by lr_factor (0.5)
        # (2 steps since the rollback to the start state at step 5; the scheduler had taken 5 more before step 11's)
        assert r["sched"]["12"] == r["sched"][str(TARGET)] == 2
        assert r["sched"]["11"] == 5
        assert r["lr"]["12"] == pytest.approx(r["lr"][str(TARGET)] * 0.5, rel=1e-12)
    # rank 1's piece of net.4.weight (16 inputs over 2 ranks) and both ranks' shards differ: really local shards
    w0, w1 = (s["states"][12]["weights"]["net.0.weight"] for s in states)
    assert not torch.equal(w0, w1)


# ------------------------------------------------------------------ single process: the cheap checks


def _write_checkpoint(path: Path, run_id: str, step: int) -> None:
    from torch.distributed.checkpoint import FileSystemWriter, save

    state = {"state_dict": {"w": torch.arange(64, dtype=torch.float32)}}
    save(state, storage_writer=FileSystemWriter(str(path)), no_dist=True)
    meta = {"global_step": step, "callbacks": {"NaNGuard{'action': 'rollback'}": {"run_id": run_id, "lr_scale": 0.5}}}
    torch.save(meta, path / "meta.pt")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cheap_checks_of_a_distributed_checkpoint(tmp_path):
    files = CheckpointSnapshots()
    path = tmp_path / "epoch=0-step=4.ckpt"
    _write_checkpoint(path, files.run_id, 4)
    meta, why = files._check_directory(path, lambda step: True)
    assert why is None
    assert meta["global_step"] == 4
    assert files._check_directory(path, lambda step: step < 4)[1] == "step 4 not yet confirmed"
    other = CheckpointSnapshots()
    assert other._check_directory(path, lambda step: True)[1] == "not written by this run"
    (shard,) = path.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:-8])
    assert f"shard file {shard.name} truncated" in _missing_shards(path)
    shard.unlink()
    assert _missing_shards(path) == f"shard file {shard.name} missing"
    (path / ".metadata").unlink()
    assert _missing_shards(path).startswith("DCP metadata unreadable")
    (path / "meta.pt").write_bytes(b"not a pickle")
    assert files._check_directory(path, lambda step: True)[1].startswith("meta.pt unreadable")
    (path / "meta.pt").unlink()
    assert files._check_directory(path, lambda step: True)[1] == "no meta.pt"
    assert "only distributed checkpoints" in files._check_directory(tmp_path / "x.ckpt", lambda s: True)[1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_fit_resumed_from_a_directory_accepts_it(tmp_path):
    path = tmp_path / "epoch=0-step=4.ckpt"
    _write_checkpoint(path, "an earlier run", 4)
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), ckpt_path=str(path))
    files = CheckpointSnapshots()
    files.start(trainer)
    assert files.resumed_from == os.path.realpath(path)
    assert files.checkpoints() == [path]
    meta, why = files._check_directory(path, lambda step: True)
    assert why is None  # another run id, but the directory this fit resumed from


def test_setup_warns_that_full_state_files_under_model_parallel_are_not_used():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_gradguard.callbacks._checkpoint_snapshots import check_checkpointing

    saver = ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)
    full = SimpleNamespace(
        checkpoint_callbacks=[saver], strategy=ModelParallelStrategy(save_distributed_checkpoint=False)
    )
    with pytest.warns(UserWarning, match="save_distributed_checkpoint=False"):
        check_checkpointing(full, 1)
    sharded = SimpleNamespace(checkpoint_callbacks=[saver], strategy=ModelParallelStrategy())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_checkpointing(sharded, 1)  # distributed checkpoints (the default): accepted without a word
    assert not caught
