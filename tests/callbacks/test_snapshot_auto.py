"""``snapshot="auto"`` (the default): in-memory snapshots while this rank's copies fit the snapshot budget, this
fit's checkpoint files once they would not, decided before any copy is made and said in a warning with the sizes.

The budget (``snapshot_budget_mb``) is set small here to make a tiny model "large"; its default is a quarter of the
machine's memory per local process.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_gradguard import GradGuard, NaNGuard
from lightning_gradguard.core.recover._snapshot import memory_budget, state_nbytes
from tests.compat.common import StateRecorder, assert_restored, seeded
from tests.models import make_trainer


def _weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_the_default_is_auto_and_a_small_model_keeps_memory_snapshots(tmp_path) -> None:
    guard = NaNGuard(action="rollback", snapshot_every_n_steps=2, snapshot_confirm_steps=1)
    assert guard.snapshot == "auto"
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [guard, rec], max_steps=10)
    with _no_budget_warning():
        trainer.fit(seeded(nan_at_steps=[7]))
    (event,) = guard.events
    assert (event["kind"], event.get("snapshot_path")) == ("rollback", None)  # an in-memory snapshot
    assert guard.snapshot_source == "memory"
    assert_restored(rec.states[8], rec.states[event["snapshot_step"]], lr_ratio=event["lr_scale"])


def test_over_the_budget_rollbacks_come_from_this_fits_checkpoint_files(tmp_path) -> None:
    guard = NaNGuard(action="rollback", snapshot_confirm_steps=1, snapshot_every_n_steps=2, snapshot_budget_mb=1e-4)
    rec = StateRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [guard, rec, ckpt], max_steps=12, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"snapshot='auto'\): one in-memory snapshot of this state takes .* MiB"):
        trainer.fit(seeded(nan_at_steps=[9]))
    assert guard.snapshot_source == "checkpoint"
    assert guard.engine.snapshot_ms is None  # not one in-memory snapshot was taken, not even of the start state
    (event,) = guard.events
    assert event["kind"] == "rollback"
    assert event["snapshot_step"] in (4, 6, 8)
    assert f"step={event['snapshot_step']}.ckpt" in event["snapshot_path"]
    assert_restored(rec.states[10], rec.states[event["snapshot_step"]], lr_ratio=event["lr_scale"])


def test_a_state_that_outgrows_the_budget_switches_once_and_keeps_what_it_had(tmp_path) -> None:
    model = seeded(nan_at_steps=[9])
    weights = _weights_bytes(model)
    # three copies of the weights fit (the start state: Adam has no moments yet); three with the moments do not
    budget_mb = 4 * weights / 2**20
    guard = NaNGuard(
        action="rollback", snapshot_every_n_steps=2, snapshot_confirm_steps=1, snapshot_budget_mb=budget_mb
    )
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [guard, rec], max_steps=12)
    with pytest.warns(UserWarning, match="above the snapshot budget") as seen:
        trainer.fit(model)
    assert len([w for w in seen if "snapshot budget" in str(w.message)]) == 1  # said once, at the switch
    (event,) = guard.events
    # no checkpoint file exists: the start state, which fit the budget, is the rollback target (and says so)
    assert (event["kind"], event["snapshot_step"]) == ("rollback", 0)
    assert "used the in-memory start state of step 0" in event["reason"]
    assert_restored(rec.states[10], rec.states[0], lr_ratio=event["lr_scale"])


def test_plain_loop_over_the_budget_takes_no_snapshot_and_skips_instead(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="above the snapshot budget"):  # the start state is not copied either
        guard = GradGuard(model, opt, action="rollback", announce=False, snapshot_budget_mb=1e-6)

    def train() -> None:
        for step in range(6):
            loss = model(torch.randn(4, 8)).pow(2).mean() * (float("nan") if step == 3 else 1.0)
            loss.backward()
            if guard.before_step(loss):
                opt.step()
            guard.after_step()
            opt.zero_grad()

    train()
    assert [(e["step"], e["kind"]) for e in guard.events] == [(3, "skip")]
    assert "no trusted snapshot" in guard.events[0]["reason"]
    assert guard.engine.snapshot_bytes() == 0


def test_state_bytes_count_and_default_budget() -> None:
    model = nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters())
    assert state_nbytes(model, [opt]) == _weights_bytes(model)  # no moments before the first step
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    moments = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    assert state_nbytes(model, [opt]) == _weights_bytes(model) + moments
    tied = nn.Module()
    tied.a = nn.Linear(4, 4, bias=False)
    tied.b = tied.a  # the same tensors under two names count once
    assert state_nbytes(tied) == 64
    assert 0 < memory_budget(2) < memory_budget(1)


class _no_budget_warning:  # noqa: N801 - a context manager used like pytest.warns
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.seen = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert not [w for w in self.seen if "snapshot budget" in str(w.message)]
        return False
