"""The three callbacks together under 32-true, bf16-mixed and the fp16 GradScaler path (forced on CPU).

What this proves: the runs finish; a NaN loss is rolled back under every precision; under the GradScaler an
overflow step (inf gradients, finite loss) is counted as an AMP overflow and never as a divergence, and it does not
poison the clipping statistics; the norms the callbacks see and log are the *unscaled* gradient norms (compared
with an fp32 reference gradient computed independently from the same weights and batch).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_gradguard.callbacks.nan_guard import GuardDecision
from tests.compat.common import reference_grad_norm, seeded, split, tb_scalars
from tests.models import make_trainer


class Probe(Callback):
    """First in the list: the batch and an fp32 reference norm per step. Also, placed last, what the callbacks did."""

    def __init__(self, callbacks):
        self.mon, self.clip, self.guard = split(callbacks)
        self.batch = None
        self.ref: dict[int, float] = {}
        self.seen: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step not in self.ref:  # first call of the step (the probe sits before the gradguard callbacks)
            factor = pl_module.loss_scale_at.get(step, 1.0)  # a spike multiplies the loss, hence the gradient
            self.ref[step] = reference_grad_norm(pl_module, self.batch) * factor
            return
        rec = self.clip.last[0]  # second call (after them): what the clipper saw and did
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.seen[step] = {
            "norm": float(rec.grad_norm),
            "threshold": float(rec.threshold),
            "clipped": bool(rec.clipped),
            "post": float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pl_module.parameters()])))
            if all(p.grad is not None for p in pl_module.parameters())
            else None,
            "scale": None if scaler is None else float(scaler.get_scale()),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[trainer.global_step - 1]["reason"] = self.guard.reason


PRECISIONS = {
    "32-true": ({"precision": "32-true"}, 1e-5),
    "bf16-mixed": ({"precision": "bf16-mixed"}, 5e-2),
    # Lightning turns precision="16-mixed" into bf16 on CPU; the plugin forces fp16 autocast + a GradScaler
    "16-mixed-scaler": (None, 1e-2),
    # the same path on a GPU (CUDA autocast + GradScaler); skipped where no CUDA device exists (untested so far)
    "cuda-16-mixed": (None, 1e-2),
}


def _trainer_kwargs(name):
    kwargs, tol = PRECISIONS[name]
    if kwargs is None:
        device = "cuda" if name.startswith("cuda") else "cpu"
        scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
        kwargs = {"plugins": [MixedPrecision("16-mixed", device, scaler=scaler)]}
        if device == "cuda":
            kwargs["accelerator"] = "gpu"
    return kwargs, tol


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
        if n.startswith("cuda")
        else n
        for n in PRECISIONS
    ],
)
def test_three_callbacks_under_each_precision(tmp_path, all_callbacks, name):
    kwargs, tol = _trainer_kwargs(name)
    callbacks = all_callbacks(guard={"snapshot_every_n_steps": 2})
    mon, clip, guard = split(callbacks)
    probe = Probe(callbacks)
    trainer = make_trainer(tmp_path, [probe, *callbacks, probe], max_steps=14, **kwargs)
    model = seeded(nan_at_steps=[6], loss_scale_at={10: 1e4})
    trainer.fit(model)

    assert trainer.global_step == 14
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the NaN loss is a divergence under every precision: rolled back
    rollbacks = [e for e in guard.events if e["kind"] == "rollback"]
    assert [(e["step"], e["cause"]) for e in rollbacks] == [(6, "nonfinite_loss")]
    assert guard.lr_scale == 0.5

    scaler = getattr(trainer.precision_plugin, "scaler", None)
    overflow_steps = [s for s, v in probe.seen.items() if v["reason"] is GuardDecision.AMP_OVERFLOW]
    if name.endswith("16-mixed-scaler") or name == "cuda-16-mixed":
        assert scaler is not None
        # the 1e4 spike overflows fp16: the scaler skips that step; the guard calls it an overflow, not a divergence
        assert 10 in overflow_steps
        assert guard.amp_overflow_steps == len(overflow_steps)
        assert all(not math.isfinite(probe.seen[s]["norm"]) for s in overflow_steps)
        assert all(e["step"] not in overflow_steps for e in guard.events)
    else:
        assert scaler is None
        assert overflow_steps == []
        assert guard.amp_overflow_steps == 0
        # without a scaler the spike reaches the clipper, which cuts it down to its threshold
        assert probe.seen[10]["clipped"]
        assert probe.seen[10]["post"] <= probe.seen[10]["threshold"] * (1 + 1e-5)

    # the clipper never took an inf/NaN into its statistics: every threshold after warm-up is finite
    assert all(math.isfinite(v["threshold"]) for s, v in probe.seen.items() if s >= 3)

    # pre-clip norms are the unscaled ones: equal to an independent fp32 gradient norm of the same weights and batch
    compared = 0
    for step, v in probe.seen.items():
        if not math.isfinite(v["norm"]) or step in (6,):
            continue
        assert v["norm"] == pytest.approx(probe.ref[step], rel=tol), (step, v, probe.ref[step])
        if v["scale"] is not None:
            assert v["scale"] >= 16.0  # a scaled norm would be >= 16x off: the comparison can fail
        compared += 1
    assert compared >= 10

    tb = tb_scalars(tmp_path / "run" / "version_0")
    assert tb["gradguard/rollbacks"][6] == 1
    assert len(tb["gradguard/grad_norm"]) >= 10
    for step, value in tb["gradguard/grad_norm"].items():
        if math.isfinite(probe.seen[step]["norm"]) and step != 6:
            assert value == pytest.approx(probe.ref[step], rel=tol), step
    if scaler is not None:
        assert tb["gradguard/amp_overflow_steps"][13] == guard.amp_overflow_steps
