"""fit -> checkpoint -> resume with ``ckpt_path``, compared with the same run done in one go.

What this proves: with all three callbacks, a run interrupted after 6 steps and resumed from its checkpoint is the
uninterrupted run, exactly: clipping thresholds and running statistics, the guard's counters, events, LR scale and
norm/loss history, the monitor's state, the LR schedule (with the guard's cut) and the final weights. Faults before
and after the checkpoint: a skip and a skip escalated to a rollback before it, a skip after it.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback
from torch.optim import lr_scheduler as lrs

from tests.compat.common import FullBatch, differences, seeded, split
from tests.models import make_trainer


def _schedule(opt):
    return lrs.StepLR(opt, step_size=3, gamma=0.5)


class Rows(Callback):
    def __init__(self, clip):
        self.clip = clip
        self.rows = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rec = self.clip.last[0]
        self.rows[trainer.global_step] = (float(rec.grad_norm), float(rec.threshold), bool(rec.clipped))


def _callbacks(all_callbacks):
    callbacks = all_callbacks(
        clip={"warmup_steps": 2, "z_threshold": 1.5},
        guard={"action": "skip", "max_consecutive_skips": 1, "escalate_to": "rollback", "snapshot_every_n_steps": 2},
    )
    return callbacks, Rows(split(callbacks)[1])


def _model():
    return seeded(FullBatch, nan_at_steps=[2, 3, 9], loss_scale_at={7: 50.0}, scheduler=_schedule)


def test_resume_continues_statistics_counters_and_lr_scale_exactly(tmp_path, all_callbacks):
    full_cbs, full_rows = _callbacks(all_callbacks)
    full = make_trainer(tmp_path / "full", [*full_cbs, full_rows], max_steps=12)
    full_model = _model()
    full.fit(full_model)

    first_cbs, first_rows = _callbacks(all_callbacks)
    first = make_trainer(tmp_path / "a", [*first_cbs, first_rows], max_steps=6)
    first.fit(_model())
    ckpt = tmp_path / "interrupted.ckpt"
    first.save_checkpoint(ckpt)

    second_cbs, second_rows = _callbacks(all_callbacks)
    second = make_trainer(tmp_path / "b", [*second_cbs, second_rows], max_steps=12)
    model = _model()
    second.fit(model, ckpt_path=str(ckpt))

    f_mon, f_clip, f_guard = split(full_cbs)
    s_mon, s_clip, s_guard = split(second_cbs)
    assert sorted(second_rows.rows) == list(range(6, 12))
    # the spike at step 7 was clipped, after the checkpoint, against statistics carried over from it
    assert second_rows.rows[7][2]
    assert not differences({**first_rows.rows, **second_rows.rows}, full_rows.rows)  # exact, NaN == NaN

    assert [(e["step"], e["kind"]) for e in s_guard.events] == [(2, "skip"), (3, "rollback"), (9, "skip")]
    assert not differences(s_guard.events, f_guard.events)
    assert (s_guard.skipped_steps, s_guard.rollbacks, s_guard.lr_scale) == (3, 1, 0.5)
    state_full, state_resumed = f_guard.state_dict(), s_guard.state_dict()
    for key in ("snapshots", "run_id"):  # in-memory copies are not part of a checkpoint; each fit has its own id
        state_full.pop(key), state_resumed.pop(key)
    assert not differences(state_resumed, state_full)
    assert not differences(s_clip.state_dict(), f_clip.state_dict())
    assert not differences(s_mon.state_dict(), f_mon.state_dict())

    assert second.optimizers[0].param_groups[0]["lr"] == full.optimizers[0].param_groups[0]["lr"]
    assert second.lr_scheduler_configs[0].scheduler.state_dict() == full.lr_scheduler_configs[0].scheduler.state_dict()
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)
