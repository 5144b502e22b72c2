"""Rerun diagnosis: was a non-finite step a transient fault, a fault of the data, or a fault of the state?

Megatron-LM's rerun state machine (``megatron/core/rerun_state_machine.py``) re-runs a flagged step from the same
state, with the same data and random numbers, and compares: a result that does not reproduce is a transient fault
(a bit flip, silent data corruption in hardware) and is skipped with no change to training. The maintainers of
torchtitan asked for the same before skipping anything (pytorch/torchtitan#916: "a NaN may come from bad modeling or
hyperparameters and skipping makes that hard to debug"). This module does that for one flagged step:

1. **The batch itself held NaN/inf**: a fault of the *data*; nothing needs to be re-run.
2. **The weights are non-finite**: a fault of the *state*.
3. **Re-run from the same state** (same batch, same random numbers): a finite loss and gradient means the fault did
   not reproduce: *transient*.
4. It reproduced: **re-run from the newest trusted snapshot** on the same batch. Reproduces there too: the batch
   fails from a state known to be good, a fault of the *data* (a finite batch that makes any model fail: a corrupt
   label, an extreme input). Does not: the current state fails on this batch where an older one did not.
5. Then **re-run the current state on an ordinary batch** (the last healthy step's, with its random numbers). It
   fails there too: the *state* went bad (a weight blown to 1e38 overflows every output). It does not: the state
   is sound and this batch is one the trained model cannot take, a fault of the *data* (a numerically unsafe loss,
   ``log`` of a sigmoid that saturates on an outlier row once the weights have grown: the untrained model took it,
   the trained one gives ``log(0)``). Without an ordinary batch (no healthy step yet since the fit began), the
   state is blamed.

Without a trusted snapshot step 4 cannot run: the diagnosis is then *reproducible* (data or state, undecided).

Pure PyTorch: :func:`rerun_step` takes the module and one callable per micro-batch that recomputes its loss (the
adapter builds them: ``training_step`` under the precision context for Lightning, the user's closure for a plain
loop); :func:`classify` takes the numbers and returns a :class:`Diagnosis` whose ``evidence`` says what was compared.
Nothing here runs on a healthy step.

**Manual optimization** (a step that calls its own backward and optimizer steps): the adapter hands the step a
:class:`BackwardRecorder` as its backward (Lightning: ``manual_backward``) and makes the optimizers' ``step`` and
``zero_grad`` (and the schedulers' ``step``) do nothing for the rerun; the callable returns the recorder. Each
backward call's gradients come from ``torch.autograd.grad(..., retain_graph=True)``, so ``.grad``, the optimizers'
state and the weights stay as they were. A step with several losses (a GAN's generator and discriminator) reports
the **sum of its losses** and the **norm of all its gradients together** (the root of the summed squares over every
backward call): finite exactly when every loss and every gradient is. The guard decides after the whole
``training_step``, so an optimizer that stepped before the flagged one has already updated its weights: the "same
state" of the rerun is the live one (the flagged optimizer's own update was dropped, so its part of the step sees
exactly what it saw).

**Sharded parameters** (FSDP2 ``DTensor``): a forward is a collective (parameters are all-gathered), so every rank
reruns together (the engine agrees on each branch first) and ``torch.autograd.grad`` w.r.t. the sharded parameters
sees nothing (the graph holds the all-gathered ones; it returns None for each), while a real backward would run
FSDP2's reduce-scatter into ``.grad``. The rerun is then **forward-only** (``grads=False``: under ``torch.no_grad``,
``grad_norm`` None) and compares the loss. A fault that showed only in the gradients (every rank's loss finite) is
invisible to it: :func:`classify` then gives no diagnosis instead of calling it transient. The trusted-snapshot rerun
loads the snapshot's local shards into the module and copies the live ones back (in place, bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_gradguard.core.recover._untouched import RngState, left_as_found

__all__ = ["KINDS", "BackwardRecorder", "Diagnosis", "RerunResult", "RngState", "classify", "rerun_step"]

#: the diagnoses, in the words events and reports use
KINDS = ("transient", "data", "state", "reproducible", "unrestorable")


@dataclass
class RerunResult:
    """The loss (mean over micro-batches) and the global gradient norm of one re-run (None: not computed);
    ``others_finite``: False when a rerun that every rank ran together was non-finite on another rank."""

    loss: float | None
    grad_norm: float | None
    others_finite: bool = True

    @property
    def finite(self) -> bool:
        return self.others_finite and self.finite_here

    @property
    def finite_here(self) -> bool:
        """Finite on this rank (whatever the others gave)."""
        return all(v is None or math.isfinite(v) for v in (self.loss, self.grad_norm))

    def describe(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.grad_norm is not None:
            parts.append(f"gradient norm {self.grad_norm:.4g}")
        text = ", ".join(parts) or "no values"
        if not self.others_finite and self.finite_here:
            text += " here, non-finite on another rank"
        return text


@dataclass
class Diagnosis:
    """What a flagged step was (``kind``: one of :data:`KINDS`) and the evidence, in words."""

    kind: str
    evidence: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "evidence": self.evidence}


def _loss_of(out: Any) -> torch.Tensor | None:
    """The loss tensor of a ``training_step``-like output (a tensor, or a dict with ``"loss"``; None: skipped)."""
    if isinstance(out, dict):
        out = out.get("loss")
    return out if isinstance(out, torch.Tensor) else None


def _squared_norm(grads: Sequence[torch.Tensor | None]) -> float:
    # abs(): a complex gradient's squared norm is that of its magnitudes (.double() alone drops the imaginary part)
    return sum(float(g.detach().abs().double().pow(2).sum()) for g in grads if g is not None)


class BackwardRecorder:
    """Stands in for a manual-optimization step's backward during a rerun (see the module docstring): each call
    records the loss and adds the squared norm of its gradients w.r.t. the parameters that require grad at that
    moment (a GAN's ``toggle_optimizer`` may have switched some off), from ``torch.autograd.grad(...,
    retain_graph=True, allow_unused=True)``: ``.grad`` is never touched, and a later backward through the same graph
    still works. A loss without a graph (a forward-only rerun) is recorded with no gradients."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.losses: list[float] = []
        self.sq = 0.0

    def reset(self) -> BackwardRecorder:
        self.losses, self.sq = [], 0.0
        return self

    def __call__(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(loss, torch.Tensor):
            return
        self.losses.append(float(loss.detach().float().sum()))
        params = [p for p in self.module.parameters() if p.requires_grad]
        if loss.requires_grad and params:
            grads = torch.autograd.grad(loss.sum(), params, retain_graph=True, allow_unused=True)
            self.sq += _squared_norm(grads)


def rerun_step(
    module: nn.Module,
    losses: Sequence[Callable[[], Any]],
    rng: Sequence[RngState | None] = (),
    weights: dict[str, torch.Tensor] | None = None,
    grads: bool = True,
) -> RerunResult | None:
    """Recompute one step: each callable of ``losses`` (one per micro-batch, each after restoring its ``rng``)
    returns the loss, or a :class:`BackwardRecorder` it ran its own backward calls through (manual optimization:
    the sum of its losses and the norm of all its gradients); the gradients come from ``torch.autograd.grad`` and
    never touch ``.grad``. ``grads`` False: forward only, under ``torch.no_grad`` (sharded parameters; the result's
    ``grad_norm`` is None). With ``weights`` (a snapshot's model ``state_dict``), the step is recomputed from those
    weights. Whatever the steps do, the module is left as it was: its parameters and buffers, the Python-side
    state of its submodules (:class:`ModuleAttributes`) and the random-number states (torch's, Python's, NumPy's).
    Returns None when the step could not be recomputed (an exception, no loss): no diagnosis then, never a new
    failure."""
    params = [p for p in module.parameters() if p.requires_grad]
    with left_as_found(module):
        try:
            if weights is not None:
                module.load_state_dict(weights)
            total_loss, count, sq = 0.0, 0, 0.0
            for i, compute in enumerate(losses):
                state = rng[i] if i < len(rng) else None
                if state is not None:
                    state.restore()
                with torch.enable_grad() if grads else torch.no_grad():
                    out = compute()
                    if isinstance(out, BackwardRecorder):
                        if out.losses:
                            total_loss += sum(out.losses)
                            count += 1
                            sq += out.sq
                        continue
                    loss = _loss_of(out)
                    if loss is None:
                        continue
                    total_loss += float(loss.detach().float())
                    count += 1
                    if grads and loss.requires_grad and params:
                        sq += _squared_norm(torch.autograd.grad(loss, params, allow_unused=True))
            if not count:
                return None
            norm = (math.sqrt(sq) if math.isfinite(sq) else math.inf) if grads else None
            return RerunResult(total_loss / count, norm)
        except Exception:  # a rerun that cannot run is no diagnosis
            return None


def classify(
    fault: RerunResult,
    batch_nonfinite: bool,
    weights_nonfinite: bool,
    same_state: RerunResult | None,
    trusted: RerunResult | None,
    trusted_step: int | None = None,
    loss_nonfinite: bool | None = None,
    ordinary: RerunResult | None = None,
    unheld: Sequence[str] = (),
) -> Diagnosis | None:
    """The diagnosis of a flagged step from what was measured (``fault``) and what the re-runs gave (None: not run;
    see the module docstring for the order; ``ordinary``: the current state on the last healthy step's batch;
    ``unheld``: module attributes outside the state dict that hold NaN/inf: when the batch fails from the trusted
    state too, they, not the batch, are the fault, and no snapshot holds them).
    None: nothing to say (no rerun and nothing else known, or a forward-only rerun, which cannot see a fault that
    showed only in the gradients). ``loss_nonfinite``: the step's loss was non-finite (on some rank, where ranks
    agreed); None: read from ``fault``."""
    seen = fault.describe()
    if batch_nonfinite:
        return Diagnosis("data", "the input batch held NaN/inf")
    if weights_nonfinite:
        return Diagnosis("state", "the weights themselves are non-finite")
    if same_state is None:
        return None
    if loss_nonfinite is None:
        loss_nonfinite = fault.loss is not None and not math.isfinite(fault.loss)
    if same_state.grad_norm is None and same_state.finite and not loss_nonfinite:
        return None  # a finite loss says nothing about gradients that were non-finite: not "transient"
    if same_state.finite:
        return Diagnosis(
            "transient",
            f"the step gave {seen}; rerun from the same state with the same batch and random numbers it gave "
            f"{same_state.describe()}: it does not reproduce",
        )
    if trusted is None:
        return Diagnosis(
            "reproducible",
            f"the step gave {seen}; the rerun from the same state reproduced it ({same_state.describe()}); no trusted "
            "snapshot to tell the data from the state",
        )
    where = f"the trusted state of step {trusted_step}" if trusted_step is not None else "a trusted earlier state"
    if trusted.finite:
        if ordinary is not None and ordinary.finite:
            return Diagnosis(
                "data",
                f"the step gave {seen} and reproduces from the same state; from {where} the same batch gives "
                f"{trusted.describe()}, but the same state gives {ordinary.describe()} on the last healthy step's "
                "batch: the state is sound, and this batch is one the trained model cannot take",
            )
        also = f" and gives {ordinary.describe()} on the last healthy step's batch too" if ordinary is not None else ""
        return Diagnosis(
            "state",
            f"the step gave {seen} and reproduces from the same state{also}, but from {where} the same batch gives "
            f"{trusted.describe()}: the state went bad",
        )
    if unheld:
        names = ", ".join(unheld[:5]) + (", ..." if len(unheld) > 5 else "")
        return Diagnosis(
            "unrestorable",
            f"the step gave {seen}; the same batch fails from {where} too ({trusted.describe()}), and the module "
            f"carries NaN in {names}, plain tensor attributes that no snapshot holds (a recurrent hidden state "
            "kept across steps): a rollback cannot repair them; register such state as a buffer "
            "(register_buffer(name, tensor, persistent=False)) so that snapshots hold it",
        )
    return Diagnosis(
        "data",
        f"the step gave {seen}; the same batch fails from {where} too ({trusted.describe()}): the batch is bad",
    )
