"""The per-step cache inside a real fit: several callbacks, one measurement."""

import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard.callbacks._step_context import context_for, grad_stats_for, log_due, on_measured
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


class _ScalingClipper(Callback):
    """Measures, then scales every gradient by 1e-3 in place (as a clipper does)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad_stats_for(trainer, pl_module, optimizer)
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.mul_(1e-3)


class _Listener(Callback):
    """Registers an on_measured listener in setup and copies the gradients it is shown."""

    def __init__(self):
        self.copies = []

    def setup(self, trainer, pl_module, stage):
        on_measured(trainer, lambda stats, idx, step: self.copies.append([g.clone() for g in stats.grads]))


class _Raw(Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.clone() for p in pl_module.parameters() if p.grad is not None])


def test_listeners_see_the_gradients_before_a_clipper_listed_first_scales_them(tmp_path):
    raw, listener = _Raw(), _Listener()
    trainer = make_trainer(tmp_path, [raw, _ScalingClipper(), listener], max_steps=4, logger=False)
    trainer.fit(TinyRegression())
    assert len(listener.copies) == len(raw.grads) == 4
    for seen, expected in zip(listener.copies, raw.grads):
        assert all(torch.equal(a, b) for a, b in zip(seen, expected))  # not the 1e-3-scaled ones


class _Due(Callback):
    def __init__(self, every):
        self.every, self.due = every, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.due.append((trainer.global_step, log_due(trainer, self.every)))


def test_log_due_counts_batches_so_both_optimizers_of_a_batch_log_together(tmp_path):
    from tests.callbacks.test_gradient_norm_monitor import TwoOptimizers

    due = _Due(2)
    make_trainer(tmp_path, [due], max_steps=8, logger=False).fit(TwoOptimizers())  # 4 batches, 2 steps each
    assert due.due == [(0, True), (1, True), (2, False), (3, False), (4, True), (5, True), (6, False), (7, False)]


def test_each_trainer_keeps_its_own_context_and_a_dead_trainer_does_not_keep_it_alive():
    import gc
    import weakref

    class _Owner:  # any weakly referenceable object stands for a Trainer here
        pass

    a, b = _Owner(), _Owner()
    ctx_a, ctx_b = context_for(a), context_for(b)
    assert ctx_a is not ctx_b
    assert context_for(a) is ctx_a  # asked again after another Trainer
    assert context_for(a) is ctx_a  # and twice in a row (the last one asked)
    assert context_for(b) is ctx_b
    gone = weakref.ref(ctx_b)
    del b, ctx_b
    gc.collect()
    assert gone() is None  # the context goes with its Trainer, even right after being asked for
    assert context_for(a) is ctx_a
