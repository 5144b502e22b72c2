"""The three callbacks with ``accumulate_grad_batches > 1``.

What this proves: the gradient statistics are computed once per optimizer step (not per micro-batch) and every
callback acts once per optimizer step; a NaN or inf in the inputs of a single micro-batch makes the guard drop the
whole accumulated step (skip: params and optimizer state bit-identical to before; rollback: bit-identical to the
snapshot, LR cut).
"""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback

import lightning_gradguard.callbacks._step_context as step_context
from tests.compat.common import InputFaults, StateRecorder, assert_restored, differences, seeded, split
from tests.models import make_trainer


class Counter(Callback):
    def __init__(self):
        self.backward = 0
        self.optimizer_steps = 0

    def on_after_backward(self, trainer, pl_module):
        self.backward += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer_steps += 1


def test_one_measurement_and_one_action_per_optimizer_step(tmp_path, all_callbacks, monkeypatch):
    calls = []
    real = step_context.compute_grad_stats

    def counting(*args, **kwargs):  # a spy: the real computation runs
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_context, "compute_grad_stats", counting)
    callbacks = all_callbacks()
    mon, clip, guard = split(callbacks)
    counter = Counter()
    trainer = make_trainer(tmp_path, [counter, *callbacks], max_steps=5, accumulate_grad_batches=3)
    trainer.fit(seeded(InputFaults))
    # 8 batches per epoch: windows of 3, 3, 2 micro-batches -> 5 steps take 3+3+2+3+3 = 14 micro-batches
    assert counter.backward == 14
    assert counter.optimizer_steps == 5
    assert len(calls) == 5  # one measurement per optimizer step, shared by every callback
    assert clip.state_dict()["optimizers"][0]["steps"] == 5
    assert [int(s) for s, _ in guard.state_dict()["grad_history"]] == [0, 1, 2, 3, 4]
    assert mon.last_step == 4
    assert float(mon.last_grad_norm) == pytest.approx(float(clip.last[0].grad_norm))


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_fault_in_one_micro_batch_drops_the_whole_step(tmp_path, all_callbacks, action, kind):
    callbacks = all_callbacks(guard={"action": action, "snapshot_every_n_steps": 1})
    mon, clip, guard = split(callbacks)
    rec = StateRecorder()
    trainer = make_trainer(tmp_path, [*callbacks, rec], max_steps=4, accumulate_grad_batches=3)
    # global step 1 = batches 3, 4, 5; only batch 4 (the middle micro-batch) is corrupted
    model = seeded(InputFaults, bad_inputs={1: kind}, bad_batch_idx={4})
    trainer.fit(model)
    assert [(e["step"], e["kind"]) for e in guard.events] == [(1, action)]
    # nan input -> NaN loss; inf input -> tanh saturates, the loss stays finite, the gradients do not
    assert guard.events[0]["cause"] == ("nonfinite_loss" if kind == "nan" else "nonfinite_grad")
    if action == "skip":
        assert not differences(rec.states[2], rec.states[1])  # nothing of the 3 micro-batches was applied
    else:
        assert guard.events[0]["snapshot_step"] == 1
        assert_restored(rec.states[2], rec.states[1], lr_ratio=0.5)
    assert differences(rec.states[3]["model"], rec.states[2]["model"])  # training went on
    assert clip.state_dict()["optimizers"][0]["steps"] == 4
