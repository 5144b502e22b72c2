"""The per-step cache inside a real fit: several callbacks, one measurement."""

import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks.step_context import context_for, grad_stats_for
from tests.models import TinyRegression, make_trainer


class _Reader(Callback):
    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(grad_stats_for(trainer, pl_module, optimizer))


class _Reference(Callback):
    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))


def test_two_callbacks_share_one_computation_per_step(tmp_path):
    a, b, ref = _Reader(), _Reader(), _Reference()
    trainer = make_trainer(tmp_path, [a, ref, b], max_steps=6, logger=False)
    trainer.fit(TinyRegression())
    assert len(a.seen) == len(b.seen) == 6
    assert all(x is y for x, y in zip(a.seen, b.seen))
    assert context_for(trainer).cache.computations == 6
    for stats, expected in zip(a.seen, ref.norms):
        assert abs(float(stats.total_norm) - expected) <= 1e-6 * expected
    assert a.seen[0].names[0] == "net.0.weight"
    assert a.seen[0].layer_names == ["net.0", "net.2", "net.4"]


def test_accumulation_measures_once_per_optimizer_step(tmp_path):
    a = _Reader()
    trainer = make_trainer(tmp_path, [a], max_steps=2, logger=False, accumulate_grad_batches=4)
    trainer.fit(TinyRegression())
    assert len(a.seen) == 2
    assert context_for(trainer).cache.computations == 2
