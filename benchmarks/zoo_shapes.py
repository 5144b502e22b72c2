"""The healthy-shape zoo (issue 24): ordinary training runs that a guard must leave alone.

A guard that acts on finite signals (a loss that "climbs", a norm that "rises", a loss "worse than untrained") is
calibrated on some runs and then left on, for weeks, on others. Each shape below is a small Lightning fit of a kind
users run every day, chosen because its loss or gradient stream looks, to a naive rule, like a run going wrong. None
of them is going wrong: without any callback each one trains (its validation metric improves clearly over the
metric of its start state; ``healthy_zoo.py`` prints both). A guard that skips a finite batch, rolls back, restarts,
cuts the LR or halts on any of them has made a false alarm, and on a long run a false alarm costs the run.

What each shape stresses (the rule of today's guard it looks dangerous to, in brackets):

- ``finetune``: Adam 1e-4 from a trained state, batch 8: a flat, noisy loss whose first batch may happen to be an
  easy one [“worse than untrained”, judged against the first batch].
- ``linear_probe``: a new head on a trained, frozen backbone: few parameters, small steady gradients [same rule, and
  a low-norm run].
- ``curriculum``: easy targets, then the real (harder, larger) task from step 200: the loss and the norm jump up
  once and stay up [rising norm, loss divergence against the easy phase's median].
- ``vae_kl``: a VAE whose KL weight ramps 0 -> 1 over steps 100-300; with beta 0 it reconstructs well and its KL
  term grows freely, so the total loss climbs ~5x over 200 steps by design [loss climbing, loss above its best].
- ``two_opt_late``: manual optimization, two optimizers; the second objective (larger loss) starts stepping at batch
  100 [losses of different optimizers judged as one stream].
- ``masked_first_batch``, ``loss_ramp``, ``hinge_satisfied``: first loss exactly 0 (a fully masked first batch, a
  ``min(1, step/50)`` ramp, a margin loss already satisfied) [a reference of 0: every later loss "jumps"].
- ``bs1_sgd``: batch size 1, plain SGD: every loss is one sample's, heavy-tailed noise [climb rules on noise].
- ``adam_bs4``: batch size 4 with Adam: a first batch the untrained model happens to fit makes the run's first
  loss ~10x below its typical untrained loss [the untrained loss read from one batch].
- ``sorted_bags_sum``: bags of 1-512 items with a summed loss, the first epoch sorted by bag size [a first single
  item with loss ~0 as the divergence reference; a loss that grows with the bag].
- ``lbfgs_line_search``: LBFGS with a strong-Wolfe line search: Lightning runs ``training_step`` at every closure
  evaluation, and the line search's trial points reach losses 1e5x the step's [trial points judged as steps].
- ``sign_code``: a classifier through ``sign()`` without a straight-through estimator: the layers before the sign never
  get a gradient [tensors cut off by design read as dead units].
- ``poisson_counts``: a log-link count regression whose batches of high counts pull hard [a heavy-tailed gradient
  norm that a z-score threshold clips on healthy steps].
- ``noise_drift_warmup``: a time-ordered stream whose label noise grows 30x while the LR warms up [a loss that
  climbs ~100x with the LR: "the LR grew, then the loss climbed", though the data, not the model, got worse].
- ``gaussian_nll``: heteroscedastic Gaussian NLL, converged and noisy, hovering around 0 (batches of either sign)
  [ratios of losses near 0, negative losses].
- ``masked_start_15``: the first 15 batches fully masked (zero gradients); also run with
  ``AdaptiveGradientClipping("zscore")`` alone [a clipping warm-up whose median norm is 0].
- ``fp16_scaler``: fp16 autocast with a real ``torch.amp.GradScaler('cpu')`` (growth every 50 steps, so the scale
  overflows now and then, as it does on long runs) and one injected overflow at step 200 [overflow steps are the
  scaler's business]. Lightning's ``precision="16-mixed"`` on the CPU silently runs bf16 (it warns), so the shape
  passes an explicit ``MixedPrecision("16-mixed", "cpu", scaler=...)`` plugin: real fp16 autocast, real scaler.
- ``fp16_sum_scaler``: the same on a large-gradient run (sum-reduced MSE, batch 512, targets of std 90): gradient
  elements beyond fp16's range, so the scaler's scale must settle below 1, overflowing every time it grows back
  [a scale below 1 taken for a collapse].
- ``dqn``: Q-learning with a target network synced every 10 steps (Lightning's DQN example's settings: Adam 1e-2,
  batch 16; gamma 0.95) on a tiny random MDP [the TD loss jumps at every sync and grows with the Q-values;
  non-stationary by nature].
- ``reinforce``: REINFORCE with a batch-mean baseline on a contextual bandit: the loss is centred on 0, either sign
  [zero, negative and sign-changing losses].
- ``gan``: a GAN on a 2-D Gaussian (manual optimization, two optimizers) [adversarial losses near log 2 that never
  fall; two streams].
- ``warmup_cosine``, ``onecycle``, ``adamw_steplr``: LR schedules (warm-up then cosine; OneCycle; AdamW with a step
  decay) [norms that rise while the LR warms up; LR changes the guard did not make].
- ``distill``: a small student fitted to a teacher's soft targets (KL, T=4) [a loss whose floor is not 0].
- ``freeze_unfreeze``: a frozen backbone unfrozen at step 200 with a new param group (what Lightning's
  ``BackboneFinetuning`` does) [the norm jumps when new parameters start learning].
- ``sum_loss``: ``reduction='sum'`` with batch 256: norms in the hundreds from the first step [absolute norm caps].
- ``bf16_mixed``: ``precision='bf16-mixed'`` [a coarse loss and gradients].
- ``label_smoothing``: cross-entropy with label smoothing 0.1 [a loss that plateaus well above 0].
- ``infonce``: contrastive InfoNCE on two noisy views [a loss that starts at log(batch) and moves slowly].
- ``grad_accum``: ``accumulate_grad_batches=4`` [losses seen per micro-batch, steps per 4].
- ``tiny_transformer_lm``: a one-layer causal transformer character LM on real text [a long plateau at the unigram
  entropy].
- ``multitask_ramp``: a second task's loss weight ramps 0 -> 1 over 200 steps [the loss climbs while both tasks
  improve].
- ``delayed_drop``: a deep linear net from a small initialisation: a long plateau, then a sudden drop ("grokking"-like)
  [“killed at start” / “worse than untrained” on a plateau that is about to break].
- ``restarts_curriculum``: a curriculum switch that comes with a warm restart (SGDR): the loss jumps ~1000x above
  the easy phase's best while the LR is 10x the best window's [an LR that "grew" before a climb: but the run
  trained at that LR before its best, every cycle starts there].
- ``bn_cnn``: a small CNN with BatchNorm on scikit-learn's digits [buffers, ordinary noise].
- ``sched_sampling_warmup``: scheduled sampling during an LR warm-up: the model's own predictions are fed back more
  and more while the LR grows, so the loss climbs ~10x from its best window and an earlier state does somewhat
  better on today's batches [“the LR grew, then the loss climbed”, tested on the batches].
- ``pinn_stiff``: a physics-informed network with a heavily weighted boundary term: gradient norms in the thousands
  for the whole run, and a solution that depends on its first steps [the clipper's warm-up cap and z-score
  threshold on a healthy stiff loss: a known harm, see RESULTS.md].
- ``dropout_noisy``: an MLP with dropout 0.3 [a noisy loss stream].
- ``class_incremental``: digits classes 0 and 1 only for 1400 steps, then all ten: the first task is separable, so
  its gradient norm falls to ~1e-3, and the whole task's is ~7 [a gradient norm 5000x its reference that holds:
  the new task's scale, not a blow-up].
- ``sparse_reward_chain``: REINFORCE on a 10-state chain whose only reward (100) waits at the far end: until the
  first successes only the entropy bonus has a gradient (~0.01), then each batch with a success has norms of 20-160
  [sparse, legitimately huge gradients that become the rule as the policy learns].
- ``loss_weight_step``: a digits MLP under Adam whose whole loss is weighted 1e-4 for 300 steps, then 1: the loss
  and every gradient jump 1e4x at once while Adam's update barely changes [an objective that changed, not a model
  that blew up: the state a rollback would restore is as far on an ordinary batch].
- ``rare_positives``: a binary classifier with 0.2 % positives and ``pos_weight=neg/pos``: once it predicts the
  majority class, the ~6 % of batches that hold a positive have gradients 100-10,000x the rest, again and again [far
  outliers that recur: the run's signal, not faults].
- ``cyclic_lr``: SGD under a triangular ``CyclicLR`` whose LR grows 60x in 50 steps, every 100 steps [an LR that
  keeps growing while the loss rises near each peak: by design, not a boiling frog].
- ``cyclic_kl_vae``: the VAE under a cyclical KL schedule (beta 0 -> 1 every 150 steps) [a loss that climbs by
  design again and again].
- ``permuted_tasks``: continual learning, the labels permuted anew every 150 steps [repeated jumps of the loss and
  the gradient at an LR that did not change].
- ``memorize_tiny``: memorising 8 samples with Adam down to a loss of ~1e-15 [relative jumps of 1e5x and more at a
  loss that stays tiny].
- ``alternating_tasks``: multi-task learning, one task per batch in turn, losses 100x apart [a first loss that is
  one task's, window medians that mix two scales: "never learned" read from the first batch].
- ``large_batch_warmup``: the BatchNorm CNN trained the large-batch way (batch 256, the LR warmed up 100x to 1.0,
  then cosine) [an LR that grows 100x while the run is far from trained].
- ``grokking``: modular addition with AdamW and weight decay 1 (Power et al. 2022): the training loss is ~0 for a
  long stretch while the validation accuracy is at chance, then it generalises [a tiny flat loss and decaying
  gradients that are no dead network].
- ``diffusion_2d``: a denoising diffusion model on 2-D data [a noisy loss (a random noise level per sample) that
  falls slowly].
- ``mixture_density``: a mixture density network [an NLL that crosses 0 and ends negative, sharp components].
- ``sam_manual``: sharpness-aware minimisation by manual optimization [two backward passes per step, weights moved
  in place inside ``training_step``].
- ``catapult``: plain SGD at 3 / (the initial loss's top Hessian eigenvalue), between the 2/lambda and 4/lambda of
  Lewkowycz et al. 2020: the loss climbs 10-50x in the first ~10 steps, then falls by itself into a flatter region
  [a norm that rises geometrically for several steps, as an LR-driven divergence does at its onset].

Faults (not healthy without a tool; a different pass criterion): ``corrupt_label_20`` and ``corrupt_label_5``: every
20th / 5th batch carries one corrupt regression label (1e30): the loss is inf, the gradient finite (~1e29) and
large. Without a tool the first such batch leaves Adam's second moment at inf and the model frozen. The guard must
skip exactly those batches (never roll back, never halt) and end within the tolerance of a run in which those batches
are simply dropped (``training_step`` returns ``None``). Both see the same 400 batches (one epoch of exactly that
many): a skipped step and a dropped batch need not count alike as optimizer steps.

Each shape is ``build(seed, steps) -> ZooModule``: data from seeded ``torch.Generator``s (or scikit-learn's bundled
digits and dataset descriptions, nothing downloaded), pretraining (where the shape starts from a trained state) done in
the builder in a plain torch loop, and ``ZooModule.evaluate()`` computing the validation metric the same way for every
configuration (float32, eval mode, no gradient). :func:`run` is one fit; ``healthy_zoo.py`` runs the grid and prints
the table; ``tests/test_healthy_zoo.py`` runs the issue's rows.

Pass criterion of a run (:func:`judge`): no exception, zero *actions* (``NaNGuard.events`` entries of a kind in
:data:`ACTION_KINDS`; a skip counts only when the step's loss was finite or unknown; any other kind, e.g. a warning,
is reported apart and allowed) and a final metric within the tolerance of the no-callback run of the same seed, or
better. Tolerance: 2 % of the reference metric (relative) for metrics bounded away from 0; for metrics that can be
near 0 or negative (``tolerance="travel"``: NLL, value error, MMD, hinge) 2 % of
``max(|reference|, |start - reference|)``, i.e. 2 % of the distance the no-callback run travelled from its start
state when that is larger.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "ACTION_KINDS",
    "CONFIGS",
    "FAULTS",
    "HEALTHY",
    "SHAPES",
    "Shape",
    "ZooModule",
    "classify_events",
    "configs_for",
    "event_line",
    "judge",
    "lr_ratio",
    "make_callbacks",
    "metric_cell",
    "quiet",
    "reference_config",
    "run",
    "tolerance",
    "trains",
    "within",
]

#: event kinds that are actions (anything else, e.g. a warning, is reported but allowed)
ACTION_KINDS = frozenset({"skip", "rollback", "lower_lr", "halt", "restart"})
RELATIVE_TOL = 0.02

# ----------------------------------------------------------------------------------------------------------------------
# Data


def _gen(seed: int, salt: int) -> torch.Generator:
    """A generator for one purpose (``salt``) of one seed: data differ between seeds, never between configurations."""
    return torch.Generator().manual_seed(100_003 * seed + salt)


@functools.lru_cache(maxsize=4)
def _teacher(which: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A fixed random tanh network (the same for every seed) and the std of its output on N(0, 1) inputs."""
    g = torch.Generator().manual_seed(777 + which)
    w1 = torch.randn(in_dim, 32, generator=g) / in_dim**0.5
    w2 = torch.randn(32, 1, generator=g) / 32**0.5
    probe = torch.randn(8192, in_dim, generator=g)
    return w1, w2, float((torch.tanh(probe @ w1) @ w2).std())


def teacher(x: torch.Tensor, which: int = 0, scale: float = 3.0) -> torch.Tensor:
    """Teacher ``which``'s targets for ``x``, scaled to std ``scale`` (on N(0, 1) inputs)."""
    w1, w2, std = _teacher(which, x.shape[1])
    return scale * (torch.tanh(x @ w1) @ w2) / std


def regression_data(seed: int, salt: int, n: int, in_dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ~ N(0, 1) and clean teacher-0 targets (std 3): predicting the mean scores MSE ~9."""
    x = torch.randn(n, in_dim, generator=_gen(seed, salt))
    return x, teacher(x)


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes, pixels in [0, 1]): a per-seed split 1400 / 397."""
    x, y = _digits_all()
    perm = torch.randperm(len(x), generator=_gen(seed, 1))
    tr, va = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[va], y[va]


@functools.lru_cache(maxsize=1)
def load_text(max_chars: int) -> str:
    """scikit-learn's bundled dataset descriptions (``sklearn/datasets/descr/*.rst``, ~43 kB of English text)."""
    import sklearn

    files = sorted((Path(sklearn.__file__).parent / "datasets" / "descr").glob("*.rst"))
    return "\n".join(f.read_text(encoding="utf-8") for f in files)[:max_chars]


def mlp(sizes: Sequence[int], act: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def pretrain(
    params: Sequence[nn.Parameter] | Any,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    steps: int,
    lr: float,
    batch: int,
    g: torch.Generator,
) -> None:
    """A plain torch loop (no Lightning, no callbacks): Adam on random minibatches of indices into ``n`` samples."""
    opt = torch.optim.Adam(list(params), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss_of(idx).backward()
        opt.step()


def ordered_loader(tensors: Sequence[torch.Tensor], order: torch.Tensor, batch: int) -> DataLoader:
    """Batches in exactly ``order`` (one long epoch that covers the whole fit: the order is the shape)."""
    return DataLoader(TensorDataset(*tensors), batch_size=batch, sampler=order.tolist(), drop_last=True)


def stream_order(n: int, batches: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """Indices for ``batches`` batches of ``batch`` from ``n`` samples, reshuffled every pass."""
    need = batches * batch
    return torch.cat([torch.randperm(n, generator=g) for _ in range(need // n + 1)])[:need]


# ----------------------------------------------------------------------------------------------------------------------
# The modules


class ZooModule(pl.LightningModule):
    """Base of the shapes: a fixed train set, a seeded shuffled loader and :meth:`evaluate` (the metric).

    Subclasses set ``train_tensors``, ``batch_size``, ``lr`` and implement ``training_step`` and ``metric``.
    """

    higher_is_better = False

    def __init__(self, seed: int, steps: int, batch_size: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.seed, self.steps, self.batch_size, self.lr = seed, steps, batch_size, lr
        self.train_tensors: tuple[torch.Tensor, ...] = ()
        self.drop_faults = False  # the "dropped" reference of the fault shapes
        self.fault_steps: list[int] = []  # the global steps that got a corrupt batch (fault shapes)
        self.fault_batches: set[int] = set()

    def metric(self) -> float:
        raise NotImplementedError

    def evaluate(self) -> float:
        """The validation metric, in float32, eval mode, without gradients (the same for every configuration)."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return float(self.metric())
        finally:
            self.train(was)

    def train_dataloader(self) -> DataLoader:
        g = _gen(self.seed, 2)
        return DataLoader(
            TensorDataset(*self.train_tensors), batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Regression(ZooModule):
    """16 -> 64 -> 64 -> 1 ReLU MLP on teacher targets (std 3), MSE; metric: validation MSE on clean targets.

    Options cover the shapes that differ only in their loss, optimizer, schedule or data order: ``loss_mode``
    ``"mse"``, ``"sum"`` (reduction='sum'), ``"ramp"`` (loss x min(1, step/50)), ``"masked"`` (per-sample mask; the
    first ``masked_batches`` batches fully masked, 10 % of later samples masked), ``"corrupt"`` (one label 1e30 every
    ``fault_every`` batches); ``optimizer`` ``"adam"``, ``"adamw"``, ``"sgd"``; ``schedule`` ``None``,
    ``"warmup_cosine"``, ``"onecycle"``.
    """

    def __init__(
        self,
        seed: int,
        steps: int,
        batch_size: int = 32,
        lr: float = 1e-3,
        n_train: int = 2048,
        hidden: int = 64,
        loss_mode: str = "mse",
        optimizer: str = "adam",
        schedule: str | None = None,
        masked_batches: int = 0,
        fault_every: int = 0,
        dropout: float = 0.0,
        noise: float = 0.3,
    ) -> None:
        super().__init__(seed, steps, batch_size, lr)
        self.loss_mode, self.optimizer_name, self.schedule = loss_mode, optimizer, schedule
        self.masked_batches, self.fault_every = masked_batches, fault_every
        self.net = mlp([16, hidden, hidden, 1], dropout=dropout)
        x, y = regression_data(seed, 3, n_train)
        y_noisy = y + noise * torch.randn(y.shape, generator=_gen(seed, 4))
        self.train_tensors = (x, y_noisy)
        self.val_x, self.val_y = regression_data(seed, 5, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self) -> DataLoader:
        if self.loss_mode == "corrupt":  # exactly ``steps`` batches: the fit runs one epoch (Shape.one_epoch)
            return ordered_loader(
                self.train_tensors,
                stream_order(len(self.train_tensors[0]), self.steps, self.batch_size, _gen(self.seed, 2)),
                self.batch_size,
            )
        if self.loss_mode != "masked":
            return super().train_dataloader()
        x, y = self.train_tensors
        g = _gen(self.seed, 6)
        mask = (torch.rand(len(x), generator=g) > 0.1).float()
        # an extra pool of fully masked (empty, padding-only) samples that the first batches are made of
        empty = self.masked_batches * self.batch_size
        xs, ys = torch.cat([x, x[:empty]]), torch.cat([y, y[:empty]])
        ms = torch.cat([mask, torch.zeros(empty)])
        order = stream_order(len(x), self.steps + 1, self.batch_size, g)
        order = torch.cat([torch.arange(len(x), len(x) + empty), order])
        return ordered_loader((xs, ys, ms), order, self.batch_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.loss_mode == "masked":
            x, y, m = batch
            err = (self(x) - y).squeeze(1) ** 2
            return (err * m).sum() / m.sum().clamp_min(1.0)
        x, y = batch
        # which batches are corrupt follows the batch's index in the (single-epoch) loader, not a call count: a
        # guard may replay a faulty batch through training_step to find where it turned non-finite
        if self.loss_mode == "corrupt" and (batch_idx + 1) % self.fault_every == 0:
            if batch_idx not in self.fault_batches:  # a replay is the same batch, at whatever step it happens
                self.fault_batches.add(batch_idx)
                self.fault_steps.append(self.global_step)
            if self.drop_faults:
                return None  # the reference: the corrupt batch is simply not trained on
            y = y.clone()
            y[0] = 1e30  # one corrupt label: the loss overflows to inf, the gradient stays finite (~1e29)
        pred = self(x)
        if self.loss_mode == "sum":
            return F.mse_loss(pred, y, reduction="sum")
        loss = F.mse_loss(pred, y)
        if self.loss_mode == "ramp":
            loss = loss * min(1.0, self.global_step / 50)
        return loss

    def metric(self) -> float:
        return float(F.mse_loss(self(self.val_x), self.val_y))

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        elif self.optimizer_name == "sgd_momentum":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.schedule is None:
            return opt
        total = self.steps
        if self.schedule == "warmup_cosine":
            warm = 50

            def lr_lambda(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

            sched: Any = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        elif self.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=total + 1)
        else:
            raise ValueError(self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FineTune(Regression):
    """Pretrained on the teacher (Adam 3e-3, 400 steps), fine-tuned with Adam 1e-4, batch 8, on noisy targets with
    a small new component (0.5 x the first input): a flat, noisy loss that improves slowly."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=8, lr=1e-4, noise=1.0)
        x, _ = regression_data(seed, 7, 2048)
        y = teacher(x)
        pretrain(
            self.net.parameters(), lambda i: F.mse_loss(self.net(x[i]), y[i]), len(x), 400, 3e-3, 64, _gen(seed, 8)
        )
        xt, yt = self.train_tensors
        self.train_tensors = (xt, yt + 0.5 * xt[:, :1])
        self.val_y = self.val_y + 0.5 * self.val_x[:, :1]


class _SortedBags(torch.utils.data.Sampler):
    """Bags of 1 to 512 sample indices (log-uniform sizes), the first pass sorted by size (a length-bucketed first
    epoch): the first batches hold one item each."""

    def __init__(self, n: int, seed: int, bags: int) -> None:
        self.n, self.seed, self.bags = n, seed, bags

    def __iter__(self) -> Any:
        g = _gen(self.seed, 9)
        done = 0
        first = True
        while done < self.bags:
            sizes = torch.exp(torch.rand(120, generator=g) * math.log(512)).long().clamp_min(1)
            if first:
                sizes, first = sizes.sort().values, False
            for k in sizes.tolist():
                if done == self.bags:
                    return
                done += 1
                yield torch.randint(self.n, (k,), generator=g).tolist()

    def __len__(self) -> int:
        return self.bags


class SortedBags(Regression):
    """Bags of 1-512 samples with a loss summed over the bag's items, the first epoch sorted by bag size: the
    first batches are single items, one of which the untrained model may happen to fit (loss ~0), and the summed
    loss grows with the bag."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            TensorDataset(*self.train_tensors),
            batch_sampler=_SortedBags(len(self.train_tensors[0]), self.seed, self.steps + 1),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y, reduction="sum")


class Curriculum(Regression):
    """Easy targets (0.3 x teacher 0) until step ``switch``, then the real task: teacher 0 + teacher 1 (std 3 each)."""

    def __init__(self, seed: int, steps: int, switch: int = 200) -> None:
        super().__init__(seed, steps)
        self.switch = switch
        x, _ = self.train_tensors
        self.train_tensors = (x, 0.3 * teacher(x), teacher(x) + teacher(x, which=1))
        self.val_y = teacher(self.val_x) + teacher(self.val_x, which=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, easy, hard = batch
        return F.mse_loss(self(x), easy if self.global_step < self.switch else hard)


class NoiseDriftWarmup(Regression):
    """An online regression read in time order (no shuffling, one pass) whose label noise grows from std 0.1 to 3
    over the run, with Adam warmed up linearly to 3e-3 over 400 steps. The training loss climbs ~100x while the LR
    grows, and neither is a fault: the data gets noisier, the fixed signal is still learned. Metric: validation MSE
    on clean targets."""

    def __init__(self, seed: int, steps: int, warmup: int = 400) -> None:
        super().__init__(seed, steps, lr=3e-3)
        self.warmup = warmup
        n = steps * self.batch_size
        x, y = regression_data(seed, 13, n)
        noise = (torch.linspace(0.1, 3.0, n) * torch.randn(n, generator=_gen(seed, 14))).view_as(y)
        self.train_tensors = (x, y + noise)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train_tensors), batch_size=self.batch_size, shuffle=False)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}


class GaussianNLL(ZooModule):
    """Heteroscedastic regression: the MLP predicts a mean and a log-variance; loss: Gaussian NLL (0.5 (log var +
    err^2 / var)). Targets 0.5 sin(x) with noise whose std varies from 0.3 to 1.0 along x: the converged NLL hovers
    around 0 (batch values of either sign; the untrained model starts near 0.35). Metric: validation NLL (lower is
    better)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=3e-3)
        self.net = mlp([1, 64, 64, 2])

        def data(salt: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = _gen(seed, salt)
            x = torch.rand(n, 1, generator=g) * 6 - 3
            std = 0.3 + 0.7 * (1 + torch.sin(2 * x)) / 2
            return x, 0.5 * torch.sin(x) + std * torch.randn(n, 1, generator=g)

        self.train_tensors = data(3, 2048)
        self.val_x, self.val_y = data(5, 2048)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        mu, logvar = out[:, :1], out[:, 1:].clamp(-10, 10)
        return (0.5 * (logvar + (y - mu) ** 2 / logvar.exp())).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.nll(*batch)

    def metric(self) -> float:
        return float(self.nll(self.val_x, self.val_y))


class PoissonCounts(ZooModule):
    """Count regression with a log link: 8 inputs, rates exp(2.5 + 2.25 tanh(x . w / 2)) (about 1 to 140), Poisson
    NLL on the log rate, Adam 3e-3, batch 64. The gradient norm is heavy-tailed (a batch of high counts pulls hard)
    and falls by an order of magnitude as the rates are learned. Metric: validation Poisson deviance."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=64, lr=3e-3)
        self.net = mlp([8, 32, 32, 1])
        w = torch.randn(8, generator=_gen(0, 77))  # the same rate function for every seed

        def data(salt: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = _gen(seed, salt)
            x = torch.randn(n, 8, generator=g)
            return x, torch.poisson(torch.exp(2.5 + 2.25 * torch.tanh(x @ w / 2)), generator=g)

        self.train_tensors = data(3, 2048)
        self.val_x, self.val_y = data(5, 512)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.poisson_nll_loss(self.net(x).squeeze(1), y, log_input=True, full=False)

    def metric(self) -> float:
        mu, y = self.net(self.val_x).squeeze(1).exp(), self.val_y
        return float((2 * (torch.xlogy(y, y / mu) - (y - mu))).mean())


class HingeSatisfied(ZooModule):
    """Binary classifier with a margin (hinge) loss, pretrained on easy points (|score| > 1) until every easy point
    clears the margin; the fit's first 10 batches are easy points (loss exactly 0), then the full distribution, near
    the boundary, comes in. Metric: validation hinge loss on the full distribution (lower is better)."""

    def __init__(self, seed: int, steps: int, easy_batches: int = 10) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.net = mlp([16, 64, 1])
        g = _gen(seed, 3)
        w = torch.randn(16, 1, generator=torch.Generator().manual_seed(99))
        w = w / w.norm()

        def data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = torch.randn(n, 16, generator=g)
            s = (x @ w + 0.5 * teacher(x, scale=1.0)).squeeze(1)
            return x, torch.where(s > 0, 1.0, -1.0), s

        x, y, s = data(4096)
        self.val_x, self.val_y, _ = data(2048)
        easy = (s.abs() > 1.0).nonzero().squeeze(1)
        xe, ye = x[easy], y[easy]
        for _ in range(40):  # until every easy point clears the margin (hinge with margin 1.5: 1 is surely met)
            pretrain(
                self.net.parameters(),
                lambda i: F.relu(1.5 - ye[i] * self.net(xe[i]).squeeze(1)).mean(),
                len(xe),
                50,
                3e-3,
                128,
                _gen(seed, 4),
            )
            with torch.no_grad():
                if float(F.relu(1.0 - ye * self.net(xe).squeeze(1)).max()) == 0.0:
                    break
        order = torch.cat(
            [
                easy[torch.randperm(len(easy), generator=g)][: easy_batches * self.batch_size],
                stream_order(len(x), steps + 1, self.batch_size, g),
            ]
        )
        self.xy, self.order = (x, y), order

    def train_dataloader(self) -> DataLoader:
        return ordered_loader(self.xy, self.order, self.batch_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.relu(1.0 - y * self.net(x).squeeze(1)).mean()

    def metric(self) -> float:
        return float(F.relu(1.0 - self.val_y * self.net(self.val_x).squeeze(1)).mean())


class DigitsClassifier(ZooModule):
    """MLP 64 -> 128 -> 10 on scikit-learn's digits; metric: validation accuracy (higher is better).

    ``mode``: ``"plain"``, ``"label_smoothing"`` (CE with smoothing 0.1), ``"adamw_steplr"`` (AdamW, weight decay
    0.05, LR x0.3 every 150 steps), ``"onecycle"`` (SGD momentum, OneCycleLR), ``"bf16"`` (run under
    ``precision='bf16-mixed'``; nothing changes in the module), ``"lbfgs"`` (LBFGS lr 0.5, 4 iterations and a
    strong-Wolfe line search per step, batch 128: several closure evaluations per step, trial losses up to 1e5x the
    step's), ``"sign_code"`` (64 -> 128 -> 128 -> sign() -> 64 -> 10: no straight-through estimator, so the layers
    before the sign never get a gradient; Adam 3e-3).
    """

    higher_is_better = True

    def __init__(self, seed: int, steps: int, mode: str = "plain", lr: float = 1e-3) -> None:
        super().__init__(seed, steps, batch_size=128 if mode == "lbfgs" else 32, lr=lr)
        self.mode = mode
        self.net = mlp([64, 128, 10])
        if mode == "sign_code":
            self.pre = mlp([64, 128, 128])  # what feeds the sign: never a gradient
            self.net = mlp([128, 64, 10])
        xt, yt, self.val_x, self.val_y = digits(seed)
        self.train_tensors = (xt, yt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.sign(self.pre(x))) if self.mode == "sign_code" else self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.1 if self.mode == "label_smoothing" else 0.0)

    def metric(self) -> float:
        return float((self(self.val_x).argmax(1) == self.val_y).float().mean())

    def configure_optimizers(self) -> Any:
        if self.mode == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4, line_search_fn="strong_wolfe")
        if self.mode == "adamw_steplr":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
            sched: Any = torch.optim.lr_scheduler.StepLR(opt, step_size=150, gamma=0.3)
        elif self.mode == "onecycle":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.steps + 1)
        else:
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RestartsCurriculum(ZooModule):
    """Digits MLP 64 -> 128 -> 128 -> 10, SGD momentum 0.9 under warm restarts (``CosineAnnealingWarmRestarts``,
    T_0=100, LR 0.1 -> 0.001 and back every 100 steps); classes 0-4 only until step ``switch``, then all ten. The
    switch comes with a restart: the loss jumps ~1000x from the easy phase's best while the LR is 10x the best
    window's, which looks like an LR that grew past its stable value, but the run trained at that LR before its best
    (every cycle starts there). Metric: validation accuracy on all ten classes."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, switch: int = 300) -> None:
        super().__init__(seed, steps, batch_size=64, lr=0.1)
        self.switch = switch
        self.net = mlp([64, 128, 128, 10])
        xt, yt, self.val_x, self.val_y = digits(seed)
        self.train_tensors = (xt, yt)
        easy = yt < 5
        self.easy_x, self.easy_y = xt[easy], yt[easy]
        self._easy_gen = _gen(seed, 31)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step < self.switch:  # the easy stage: a batch of classes 0-4 instead
            idx = torch.randint(0, len(self.easy_x), (len(x),), generator=self._easy_gen)
            x, y = self.easy_x[idx], self.easy_y[idx]
        return F.cross_entropy(self.net(x), y)

    def metric(self) -> float:
        return float((self.net(self.val_x).argmax(1) == self.val_y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=100, eta_min=1e-3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _digit_backbone(seed: int) -> nn.Sequential:
    """64 -> 64 -> 32 ReLU features, pretrained (with a throw-away head) on digits 0-4 only (Adam, 300 steps)."""
    xt, yt, _, _ = digits(seed)
    keep = yt < 5
    x, y = xt[keep], yt[keep]
    backbone = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    head = nn.Linear(32, 5)
    params = list(backbone.parameters()) + list(head.parameters())
    pretrain(params, lambda i: F.cross_entropy(head(backbone(x[i])), y[i]), len(x), 300, 3e-3, 64, _gen(seed, 9))
    return backbone


class Probe(ZooModule):
    """A new 10-class head on a backbone pretrained on digits 0-4. ``unfreeze_at=None``: linear probing (backbone
    frozen for good, only the head in the optimizer). Otherwise the backbone is frozen until that step, then unfrozen
    and added to the optimizer as a new param group at a 10x lower LR (what ``BackboneFinetuning`` does). Metric:
    validation accuracy on all 10 digits."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, unfreeze_at: int | None = None) -> None:
        super().__init__(seed, steps, batch_size=32, lr=3e-3)
        self.backbone = _digit_backbone(seed)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(32, 10)
        self.unfreeze_at = unfreeze_at
        xt, yt, self.val_x, self.val_y = digits(seed)
        self.train_tensors = (xt, yt)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.unfreeze_at is not None and self.global_step == self.unfreeze_at:
            opt = self.trainer.optimizers[0]
            if len(opt.param_groups) == 1:
                self.backbone.requires_grad_(True)
                opt.add_param_group({"params": list(self.backbone.parameters()), "lr": self.lr / 10})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def metric(self) -> float:
        return float((self.head(self.backbone(self.val_x)).argmax(1) == self.val_y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.head.parameters(), lr=self.lr)


class Distill(ZooModule):
    """A 64 -> 16 -> 10 student trained only on a 64 -> 256 -> 10 teacher's soft targets (KL at temperature 4, x T^2);
    the teacher is trained in the builder. Metric: student validation accuracy (higher is better)."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=3e-3)
        xt, yt, self.val_x, self.val_y = digits(seed)
        teacher_net = mlp([64, 256, 10])
        pretrain(
            teacher_net.parameters(),
            lambda i: F.cross_entropy(teacher_net(xt[i]), yt[i]),
            len(xt),
            300,
            3e-3,
            64,
            _gen(seed, 9),
        )
        with torch.no_grad():
            soft = teacher_net(xt)
        self.train_tensors = (xt, soft)
        self.student = mlp([64, 16, 10])
        self.temperature = 4.0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, t_logits = batch
        t = self.temperature
        return F.kl_div(
            F.log_softmax(self.student(x) / t, 1),
            F.log_softmax(t_logits / t, 1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)

    def metric(self) -> float:
        return float((self.student(self.val_x).argmax(1) == self.val_y).float().mean())


class ScheduledSampling(ZooModule):
    """An autoregressive GRU cell (64 units) on sine waves (40 steps; random frequency, phase, amplitude) trained with
    scheduled sampling: from step 60 the share of its own predictions fed back as inputs ramps 0 -> 0.9 over 200
    steps, while a linear LR warm-up (Adam to 4e-3 over 250 steps) runs. The task hardens as the LR grows, so the
    training loss climbs ~10x from its best window while the LR grows 2x. Metric: free-running validation MSE (the
    model's own predictions fed back after 10 given steps)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=4e-3)
        torch.manual_seed(seed)
        self.cell, self.out = nn.GRUCell(1, 64), nn.Linear(64, 1)
        self.train_tensors = (self._waves(4000, _gen(seed, 3)),)
        self.val_x = self._waves(200, _gen(0, 999))

    @staticmethod
    def _waves(n: int, g: torch.Generator, length: int = 40) -> torch.Tensor:
        f = 0.1 + 0.3 * torch.rand(n, 1, generator=g)
        phase = 6.28 * torch.rand(n, 1, generator=g)
        amp = 0.5 + torch.rand(n, 1, generator=g)
        return (amp * torch.sin(f * torch.arange(length)[None].float() + phase)).unsqueeze(-1)

    def rollout(self, x: torch.Tensor, p_own: float) -> torch.Tensor:
        h, inp, preds = x.new_zeros(len(x), 64), x[:, 0], []
        for t in range(x.shape[1] - 1):
            h = self.cell(inp, h)
            y = self.out(h)
            preds.append(y)
            if t + 1 < 10 or p_own == 0:
                inp = x[:, t + 1]
            else:
                use = (torch.rand(len(x), 1) < p_own).float()  # the global generator: reruns restore it
                inp = use * y.detach() + (1 - use) * x[:, t + 1]
        return torch.stack(preds, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.trainer.global_step
        p_own = 0.0 if step < 60 else min(0.9, (step - 60) / 200)
        x = batch[0]
        return F.mse_loss(self.rollout(x, p_own)[:, 9:], x[:, 10:])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 250))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    def metric(self) -> float:
        return float(F.mse_loss(self.rollout(self.val_x, 1.0)[:, 9:], self.val_x[:, 10:]))


class StiffPINN(ZooModule):
    """A physics-informed network (tanh MLP 1-48-48-48-1) for u'' = -k^2 sin(kx) on [0, 1], k = 4 pi, u(0) = 0,
    u(1) = 2: the mean squared PDE residual at 64 random collocation points (second derivatives by autograd) plus
    1000 x the boundary error, Adam 3e-3. Its natural gradient norm is 1,000-5,000 for the whole run (a stiff loss
    with a heavily weighted term). Metric: RMSE against the exact solution sin(kx) + 2x on 201 points."""

    K = 4 * math.pi

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=64, lr=3e-3)
        torch.manual_seed(seed)
        self.net = mlp([1, 48, 48, 48, 1], act=nn.Tanh)
        self.train_tensors = (torch.rand(20000, 1, generator=_gen(seed, 3)),)
        self.val_x = torch.linspace(0, 1, 201)[:, None]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0].clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
        residual = ((d2u + self.K**2 * torch.sin(self.K * x)) ** 2).mean()
        ends = torch.tensor([[0.0], [1.0]])
        boundary = ((self.net(ends) - torch.tensor([[0.0], [2.0]])) ** 2).mean()
        return residual + 1000.0 * boundary

    def metric(self) -> float:
        exact = torch.sin(self.K * self.val_x) + 2 * self.val_x
        return float(((self.net(self.val_x) - exact) ** 2).mean().sqrt())


class BNCNN(ZooModule):
    """Conv(1->8) BN ReLU, Conv(8->16) BN ReLU, average pool 2x2, Linear(64 -> 10) on 8x8 digits, Adam 3e-3; metric:
    validation accuracy in eval mode (running statistics)."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=3e-3)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
        xt, yt, xv, self.val_y = digits(seed)
        self.train_tensors = (xt.view(-1, 1, 8, 8), yt)
        self.val_x = xv.view(-1, 1, 8, 8)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def metric(self) -> float:
        return float((self.net(self.val_x).argmax(1) == self.val_y).float().mean())


class VAE(ZooModule):
    """A VAE (16 -> 64 -> 64 -> 2x8 latent -> 64 -> 64 -> 16, Gaussian likelihood with unit variance: reconstruction
    term 0.5 x the summed squared error) on 16-d data lying near a 2-d manifold (a fixed random tanh map of 2 Gaussian
    factors, standardised, plus noise 0.05); the KL weight beta ramps linearly from 0 to 1 over steps 100-300. With
    beta 0 the autoencoder reconstructs well (loss ~0.7) while its KL term grows freely; the ramp then multiplies the
    loss ~5x over 200 steps, by design. Metric: validation negative ELBO at beta 1 with z = mu (deterministic; lower is
    better)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.enc = mlp([16, 64, 64, 16])
        self.dec = mlp([8, 64, 64, 16])
        gm = torch.Generator().manual_seed(5)
        mix, out = torch.randn(2, 32, generator=gm), torch.randn(32, 16, generator=gm) / 32**0.5
        std = (torch.tanh(torch.randn(8192, 2, generator=gm) @ mix) @ out).std(0)

        def data(salt: int, n: int) -> torch.Tensor:
            g = _gen(seed, salt)
            x = (torch.tanh(torch.randn(n, 2, generator=g) @ mix) @ out) / std
            return x + 0.05 * torch.randn(x.shape, generator=g)

        self.train_tensors = (data(3, 4096),)
        self.val_x = data(5, 1024)

    def neg_elbo(self, x: torch.Tensor, beta: float, sample: bool) -> torch.Tensor:
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        rec = 0.5 * ((self.dec(z) - x) ** 2).sum() / len(x)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum() / len(x)
        return rec + beta * kl

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        beta = min(1.0, max(0.0, (self.global_step - 100) / 200))
        return self.neg_elbo(batch[0], beta, sample=True)

    def metric(self) -> float:
        return float(self.neg_elbo(self.val_x, 1.0, sample=False))


class TwoOptimizersLate(ZooModule):
    """Manual optimization, two networks and two optimizers: a regressor (teacher 0, its own Adam) steps from the
    first batch; a digits classifier (cross-entropy, its own Adam) starts stepping at batch ``start_b``. Metric:
    validation MSE of the regressor + validation cross-entropy of the classifier (lower is better)."""

    def __init__(self, seed: int, steps: int, start_b: int = 100) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.automatic_optimization = False
        self.start_b = start_b
        self.reg = mlp([16, 64, 64, 1])
        self.cls = mlp([64, 64, 10])
        xt, yt, self.val_xc, self.val_yc = digits(seed)
        xr, yr = regression_data(seed, 3, len(xt))
        self.train_tensors = (xr, yr + 0.3 * torch.randn(yr.shape, generator=_gen(seed, 4)), xt, yt)
        self.val_xr, self.val_yr = regression_data(seed, 5, 1024)
        self.batches_seen = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        xr, yr, xc, yc = batch
        opt_r, opt_c = self.optimizers()
        loss_r = F.mse_loss(self.reg(xr), yr)
        opt_r.zero_grad()
        self.manual_backward(loss_r)
        opt_r.step()
        if self.batches_seen >= self.start_b:
            loss_c = F.cross_entropy(self.cls(xc), yc)
            opt_c.zero_grad()
            self.manual_backward(loss_c)
            opt_c.step()
        self.batches_seen += 1

    def metric(self) -> float:
        return float(
            F.mse_loss(self.reg(self.val_xr), self.val_yr) + F.cross_entropy(self.cls(self.val_xc), self.val_yc)
        )

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.reg.parameters(), lr=self.lr),
            torch.optim.Adam(self.cls.parameters(), lr=self.lr),
        ]


class GAN(ZooModule):
    """A GAN on a 2-D correlated Gaussian (mean (1, -1)); generator 4 -> 32 -> 32 -> 2, discriminator
    2 -> 32 -> 32 -> 1, non-saturating BCE losses, Adam(2e-3, betas (0.5, 0.999)) each, manual optimization
    (discriminator step, then generator step, every batch). Metric: squared MMD (RBF, bandwidth 1) between 1024
    generated points from fixed noise and 1024 validation points (lower is better; near 0, hence ``travel``)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=64, lr=2e-3)
        self.automatic_optimization = False
        self.gen = mlp([4, 32, 32, 2])
        self.disc = mlp([2, 32, 32, 1], act=nn.LeakyReLU)
        chol = torch.tensor([[1.0, 0.0], [0.6, 0.5]])

        def data(salt: int, n: int) -> torch.Tensor:
            return torch.randn(n, 2, generator=_gen(seed, salt)) @ chol.T + torch.tensor([1.0, -1.0])

        self.train_tensors = (data(3, 4096),)
        self.val_data = data(5, 1024)
        self.val_z = torch.randn(1024, 4, generator=_gen(seed, 6))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), 4, device=real.device)
        fake = self.gen(z)
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        d_loss = F.binary_cross_entropy_with_logits(self.disc(real), ones) + F.binary_cross_entropy_with_logits(
            self.disc(fake.detach()), zeros
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.disc(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def metric(self) -> float:
        return float(mmd2(self.gen(self.val_z), self.val_data))

    def configure_optimizers(self) -> Any:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.gen.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.disc.parameters(), lr=self.lr, betas=betas),
        ]


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """Biased squared MMD with an RBF kernel."""

    def k(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(torch.cdist(u, v) ** 2) / (2 * bandwidth**2)).mean()

    return k(a, a) + k(b, b) - 2 * k(a, b)


class DQN(ZooModule):
    """Q-learning on a tiny random MDP (12 states, 3 actions, deterministic transitions, rewards in [0, 1] plus
    N(0, 0.1) noise, gamma 0.95): a Q-network (one-hot state -> 64 -> 3) regresses r + gamma max_a' Q_target(s', a')
    with a target network synced every 10 steps, Adam 1e-2, batch 16 (the settings of Lightning's DQN example), on
    uniformly sampled transitions (an offline replay buffer: deterministic, no environment loop). Metric: mean
    |Q - Q*| over every state-action pair, Q* from value iteration (lower is better)."""

    def __init__(self, seed: int, steps: int, sync_every: int = 10) -> None:
        super().__init__(seed, steps, batch_size=16, lr=1e-2)
        s_n, a_n, self.gamma, self.sync_every = 12, 3, 0.95, sync_every
        g = _gen(seed, 3)
        nxt = torch.randint(0, s_n, (s_n, a_n), generator=g)
        rew = torch.rand(s_n, a_n, generator=g)
        q = torch.zeros(s_n, a_n)
        for _ in range(1000):
            q = rew + self.gamma * q.max(1).values[nxt]
        self.q_star, self.s_n = q, s_n
        n = 8192
        s = torch.randint(0, s_n, (n,), generator=g)
        a = torch.randint(0, a_n, (n,), generator=g)
        r = rew[s, a] + 0.1 * torch.randn(n, generator=g)
        self.train_tensors = (s, a, r, nxt[s, a])
        self.q_net = mlp([s_n, 64, a_n])
        self.target_net = copy.deepcopy(self.q_net).requires_grad_(False)

    def q(self, net: nn.Module, s: torch.Tensor) -> torch.Tensor:
        return net(F.one_hot(s, self.s_n).float())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step % self.sync_every == 0:
            self.target_net.load_state_dict(self.q_net.state_dict())
        s, a, r, s2 = batch
        with torch.no_grad():
            target = r + self.gamma * self.q(self.target_net, s2).max(1).values
        pred = self.q(self.q_net, s).gather(1, a[:, None]).squeeze(1)
        return F.mse_loss(pred, target)

    def metric(self) -> float:
        return float((self.q(self.q_net, torch.arange(self.s_n)) - self.q_star).abs().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.q_net.parameters(), lr=self.lr)


class Reinforce(ZooModule):
    """REINFORCE on a contextual bandit: 8-d Gaussian contexts, 4 arms paying 1 with probability
    sigmoid(2 (W x)_a) (W fixed); softmax policy 8 -> 32 -> 4; loss -(log pi(a|x) (r - mean r of the batch)).mean(),
    centred on 0. Metric: exact expected reward of the policy on 1024 fixed validation contexts (higher is better)."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=64, lr=3e-3)
        self.w = torch.randn(8, 4, generator=torch.Generator().manual_seed(4242))
        self.policy = mlp([8, 32, 4])
        self.train_tensors = (torch.randn(8192, 8, generator=_gen(seed, 3)),)
        self.val_x = torch.randn(1024, 8, generator=_gen(seed, 5))

    def pay(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2 * x @ self.w)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        logp = F.log_softmax(self.policy(x), 1)
        a = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        r = torch.bernoulli(self.pay(x).gather(1, a[:, None]).squeeze(1))
        return -(logp.gather(1, a[:, None]).squeeze(1) * (r - r.mean())).mean()

    def metric(self) -> float:
        return float((F.softmax(self.policy(self.val_x), 1) * self.pay(self.val_x)).sum(1).mean())


class InfoNCE(ZooModule):
    """Contrastive learning (InfoNCE, temperature 0.2, batch 64) of a 64 -> 64 -> 16 encoder on two noisy views of
    digits (Gaussian noise 0.2 and 20 % pixel dropout). Metric: the InfoNCE loss between two fixed noisy views of the
    397 validation images, all of them in one batch (lower is better; log 397 = 5.98 for a constant encoder)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=64, lr=1e-3)
        self.enc = mlp([64, 64, 16])
        xt, _, xv, _ = digits(seed)
        self.train_tensors = (xt,)
        g = _gen(seed, 5)
        self.val_views = (self._view(xv, g), self._view(xv, g))

    @staticmethod
    def _view(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=g) if g is not None else torch.randn_like(x)
        keep = (torch.rand(x.shape, generator=g) if g is not None else torch.rand_like(x)) > 0.2
        return (x + 0.2 * noise) * keep

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.enc(x), dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        z1, z2 = self.embed(self._view(x)), self.embed(self._view(x))
        return F.cross_entropy(z1 @ z2.T / 0.2, torch.arange(len(x)))

    def metric(self) -> float:
        z1, z2 = self.embed(self.val_views[0]), self.embed(self.val_views[1])
        return float(F.cross_entropy(z1 @ z2.T / 0.2, torch.arange(len(z1))))


class TinyTransformerLM(ZooModule):
    """A one-layer causal transformer (d 32, 2 heads, feed-forward 64, learned positions) character LM on
    scikit-learn's dataset descriptions, windows of 32 characters, Adam 3e-3. Metric: validation bits per character
    (lower is better)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=16, lr=3e-3)
        text = load_text(40_000)
        vocab = sorted(set(text))
        ids = torch.tensor([vocab.index(c) for c in text])
        split = int(len(ids) * 0.9)
        self.seq = 32
        g = _gen(seed, 3)
        starts = torch.randint(0, split - self.seq - 1, (4096,), generator=g)
        windows = torch.stack([ids[s : s + self.seq + 1] for s in starts.tolist()])
        self.train_tensors = (windows,)
        vs = torch.arange(split, len(ids) - self.seq - 1, self.seq)[:128]
        self.val_windows = torch.stack([ids[s : s + self.seq + 1] for s in vs.tolist()])
        self.emb = nn.Embedding(len(vocab), 32)
        self.pos = nn.Parameter(torch.zeros(self.seq, 32))
        self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, len(vocab))
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(self.seq), persistent=False)

    def ce(self, w: torch.Tensor) -> torch.Tensor:
        x, y = w[:, :-1], w[:, 1:]
        h = self.block(self.emb(x) + self.pos, src_mask=self.causal, is_causal=True)
        logits = self.head(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.ce(batch[0])

    def metric(self) -> float:
        return float(self.ce(self.val_windows)) / math.log(2)


class MultitaskRamp(ZooModule):
    """A shared trunk (16 -> 64 -> 64) and two regression heads (teacher 0 and teacher 1 x 2); loss = L1 + w L2 with
    w ramping 0 -> 1 over the first 200 steps. Metric: validation MSE of both heads, summed (lower is better)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.Linear(64, 2)
        x, y1 = regression_data(seed, 3, 2048)
        self.train_tensors = (x, y1, teacher(x, which=1, scale=6.0))
        self.val_x, v1 = regression_data(seed, 5, 1024)
        self.val_y = torch.cat([v1, teacher(self.val_x, which=1, scale=6.0)], 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y1, y2 = batch
        out = self.heads(self.trunk(x))
        w = min(1.0, self.global_step / 200)
        return F.mse_loss(out[:, :1], y1) + w * F.mse_loss(out[:, 1:], y2)

    def metric(self) -> float:
        out = self.heads(self.trunk(self.val_x))
        return float(F.mse_loss(out[:, :1], self.val_y[:, :1]) + F.mse_loss(out[:, 1:], self.val_y[:, 1:]))


class DelayedDrop(ZooModule):
    """A deep linear network (four 16 x 16 layers, no nonlinearity, no bias) from a small initialisation (std
    0.35 / sqrt(16)) learning a fixed rank-3 linear map with SGD lr 0.1: the loss sits on a plateau at (and, batch to
    batch, above) its starting value for 100-150 steps, then drops suddenly (a saddle escape: the "grokking"-like
    shape of a delayed improvement). Metric: validation MSE against the noiseless map (lower is better; it ends near
    0, hence the ``travel`` tolerance)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=0.1)
        self.net = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(4)])
        with torch.no_grad():
            for lin in self.net:
                lin.weight.normal_(0.0, 0.35 / 4)
        gm = torch.Generator().manual_seed(31)
        u, v = (
            torch.linalg.qr(torch.randn(16, 3, generator=gm))[0],
            torch.linalg.qr(torch.randn(16, 3, generator=gm))[0],
        )
        self.m = u @ torch.diag(torch.tensor([3.0, 2.5, 2.0])) @ v.T
        x = torch.randn(2048, 16, generator=_gen(seed, 3))
        self.train_tensors = (x, x @ self.m.T + 0.05 * torch.randn(2048, 16, generator=_gen(seed, 4)))
        self.val_x = torch.randn(1024, 16, generator=_gen(seed, 5))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def metric(self) -> float:
        return float(F.mse_loss(self.net(self.val_x), self.val_x @ self.m.T))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FP16Scaler(Regression):
    """The regression MLP under fp16 autocast with a real ``torch.amp.GradScaler('cpu')`` (``growth_interval=50``:
    the scale doubles every 50 clean steps, so it overflows now and then, as on long runs) and one injected overflow
    (the loss x1e6 at step ``overflow_at``: finite in float32, inf once scaled into fp16 gradients). The scaler skips
    the overflow steps and halves its scale; ``amp_overflows`` counts the steps where the scale fell."""

    def __init__(self, seed: int, steps: int, overflow_at: int = 200) -> None:
        super().__init__(seed, steps)
        self.overflow_at = overflow_at
        self.amp_overflows = 0
        self.amp_min_scale = math.inf
        self._last_scale: float | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        return loss * 1e6 if self.global_step == self.overflow_at else loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scale = float(scaler.get_scale())
            if self._last_scale is not None and scale < self._last_scale:
                self.amp_overflows += 1
            self._last_scale = scale
            self.amp_min_scale = min(self.amp_min_scale, scale)


class FP16SumScaler(FP16Scaler):
    """:class:`FP16Scaler` on a run with large gradients: targets in larger units (std 90) and a sum-reduced MSE over
    batches of 512. Gradient elements reach ~1e5, above fp16's range, so the scaler must settle below a scale of 1
    (it overflows, halves and grows back every 50 steps); no overflow is injected. Metric: validation MSE (lower is
    better)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, overflow_at=-1)
        self.batch_size = 512
        x, y = regression_data(seed, 3, 8192)
        self.train_tensors = (x, 30.0 * (y + 0.3 * torch.randn(y.shape, generator=_gen(seed, 4))))
        self.val_y = 30.0 * self.val_y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y, reduction="sum")


def _fp16_kwargs() -> dict[str, Any]:
    from lightning.pytorch.plugins import MixedPrecision

    # precision="16-mixed" with accelerator="cpu" silently becomes bf16-mixed in Lightning 2.6 (a warning says so);
    # an explicit plugin gives real fp16 autocast on the CPU with a GradScaler.
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", growth_interval=50))]}


# ----------------------------------------------------------------------------------------------------------------------
# The registry


class ClassIncremental(ZooModule):
    """Digits MLP 64 -> 128 -> 10 (Adam 1e-3, batch 32) shown classes 0 and 1 only until step ``switch``, then every
    class; metric: validation accuracy on all ten. Batches are drawn inside ``training_step`` (seeded by the batch
    index), from the pool the curriculum allows at that step."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, switch: int = 1400) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.switch = switch
        self.net = mlp([64, 128, 10])
        self.x, self.y, self.val_x, self.val_y = digits(seed)
        self.easy = torch.nonzero(self.y <= 1).squeeze(1)
        self.train_tensors = (torch.arange(steps * 32),)  # only the batch index matters

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.seed) * 100_003 + int(batch_idx))
        pool = self.easy if self.global_step < self.switch else torch.arange(len(self.y))
        idx = pool[torch.randint(0, len(pool), (32,), generator=g)]
        return F.cross_entropy(self.net(self.x[idx]), self.y[idx])

    def metric(self) -> float:
        return float((self.net(self.val_x).argmax(1) == self.val_y).float().mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train_tensors), batch_size=32)


class LossWeightStep(ZooModule):
    """Digits MLP 64 -> 128 -> 10 (Adam 1e-3, batch 32) whose whole loss is weighted ``w0`` until step ``switch``,
    then 1 (a loss weight raised at once: the loss and every gradient jump 1/w0 x; Adam's update barely changes).
    Batches are drawn inside ``training_step`` (seeded by the batch index); metric: validation accuracy."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, switch: int = 300, w0: float = 1e-4) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.switch, self.w0 = switch, w0
        self.net = mlp([64, 128, 10])
        self.x, self.y, self.val_x, self.val_y = digits(seed)
        self.train_tensors = (torch.arange(steps * 32),)  # only the batch index matters

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.seed) * 100_003 + int(batch_idx))
        idx = torch.randint(0, len(self.y), (32,), generator=g)
        weight = self.w0 if self.global_step < self.switch else 1.0
        return weight * F.cross_entropy(self.net(self.x[idx]), self.y[idx])

    def metric(self) -> float:
        return float((self.net(self.val_x).argmax(1) == self.val_y).float().mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train_tensors), batch_size=32)


class RarePositives(ZooModule):
    """Imbalanced binary classification: 20 noisy features, positives the top ``rate`` of a random linear score (0.2 %
    of 40,000 training rows), MLP 20 -> 64 -> 1, ``BCEWithLogitsLoss(pos_weight=neg/pos)`` (the usual recipe), Adam
    1e-3, batch 32 drawn inside ``training_step`` (seeded by the batch index): ~6 % of batches hold a positive, and
    once the model predicts the majority class their gradients are 100-10,000x the rest. Metric: validation ROC AUC
    (20,000 rows, ~40 positives). ``benchmarks/rare_classes.py`` runs variants (no pos_weight, focal loss, SGD)."""

    higher_is_better = True

    def __init__(
        self,
        seed: int,
        steps: int,
        rate: float = 0.002,
        pos_weight: float | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        batch: int = 32,
        loss: str = "bce",
    ) -> None:
        """``pos_weight`` None: neg/pos of the training set; ``optimizer`` "adam" or "sgd" (momentum 0.9);
        ``loss`` "bce" or "focal" (alpha 0.99, gamma 2, summed and divided by the batch's positives)."""
        super().__init__(seed, steps, batch_size=batch, lr=lr)
        g = _gen(seed, 11)
        x = torch.randn(60_000, 20, generator=g)
        score = x @ torch.randn(20, generator=g)
        y = (score > torch.quantile(score, 1.0 - rate)).float()
        x = x + 0.5 * torch.randn(x.shape, generator=g)
        self.x, self.y, self.val_x, self.val_y = x[:40_000], y[:40_000], x[40_000:], y[40_000:]
        balanced = float((1 - y).sum() / y.sum())  # neg/pos of all rows
        self.pos_weight = torch.tensor(balanced if pos_weight is None else float(pos_weight))
        self.optimizer_name, self.loss_name = optimizer, loss
        self.net = mlp([20, 64, 1])
        self.train_tensors = (torch.arange(steps * batch),)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.seed) * 100_003 + int(batch_idx))
        idx = torch.randint(0, len(self.y), (self.batch_size,), generator=g)
        logits, y = self.net(self.x[idx]).squeeze(1), self.y[idx]
        if self.loss_name == "focal":  # Lin et al. 2017
            p = torch.sigmoid(logits)
            ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
            pt = torch.where(y > 0, p, 1 - p)
            alpha = torch.where(y > 0, 0.99, 0.01)
            return (alpha * (1 - pt) ** 2 * ce).sum() / y.sum().clamp_min(1.0)
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight)

    def metric(self) -> float:
        p = self.net(self.val_x).squeeze(1)
        pos, neg = p[self.val_y > 0], p[self.val_y == 0]
        return float((pos[:, None] > neg[None, :]).float().mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train_tensors), batch_size=self.batch_size)


class SparseRewardChain(ZooModule):
    """REINFORCE on a chain of ``length`` + 1 states: start at 0, step left or right, reward ``reward`` on reaching
    the end within ``length + 4`` moves, nothing otherwise. Policy: MLP on the one-hot state (32 hidden units), Adam
    1e-2; 32 episodes per step rolled out inside ``training_step`` (on-policy, torch's global generator); batch-mean
    baseline and an entropy bonus of 0.01. Metric: 1 - the exact probability that the stochastic policy reaches the
    end within the horizon (dynamic programming over the states; lower is better)."""

    def __init__(self, seed: int, steps: int, length: int = 10, reward: float = 100.0) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-2)
        self.length, self.reward, self.horizon = length, reward, length + 4
        self.pi = mlp([length + 1, 32, 2])
        self.train_tensors = (torch.arange(steps * 32),)

    def _onehot(self, s: torch.Tensor) -> torch.Tensor:
        return F.one_hot(s, self.length + 1).float()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        n = len(batch[0])
        s = torch.zeros(n, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        logps, ents = [], []
        for _ in range(self.horizon):
            logp = F.log_softmax(self.pi(self._onehot(s)), 1)
            a = torch.multinomial(logp.exp().detach(), 1).squeeze(1)
            logps.append(logp.gather(1, a[:, None]).squeeze(1) * (~done))
            ents.append(-(logp.exp() * logp).sum(1) * (~done))
            s = torch.where(done, s, torch.clamp(s + 2 * a - 1, 0, self.length))
            done = done | (s == self.length)
        r = done.float() * self.reward
        pg = -((r - r.mean()) * torch.stack(logps).sum(0)).mean()
        return pg - 0.01 * torch.stack(ents).sum(0).mean()

    def metric(self) -> float:
        right = F.softmax(self.pi(self._onehot(torch.arange(self.length + 1))), 1)[:, 1]
        dist = torch.zeros(self.length + 1)
        dist[0] = 1.0
        reached = 0.0
        for _ in range(self.horizon):
            nxt = torch.zeros_like(dist)
            for st in range(self.length):
                nxt[st + 1] += dist[st] * right[st]
                nxt[max(st - 1, 0)] += dist[st] * (1 - right[st])
            reached += float(nxt[self.length])
            nxt[self.length] = 0.0
            dist = nxt
        return 1.0 - reached

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train_tensors), batch_size=32)


class CyclicLR(ZooModule):
    """Digits MLP 64 -> 128 -> 128 -> 10, SGD momentum 0.9 under ``CyclicLR`` (triangular: 0.005 -> 0.3 -> 0.005
    every 100 steps; Smith 2017, "Cyclical Learning Rates for Training Neural Networks"): the LR grows 60x in 50
    steps, again and again, and the loss rises near each peak. Metric: validation accuracy."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, base: float = 0.005, top: float = 0.3, up: int = 50) -> None:
        super().__init__(seed, steps, batch_size=32, lr=base)
        self.top, self.up = top, up
        self.net = mlp([64, 128, 128, 10])
        xt, yt, self.val_x, self.val_y = digits(seed)
        self.train_tensors = (xt, yt)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def metric(self) -> float:
        return float((self.net(self.val_x).argmax(1) == self.val_y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=self.lr, max_lr=self.top, step_size_up=self.up)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CyclicKLVAE(VAE):
    """:class:`VAE` with a cyclical KL schedule (Fu et al. 2019, "Cyclical Annealing Schedule"): every 150 steps
    beta ramps 0 -> 1 over 75 steps, then holds 1, so the loss climbs by design four times in a run and falls back
    as each cycle starts. Metric: validation negative ELBO at beta 1."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        beta = min(1.0, (self.global_step % 150) / 75)
        return self.neg_elbo(batch[0], beta, sample=True)


class PermutedTasks(ZooModule):
    """Continual learning: a digits MLP whose label map is a new permutation of the ten classes every 150 steps.
    At each switch the model is confidently wrong (the loss jumps ~10x from its best, the gradient with it) and
    relearns at the same LR. Metric: validation accuracy on the last task's labels."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, every: int = 150) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.every = every
        self.net = mlp([64, 128, 128, 10])
        xt, yt, self.val_x, self.val_y = digits(seed)
        self.train_tensors = (xt, yt)
        g = _gen(seed, 77)
        self.perms = [torch.randperm(10, generator=g) for _ in range(steps // every + 1)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), self.perms[self.global_step // self.every][y])

    def metric(self) -> float:
        last = self.perms[(self.steps - 1) // self.every]
        return float((self.net(self.val_x).argmax(1) == last[self.val_y]).float().mean())


class Memorize(ZooModule):
    """Memorising 8 random regression targets (MLP 16 -> 128 -> 1, full batch, Adam 1e-2), as a user does to check a
    model can overfit (Lightning's ``overfit_batches``): the loss falls to ~1e-15, then Adam's steps at that floor
    throw it back up by 1e5x-1e10x now and then (it stays tiny: ~1e-3 at most). Metric: the training MSE (tolerance:
    2 % of the distance travelled from the untrained loss)."""

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=8, lr=1e-2)
        g = _gen(seed, 41)
        self.x, self.y = torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)
        self.train_tensors = (self.x, self.y)
        self.net = mlp([16, 128, 1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def metric(self) -> float:
        return float(F.mse_loss(self.net(self.x), self.y))


class AlternatingTasks(ZooModule):
    """Multi-task learning with the tasks' batches alternating (as ``CombinedLoader`` and MT-DNN-style training do):
    a shared trunk (64 -> 128 -> 128) with a digits classification head (cross-entropy ~2.3 untrained) and a
    regression head on a second dataset whose targets have std ~30 (MSE in the hundreds untrained), Adam 1e-3, one
    task per batch in turn. The loss stream interleaves two scales 100x apart: the first batch (classification) is
    no reference for the untrained loss, and the window medians mix both tasks. Metric: the mean of the validation
    accuracy and the regression's validation R^2."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, every: int = 2, scale: float = 30.0) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        self.every = every
        xt, yt, self.val_x, self.val_y = digits(seed)
        g = _gen(seed, 53)
        w = torch.randn(64, 1, generator=torch.Generator().manual_seed(3))
        rx, rvx = torch.randn(2048, 64, generator=g), torch.randn(512, 64, generator=g)
        self.rvx, self.rvy = rvx, scale * torch.tanh(rvx @ w / 8)
        self.cls_data, self.reg_data = (xt, yt), (rx, scale * torch.tanh(rx @ w / 8))
        self.body = mlp([64, 128, 128])
        self.cls, self.reg = nn.Linear(128, 10), nn.Linear(128, 1)

    def train_dataloader(self) -> Any:
        from lightning.pytorch.utilities import CombinedLoader

        def loader(data: tuple[torch.Tensor, ...], salt: int) -> DataLoader:
            g = _gen(self.seed, salt)
            return DataLoader(TensorDataset(*data), batch_size=32, shuffle=True, generator=g, drop_last=True)

        return CombinedLoader({"cls": loader(self.cls_data, 2), "reg": loader(self.reg_data, 3)}, "max_size_cycle")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx % self.every == self.every - 1:
            x, y = batch["reg"]
            return F.mse_loss(self.reg(torch.relu(self.body(x))), y)
        x, y = batch["cls"]
        return F.cross_entropy(self.cls(torch.relu(self.body(x))), y)

    def metric(self) -> float:
        acc = float((self.cls(torch.relu(self.body(self.val_x))).argmax(1) == self.val_y).float().mean())
        r2 = 1.0 - float(F.mse_loss(self.reg(torch.relu(self.body(self.rvx))), self.rvy)) / float(self.rvy.var())
        return 0.5 * (acc + r2)


class LargeBatchWarmup(BNCNN):
    """:class:`BNCNN` trained the large-batch way (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): batch 256,
    SGD momentum 0.9 with weight decay 5e-4, the LR warmed up linearly to 1.0 over 100 steps, then a cosine decay.
    The LR grows 100x while the run is still far from trained. Metric: validation accuracy in eval mode."""

    def __init__(self, seed: int, steps: int, peak: float = 1.0, warm: int = 100) -> None:
        super().__init__(seed, steps)
        self.batch_size, self.lr, self.warm = 256, peak, warm

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        warm, total = self.warm, self.steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ModularAddition(ZooModule):
    """Grokking (Power et al. 2022, arXiv 2201.02177): ``(a + b) mod 23`` from 60 % of the 529 pairs, full batch,
    embeddings (32-d) and a 64 -> 128 -> 23 ReLU MLP, AdamW lr 1e-2 with weight decay 1. The training loss is near 0
    by step ~250, while the validation accuracy is still near chance; it climbs to 0.76-0.97 by step 2000
    (seeds 0-2) as weight decay moves the network from memorising to the general rule. A long stretch with a tiny, flat
    training loss and decaying gradients that is not a dead network. Metric: validation accuracy on the held-out
    pairs."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int, p: int = 23, train_share: float = 0.6) -> None:
        super().__init__(seed, steps, lr=1e-2)
        a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        x, y = torch.stack([a.flatten(), b.flatten()], 1), (a + b).flatten() % p
        order = torch.randperm(p * p, generator=_gen(seed, 61))
        n = int(train_share * p * p)
        self.train_tensors = (x[order[:n]], y[order[:n]])
        self.val_x, self.val_y = x[order[n:]], y[order[n:]]
        self.batch_size = n  # full batch
        self.emb = nn.Embedding(p, 32)
        self.net = mlp([64, 128, p])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.emb(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def metric(self) -> float:
        return float((self(self.val_x).argmax(1) == self.val_y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1.0)


def eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points from 8 Gaussians (std 0.1) evenly spaced on a circle of radius 2."""
    k = torch.randint(0, 8, (n,), generator=g).float() * (math.pi / 4)
    return 2.0 * torch.stack([torch.cos(k), torch.sin(k)], 1) + 0.1 * torch.randn(n, 2, generator=g)


class Diffusion2D(ZooModule):
    """A denoising diffusion model (Ho et al. 2020, arXiv 2006.11239) on 8 Gaussians in 2-D: 100 noise levels
    (linear betas 1e-4 .. 0.02), a 2+16 -> 128 -> 128 -> 2 SiLU MLP that predicts the noise from the noised point
    and a sinusoidal embedding of the level, Adam 1e-3, batch 256. Each sample draws its own level, so the loss is
    noisy and falls slowly (medians of tenths of the run ~0.87 -> ~0.55 over 1500 steps). Metric: MMD^2 between
    1000 ancestral samples (fixed noise) and held-out data."""

    def __init__(self, seed: int, steps: int, levels: int = 100) -> None:
        super().__init__(seed, steps, batch_size=256, lr=1e-3)
        g = _gen(seed, 62)
        self.train_tensors = (eight_gaussians(8192, g),)
        self.val = eight_gaussians(1000, g)
        self.levels = levels
        betas = torch.linspace(1e-4, 0.02, levels)
        self.register_buffer("betas", betas)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0))
        self.net = nn.Sequential(nn.Linear(18, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
        self.noise = _gen(seed, 63)  # the levels and noises of training (the same draws in every configuration)

    def noise_of(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angle = t.float()[:, None] * torch.exp(-math.log(1000.0) * torch.arange(8) / 8)[None]
        return self.net(torch.cat([x, angle.sin(), angle.cos()], 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x0,) = batch
        t = torch.randint(0, self.levels, (x0.shape[0],), generator=self.noise)
        e = torch.randn(x0.shape, generator=self.noise)
        ab = self.alpha_bar[t][:, None]
        return F.mse_loss(self.noise_of(ab.sqrt() * x0 + (1 - ab).sqrt() * e, t), e)

    def metric(self) -> float:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(1000, 2, generator=g)
        for t in reversed(range(self.levels)):
            b, ab = self.betas[t], self.alpha_bar[t]
            x = (x - b / (1 - ab).sqrt() * self.noise_of(x, torch.full((1000,), t))) / (1 - b).sqrt()
            if t:
                x = x + b.sqrt() * torch.randn(1000, 2, generator=g)
        return float(mmd2(x, self.val))


class MixtureDensity(ZooModule):
    """A mixture density network (Bishop 1994, "Mixture Density Networks", NCRG/94/004): 5 Gaussians for y given x
    where x = y + 0.3 sin(2 pi y) + noise (the inverse is multi-valued), a 1 -> 64 -> 64 tanh MLP, Adam 1e-3, batch
    64. Loss: the mixture's negative log-likelihood, which starts near 1, crosses 0 in the first ~100 steps and ends
    near -1 (densities above 1). Metric: validation NLL."""

    def __init__(self, seed: int, steps: int, components: int = 5) -> None:
        super().__init__(seed, steps, batch_size=64, lr=1e-3)
        g = _gen(seed, 64)

        def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.rand(n, 1, generator=g)
            return y + 0.3 * torch.sin(2 * math.pi * y) + 0.05 * torch.randn(n, 1, generator=g), y

        self.train_tensors = data(4096)
        self.val_x, self.val_y = data(1000)
        self.k = components
        self.net = nn.Sequential(
            nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3 * components)
        )

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logit, mu, log_s = self.net(x).split(self.k, 1)
        logp = -0.5 * ((y - mu) / log_s.exp()) ** 2 - log_s - 0.5 * math.log(2 * math.pi)
        return -torch.logsumexp(F.log_softmax(logit, 1) + logp, 1).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.nll(*batch)

    def metric(self) -> float:
        return float(self.nll(self.val_x, self.val_y))


class SharpnessAware(DigitsClassifier):
    """Sharpness-aware minimisation (Foret et al. 2021, arXiv 2010.01412) by manual optimization on the digits MLP:
    a first backward pass, the weights moved rho = 0.05 along the normalised gradient, a second backward pass at the
    moved weights, the move undone, then SGD momentum 0.9 (lr 0.05) steps with the second gradient. Two backward
    passes per step and weights changed in place inside ``training_step``. Metric: validation accuracy."""

    def __init__(self, seed: int, steps: int, rho: float = 0.05) -> None:
        super().__init__(seed, steps, lr=0.05)
        self.rho = rho
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        params = [p for p in self.parameters() if p.grad is not None]
        with torch.no_grad():
            scale = self.rho / (torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) + 1e-12)
            moves = [p.grad * scale for p in params]
            torch._foreach_add_(params, moves)
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        with torch.no_grad():
            torch._foreach_sub_(params, moves)
        opt.step()
        opt.zero_grad()
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Catapult(ZooModule):
    """The catapult phase of large-LR SGD (Lewkowycz et al. 2020, "The large learning rate phase of deep learning:
    the catapult mechanism", arXiv 2003.02218): a 16 -> 512 -> 1 ReLU MLP on the teacher regression (label noise
    0.3), plain SGD, batch 256, at ``c / lambda`` where lambda is the top eigenvalue of the loss Hessian at the
    initialisation (power iteration on a fixed batch of 512, seeded). With ``c`` = 3, between 2 (where a quadratic
    model starts to diverge) and 4, the loss climbs 10-50x over the first ~10 steps (gradient norms to ~200), then
    falls by itself: the climb moves the network to flatter weights on which the LR is stable, and the run ends lower
    than one at a safe LR (``c`` = 1.5: validation MSE 0.41 against 0.27 after 2000 steps, seeds 0-9). Metric:
    validation MSE on clean targets. ``warmup`` > 0: the LR warmed up linearly over that many steps (no catapult).
    """

    def __init__(self, seed: int, steps: int, c: float = 3.0, warmup: int = 0) -> None:
        super().__init__(seed, steps, batch_size=256)
        self.warmup = warmup
        x, y = regression_data(seed, 3, 2048)
        self.train_tensors = (x, y + 0.3 * torch.randn(y.shape, generator=_gen(seed, 4)))
        self.val_x, self.val_y = regression_data(seed, 5, 1024)
        self.net = mlp([16, 512, 1])
        self.lr = c / self.top_eigenvalue(x[:512], self.train_tensors[1][:512], _gen(seed, 65))

    def top_eigenvalue(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator, iters: int = 30) -> float:
        params = list(self.net.parameters())
        grads = torch.autograd.grad(F.mse_loss(self.net(x), y), params, create_graph=True)
        v = [torch.randn(p.shape, generator=g) for p in params]
        lam = 0.0
        for _ in range(iters):
            norm = torch.sqrt(sum((u * u).sum() for u in v))
            v = [u / norm for u in v]
            hv = torch.autograd.grad(grads, params, v, retain_graph=True)
            lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
            v = [h.detach() for h in hv]
        return lam

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def metric(self) -> float:
        return float(F.mse_loss(self.net(self.val_x), self.val_y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.warmup:
            return opt
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``-weight`` backward (Ganin et al. 2016)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return -ctx.weight * grad, None


class DomainAdversarial(ZooModule):
    """Domain-adversarial training (DANN; Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks", JMLR
    17): labelled digits (source) and unlabelled digits with shifted intensities (target: 0.7 x + a fixed per-pixel
    offset of up to 0.5 + noise), a 64 -> 128 -> 64 feature network, a class head and a domain head behind a
    gradient-reversal layer whose weight ramps 0 -> 1 as ``2 / (1 + exp(-10 p)) - 1``; Adam 1e-3, batch 32. Loss:
    source cross-entropy + domain BCE. Metric: target-domain validation accuracy. Not a zoo row: its outcome is
    chaotic (a single gradient scaled by 0.99 or 1.01 at step 16 moves it by up to 0.39), so a per-seed 2 % bar
    cannot be met by anything that touches a gradient; ``benchmarks/dann_chaos.py`` compares distributions over seeds
    instead."""

    higher_is_better = True

    def __init__(self, seed: int, steps: int) -> None:
        super().__init__(seed, steps, batch_size=32, lr=1e-3)
        xt, yt, vx, self.val_y = digits(seed)
        g = _gen(seed, 65)
        offset = 0.5 * torch.rand(64, generator=g)

        def shift(x: torch.Tensor) -> torch.Tensor:
            return 0.7 * x + offset + 0.1 * torch.randn(x.shape, generator=g)

        self.train_tensors = (xt, yt, shift(xt[torch.randperm(len(xt), generator=g)]))
        self.val_x = shift(vx)
        self.feat = mlp([64, 128, 64])
        self.cls = nn.Linear(64, 10)
        self.dom = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        xs, ys, xt = batch
        weight = 2.0 / (1.0 + math.exp(-10.0 * self.global_step / self.steps)) - 1.0
        fs, ft = torch.relu(self.feat(xs)), torch.relu(self.feat(xt))
        d = self.dom(_ReverseGradient.apply(torch.cat([fs, ft]), weight)).squeeze(1)
        domain = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))])
        return F.cross_entropy(self.cls(fs), ys) + F.binary_cross_entropy_with_logits(d, domain)

    def metric(self) -> float:
        return float((self.cls(torch.relu(self.feat(self.val_x))).argmax(1) == self.val_y).float().mean())


@dataclass(frozen=True)
class Shape:
    """One zoo entry: how to build it, how long it trains, how to read its metric."""

    name: str
    what: str  # one line for the table
    build: Callable[[int, int], ZooModule]  # (seed, steps) -> module
    steps: int  # optimizer steps of the benchmark (batches for manual optimization: see max_steps)
    metric: str  # what ZooModule.metric computes, in words
    higher_is_better: bool = False
    tolerance: str = "relative"  # "relative": 2 % of |ref|; "travel": 2 % of max(|ref|, |start - ref|)
    issue_row: str | None = None  # the row of issue 24's table this shape reproduces
    section: str = "healthy"  # "healthy" | "faults"
    extra_configs: tuple[str, ...] = ()  # configurations run for this shape on top of the default three
    trainer_kwargs: Callable[[], dict[str, Any]] | None = None
    optimizer_steps_per_batch: Callable[[int], int] | None = None  # manual optimization: steps -> max_steps
    # stop after the loader's one epoch of ``steps`` batches instead of after ``steps`` optimizer steps: the fault
    # shapes, whose guarded runs skip steps (that Lightning may not count) while their reference drops batches
    one_epoch: bool = False
    cost: float = 1.0  # relative wall time (longest first)

    def max_steps(self, steps: int) -> int:
        return self.optimizer_steps_per_batch(steps) if self.optimizer_steps_per_batch else steps


def _reg(**kw: Any) -> Callable[[int, int], ZooModule]:
    return lambda seed, steps: Regression(seed, steps, **kw)


def _digits(mode: str, lr: float = 1e-3) -> Callable[[int, int], ZooModule]:
    return lambda seed, steps: DigitsClassifier(seed, steps, mode=mode, lr=lr)


MSE = "validation MSE on clean targets"
ACC = "validation accuracy"
_SHAPES: list[Shape] = [
    Shape(
        "finetune",
        "fine-tuning a trained MLP, Adam 1e-4, batch 8, noisy targets (flat noisy loss)",
        FineTune,
        500,
        MSE,
        issue_row="fine-tuning from an already-trained state",
    ),
    Shape(
        "linear_probe",
        "new 10-class head on a frozen backbone pretrained on digits 0-4",
        lambda seed, steps: Probe(seed, steps),
        400,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "noise_drift_warmup",
        "online regression, label noise std 0.1 -> 3 over the run, Adam warmed up to 3e-3 over 400 steps",
        NoiseDriftWarmup,
        1200,
        MSE,
    ),
    Shape(
        "curriculum",
        "regression: 0.3x easy targets, then a harder, larger task from step 200",
        Curriculum,
        500,
        MSE + " (hard task)",
        issue_row="curriculum: easy data, then a harder task at step 200",
    ),
    Shape(
        "vae_kl",
        "VAE (Gaussian likelihood, 16-d data on a 2-d manifold), KL weight 0 -> 1 over steps 100-300",
        VAE,
        400,
        "validation -ELBO at beta 1",
        issue_row="VAE with KL annealing",
    ),
    Shape(
        "two_opt_late",
        "manual optimization: regressor + classifier, 2nd optimizer steps from batch 100",
        TwoOptimizersLate,
        400,
        "validation MSE + validation CE",
        issue_row="manual optimization, a second objective that starts at batch 100",
        optimizer_steps_per_batch=lambda b: b + max(0, b - 100),
    ),
    Shape(
        "masked_first_batch",
        "masked MSE, first batch fully masked (loss exactly 0), then 10 % padding",
        _reg(loss_mode="masked", masked_batches=1),
        400,
        MSE,
        issue_row="first batch fully masked",
    ),
    Shape(
        "loss_ramp",
        "MSE x min(1, step/50): first loss exactly 0",
        _reg(loss_mode="ramp"),
        400,
        MSE,
        issue_row="loss ramp loss * min(1, step/50)",
    ),
    Shape(
        "hinge_satisfied",
        "hinge loss, pretrained on easy points: first 10 batches loss exactly 0, then positive",
        HingeSatisfied,
        400,
        "validation hinge loss",
        tolerance="travel",
        issue_row="margin loss already satisfied (first loss exactly 0)",
    ),
    Shape(
        "bs1_sgd",
        "regression, batch size 1, plain SGD lr 0.01",
        _reg(batch_size=1, lr=0.01, optimizer="sgd"),
        800,
        MSE,
        issue_row="batch size 1, SGD",
    ),
    Shape(
        "adam_bs4",
        "regression, batch size 4, Adam 1e-3 (a first batch may happen to be easy)",
        _reg(batch_size=4),
        500,
        MSE,
    ),
    Shape(
        "sorted_bags_sum",
        "regression on bags of 1-512 items, loss summed over the bag, first epoch sorted by size (single items first)",
        lambda seed, steps: SortedBags(seed, steps),
        500,
        MSE,
    ),
    Shape(
        "poisson_counts",
        "count regression, log link, Poisson NLL, rates 1-140 (heavy-tailed gradient norms)",
        PoissonCounts,
        800,
        "validation Poisson deviance",
    ),
    Shape(
        "gaussian_nll",
        "heteroscedastic Gaussian NLL (mean + log-variance heads), loss goes negative",
        GaussianNLL,
        500,
        "validation Gaussian NLL",
        tolerance="travel",
        issue_row="heteroscedastic Gaussian NLL (crosses 0)",
    ),
    Shape(
        "masked_start_15",
        "masked MSE, first 15 batches fully masked (zero gradients)",
        _reg(loss_mode="masked", masked_batches=15),
        400,
        MSE,
        issue_row='AdaptiveGradientClipping("zscore") alone, first 15 batches masked',
        extra_configs=("zscore",),
    ),
    Shape(
        "fp16_scaler",
        "fp16 autocast + GradScaler('cpu', growth_interval=50), one injected overflow at step 200",
        FP16Scaler,
        400,
        MSE,
        trainer_kwargs=_fp16_kwargs,
        cost=2.0,
    ),
    Shape(
        "fp16_sum_scaler",
        "fp16 + GradScaler, sum-reduced MSE, batch 512, targets std 90: the scale settles below 1",
        FP16SumScaler,
        300,
        MSE,
        issue_row="fp16 GradScaler, one overflow step",
        trainer_kwargs=_fp16_kwargs,
        cost=3.0,
    ),
    Shape(
        "dqn",
        "Q-learning, target net synced every 10 steps, gamma 0.95, tiny random MDP",
        DQN,
        600,
        "mean |Q - Q*| over all state-action pairs",
        tolerance="travel",
        issue_row="DQN (TD loss, moving target network)",
    ),
    Shape(
        "reinforce",
        "REINFORCE with batch-mean baseline, contextual bandit (loss centred on 0)",
        Reinforce,
        500,
        "expected reward on validation contexts",
        higher_is_better=True,
    ),
    Shape(
        "gan",
        "GAN on a 2-D Gaussian, manual optimization (D then G each batch)",
        GAN,
        500,
        "MMD^2 generated vs validation",
        tolerance="travel",
        issue_row="GAN (manual optimization, two optimizers)",
        optimizer_steps_per_batch=lambda b: 2 * b,
        cost=1.5,
    ),
    Shape(
        "warmup_cosine",
        "regression, AdamW 3e-3, linear warm-up 50 steps then cosine to 0",
        _reg(lr=3e-3, optimizer="adamw", schedule="warmup_cosine"),
        500,
        MSE,
    ),
    Shape(
        "onecycle",
        "digits MLP, SGD momentum, OneCycleLR max 0.1",
        _digits("onecycle", lr=0.1),
        400,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "distill",
        "student 64-16-10 on a teacher's soft targets (KL, T=4)",
        Distill,
        400,
        ACC + " (student)",
        higher_is_better=True,
    ),
    Shape(
        "freeze_unfreeze",
        "frozen pretrained backbone unfrozen at step 200 as a new param group (lr/10)",
        lambda seed, steps: Probe(seed, steps, unfreeze_at=200),
        400,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "sum_loss",
        "regression, MSE reduction='sum', batch 256 (norms in the hundreds)",
        _reg(loss_mode="sum", batch_size=256, n_train=4096),
        300,
        MSE,
        cost=1.5,
    ),
    Shape(
        "bf16_mixed",
        "digits MLP under precision='bf16-mixed'",
        _digits("bf16"),
        400,
        ACC,
        higher_is_better=True,
        trainer_kwargs=lambda: {"precision": "bf16-mixed"},
    ),
    Shape(
        "lbfgs_line_search",
        "digits MLP, LBFGS with a strong-Wolfe line search (several closure evaluations per step)",
        _digits("lbfgs"),
        200,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "sign_code",
        "digits classifier through a sign() code without a straight-through estimator",
        _digits("sign_code", lr=3e-3),
        400,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "label_smoothing",
        "digits MLP, cross-entropy with label smoothing 0.1",
        _digits("label_smoothing"),
        400,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "infonce",
        "contrastive InfoNCE on two noisy views of digits",
        InfoNCE,
        400,
        "validation InfoNCE loss (397 pairs)",
    ),
    Shape(
        "grad_accum",
        "regression, batch 8, accumulate_grad_batches=4",
        _reg(batch_size=8),
        300,
        MSE,
        trainer_kwargs=lambda: {"accumulate_grad_batches": 4},
        cost=2.0,
    ),
    Shape(
        "adamw_steplr",
        "digits MLP, AdamW weight decay 0.05, StepLR x0.3 every 150 steps",
        _digits("adamw_steplr", lr=3e-3),
        450,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "tiny_transformer_lm",
        "1-layer causal transformer char LM on real text",
        TinyTransformerLM,
        400,
        "validation bits per character",
        cost=3.0,
    ),
    Shape(
        "multitask_ramp",
        "two regression heads, 2nd task's weight ramps 0 -> 1 over 200 steps",
        MultitaskRamp,
        400,
        "sum of the two validation MSEs",
    ),
    Shape(
        "delayed_drop",
        "deep linear net, small init, SGD: long plateau then a sudden drop",
        DelayedDrop,
        500,
        "validation MSE",
        tolerance="travel",
    ),
    Shape(
        "restarts_curriculum",
        "curriculum switch (classes 0-4, then all) at a warm restart of SGDR (LR back to its peak)",
        RestartsCurriculum,
        600,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "bn_cnn",
        "small CNN with BatchNorm on 8x8 digits",
        BNCNN,
        400,
        ACC,
        higher_is_better=True,
        cost=2.0,
    ),
    Shape(
        "dropout_noisy",
        "regression MLP with dropout 0.3 (noisy loss)",
        _reg(dropout=0.3),
        400,
        MSE,
    ),
    Shape(
        "sched_sampling_warmup",
        "autoregressive GRU, scheduled sampling 0 -> 0.9 during a 250-step LR warm-up (the task hardens as LR grows)",
        ScheduledSampling,
        500,
        "free-running validation MSE",
        cost=4.0,
    ),
    Shape(
        "pinn_stiff",
        "physics-informed MLP, u'' = -k^2 sin(kx), boundary weight 1000 (gradient norms 1e3-5e3 throughout)",
        StiffPINN,
        1000,
        "RMSE against the exact solution",
        cost=2.0,
    ),
    Shape(
        "class_incremental",
        "digits classes 0-1 for 1400 steps (norms fall to ~1e-3), then all 10 (norms ~7: 5000x)",
        ClassIncremental,
        1800,
        ACC,
        higher_is_better=True,
        cost=2.0,
    ),
    Shape(
        "sparse_reward_chain",
        "REINFORCE on a 10-state chain, reward only at the end (norms ~0.01, then 20-160 on successes)",
        SparseRewardChain,
        800,
        "1 - P(reaching the end)",
        tolerance="travel",
        cost=4.0,
    ),
    Shape(
        "loss_weight_step",
        "digits MLP, Adam: the whole loss weighted 1e-4 for 300 steps, then 1 (loss and norms jump 1e4x)",
        LossWeightStep,
        700,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "rare_positives",
        "binary classifier, 0.2 % positives, pos_weight=neg/pos, Adam (batches with a positive: norms 100-10,000x)",
        RarePositives,
        1500,
        "validation ROC AUC",
        higher_is_better=True,
        cost=3.0,
    ),
    Shape(
        "cyclic_lr",
        "digits MLP, SGD momentum, CyclicLR 0.005 -> 0.3 -> 0.005 every 100 steps (the LR grows 60x, again and again)",
        CyclicLR,
        600,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "cyclic_kl_vae",
        "the VAE with a cyclical KL weight: 0 -> 1 over 75 steps, hold, every 150 steps (the loss climbs 4 times)",
        CyclicKLVAE,
        600,
        "validation -ELBO at beta 1",
    ),
    Shape(
        "permuted_tasks",
        "continual learning: the digits' labels permuted anew every 150 steps (loss jumps ~10x at each switch)",
        PermutedTasks,
        600,
        ACC + " (last task)",
        higher_is_better=True,
    ),
    Shape(
        "memorize_tiny",
        "memorising 8 samples, full batch, Adam 1e-2: loss to ~1e-15, then jumps of 1e5x-1e10x at that floor",
        Memorize,
        1500,
        "training MSE",
        tolerance="travel",
    ),
    Shape(
        "alternating_tasks",
        "multi-task: classification and a regression of targets std 30 on alternate batches (losses 100x apart)",
        AlternatingTasks,
        800,
        "mean of validation accuracy and regression R^2",
        higher_is_better=True,
    ),
    Shape(
        "large_batch_warmup",
        "BatchNorm CNN, batch 256, SGD momentum, LR warmed up 100x to 1.0 over 100 steps, then cosine",
        LargeBatchWarmup,
        400,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "grokking",
        "grokking: (a + b) mod 23, full batch, AdamW weight decay 1 (train loss ~0 by step 250, val acc near chance)",
        ModularAddition,
        2000,
        ACC + " (held-out pairs)",
        higher_is_better=True,
        tolerance="travel",
        cost=5.0,
    ),
    Shape(
        "diffusion_2d",
        "denoising diffusion (100 noise levels) on 8 Gaussians in 2-D: a noisy loss that falls slowly",
        Diffusion2D,
        1500,
        "MMD^2 of 1000 samples to held-out data",
        tolerance="travel",
        cost=3.0,
    ),
    Shape(
        "mixture_density",
        "mixture density network (5 Gaussians) on a multi-valued inverse: the NLL crosses 0, ends near -1",
        MixtureDensity,
        1500,
        "validation NLL",
        tolerance="travel",
        cost=3.0,
    ),
    Shape(
        "sam_manual",
        "sharpness-aware minimisation by manual optimization: two backward passes, weights moved in place",
        SharpnessAware,
        600,
        ACC,
        higher_is_better=True,
    ),
    Shape(
        "catapult",
        "wide MLP, plain SGD at 3/lambda_max: the loss climbs 10-50x in the first steps, then falls by itself",
        Catapult,
        2000,
        MSE,
        cost=2.0,
    ),
    # faults: not healthy without a tool; judged against the run in which the corrupt batches are dropped
    Shape(
        "corrupt_label_20",
        "every 20th batch: one label 1e30 (loss inf, gradient finite ~1e29)",
        _reg(loss_mode="corrupt", fault_every=20),
        400,
        MSE,
        one_epoch=True,
        issue_row="a finite batch with a corrupt label every 20th batch",
        section="faults",
    ),
    Shape(
        "corrupt_label_5",
        "every 5th batch: one label 1e30 (loss inf, gradient finite ~1e29)",
        _reg(loss_mode="corrupt", fault_every=5),
        400,
        MSE,
        one_epoch=True,
        section="faults",
    ),
]
SHAPES: dict[str, Shape] = {s.name: s for s in _SHAPES}
HEALTHY = tuple(s.name for s in _SHAPES if s.section == "healthy")
FAULTS = tuple(s.name for s in _SHAPES if s.section == "faults")

# ----------------------------------------------------------------------------------------------------------------------
# Configurations and one fit

#: configuration -> what it is. "none" is every shape's reference; "dropped" (no callbacks, corrupt batches not
#: trained on) the reference of the fault shapes.
CONFIGS: dict[str, str] = {
    "none": "no callbacks",
    "defaults": "lightning_gradguard.default_callbacks()",
    "nanguard": "lightning_gradguard.NaNGuard()",
    "zscore": 'lightning_gradguard.AdaptiveGradientClipping("zscore") alone',
    "dropped": "no callbacks, corrupt batches dropped (training_step returns None)",
    # two diagnostics of a shape's sensitivity to its first steps (not run unless asked for with --configs):
    "first10_clip": "no gradguard; torch's clip_grad_norm_(max_norm=1.0) on the first 10 steps only",
    "zscore_nocap": 'AdaptiveGradientClipping("zscore", fallback_max_norm=None) alone (no warm-up cap)',
    "defaults_noclip": "lightning_gradguard.default_callbacks(clipping=None) (monitor and guard, no clipper)",
}
DEFAULT_CONFIGS = ("none", "defaults", "nanguard")


class _ClipFirstSteps(pl.Callback):
    """torch's ``clip_grad_norm_(max_norm)`` on the first ``steps`` optimizer steps, nothing afterwards: what the
    z-score clipper's warm-up cap does to a run whose first norms are far above the cap, without gradguard (a
    measure of how much a shape's final metric depends on its first steps)."""

    def __init__(self, steps: int, max_norm: float) -> None:
        self.steps, self.max_norm = steps, max_norm

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step < self.steps:
            torch.nn.utils.clip_grad_norm_(pl_module.parameters(), self.max_norm)


def make_callbacks(config: str) -> list[pl.Callback]:
    from lightning_gradguard import AdaptiveGradientClipping, NaNGuard, default_callbacks

    if config in ("none", "dropped"):
        return []
    if config == "defaults":
        return list(default_callbacks())
    if config == "nanguard":
        return [NaNGuard()]
    if config == "zscore":
        return [AdaptiveGradientClipping("zscore")]
    if config == "defaults_noclip":
        return list(default_callbacks(clipping=None))
    if config == "zscore_nocap":
        return [AdaptiveGradientClipping("zscore", fallback_max_norm=None)]
    if config == "first10_clip":
        return [_ClipFirstSteps(10, 1.0)]
    raise ValueError(f"unknown configuration {config!r}; known: {sorted(CONFIGS)}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def classify_events(events: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Split guard events into ``actions``, ``warnings`` (kinds outside :data:`ACTION_KINDS`) and
    ``nonfinite_skips`` (skips of a step whose loss was recorded as non-finite: not actions on a finite batch)."""
    out: dict[str, list[dict[str, Any]]] = {"actions": [], "warnings": [], "nonfinite_skips": []}
    for e in events:
        kind = str(e.get("kind", "?"))
        if kind not in ACTION_KINDS:
            out["warnings"].append(dict(e))
        elif kind == "skip" and "loss" in e and not _finite(e["loss"]):
            out["nonfinite_skips"].append(dict(e))
        else:
            out["actions"].append(dict(e))
    return out


def event_line(e: Mapping[str, Any], width: int = 160) -> str:
    """``kind@step cause: reason`` in one line."""
    reason = str(e.get("reason", "")).replace("\n", " ")
    text = f"{e.get('kind', '?')}@{e.get('step', '?')} {e.get('cause', '')}"
    if isinstance(e.get("lr_scale"), (int, float)):
        text += f" lr_scale={e['lr_scale']:.3g}"
    if reason:
        text += f": {reason}"
    return text if len(text) <= width else text[: width - 3] + "..."


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def quiet() -> None:
    """One torch thread, no warnings, Lightning's and gradguard's loggers at ERROR (a worker's or a test's set-up)."""
    import logging
    import warnings

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for n in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard"):
        logging.getLogger(n).setLevel(logging.ERROR)


def fit_quietly(module: pl.LightningModule, steps: int, callbacks: list[pl.Callback], **trainer_kwargs: Any) -> None:
    """``module`` trained for ``steps`` optimizer steps on the CPU, deterministic, no logger, checkpoint, progress bar,
    summary or sanity check, in a scratch root (the benchmarks that compare methods seed by seed)."""
    with tempfile.TemporaryDirectory(prefix="gradguard_fit_") as root:
        trainer = pl.Trainer(
            default_root_dir=root, accelerator="cpu", max_steps=steps, logger=False, callbacks=callbacks,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            deterministic=True, **trainer_kwargs,
        )  # fmt: skip
        trainer.fit(module)


def run(shape: str | Shape, config: str, seed: int, steps: int | None = None) -> dict[str, Any]:
    """One fit of ``shape`` under ``config``; returns a JSON-able record.

    Record: ``metric`` (final), ``start_metric`` (the module as built, before the fit), ``error`` (type: message of
    any exception the fit raised, caught), ``events`` (every ``NaNGuard.events`` entry), ``actions``/``warnings``/
    ``nonfinite_skips`` (:func:`classify_events`), ``lrs`` (final LR of every param group of every optimizer),
    ``fault_steps`` (fault shapes: the steps that got a corrupt batch), ``amp_overflows`` (fp16), steps done, times.
    """
    from lightning_gradguard import NaNGuard

    sh = SHAPES[shape] if isinstance(shape, str) else shape
    planned = steps or sh.steps
    pl.seed_everything(seed, workers=False, verbose=False)
    module = sh.build(seed, planned)
    module.drop_faults = config == "dropped"
    start_metric = module.evaluate()
    callbacks = make_callbacks(config)
    guard = next((cb for cb in callbacks if isinstance(cb, NaNGuard)), None)
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=-1 if sh.one_epoch else sh.max_steps(planned),
        max_epochs=1 if sh.one_epoch else -1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    if sh.trainer_kwargs is not None:
        opts.update(sh.trainer_kwargs())
    t0, c0 = time.perf_counter(), time.process_time()
    error = ""
    trainer: pl.Trainer | None = None
    # a halting guard writes its report under the Trainer's root: a scratch folder, not the caller's directory
    with tempfile.TemporaryDirectory(prefix="gradguard_zoo_") as root:
        try:
            trainer = pl.Trainer(default_root_dir=root, **opts)
            trainer.fit(module)
        except Exception as e:  # noqa: BLE001 - a crashed or halted run is a result
            error = f"{type(e).__name__}: {str(e)[:300]}"
    wall = time.perf_counter() - t0
    try:
        metric = module.evaluate()
    except Exception as e:  # noqa: BLE001
        metric = float("nan")
        error = error or f"evaluate: {type(e).__name__}: {e}"
    events = [dict(e) for e in (guard.events if guard is not None else [])]
    kinds = classify_events(events)
    lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in (trainer.optimizers if trainer else [])]
    rec = {
        "shape": sh.name,
        "config": config,
        "seed": seed,
        "steps": planned,
        "steps_done": trainer.global_step if trainer is not None else 0,
        "error": error,
        "metric": metric,
        "start_metric": start_metric,
        "events": events,
        **kinds,
        "lrs": lrs,
        "fault_steps": list(module.fault_steps),
        "amp_overflows": getattr(module, "amp_overflows", None),
        "amp_min_scale": getattr(module, "amp_min_scale", None),
        "wall_s": wall,
        "cpu_s": time.process_time() - c0,
    }
    return _json_safe(rec)


# ----------------------------------------------------------------------------------------------------------------------
# Judging


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def tolerance(sh: Shape, ref: float, start: float) -> float:
    """The allowed shortfall against the reference metric ``ref`` (see the module docstring)."""
    if sh.tolerance == "travel":
        return RELATIVE_TOL * max(abs(ref), abs(start - ref))
    return RELATIVE_TOL * abs(ref)


def within(sh: Shape, metric: float, ref: float, start: float) -> bool:
    """``metric`` no worse than ``ref`` by more than :func:`tolerance` (better is always fine)."""
    if not (math.isfinite(metric) and math.isfinite(ref)):
        return False
    tol = tolerance(sh, ref, start)
    return metric >= ref - tol if sh.higher_is_better else metric <= ref + tol


def trains(sh: Shape, rec: Mapping[str, Any], min_gain: float = 0.05) -> bool:
    """The reference run improved its metric by at least ``min_gain`` of its start value (or of the distance to the
    other side of 0, for travel metrics), and did not crash."""
    start, final = _num(rec["start_metric"]), _num(rec["metric"])
    if rec.get("error") or not (math.isfinite(start) and math.isfinite(final)):
        return False
    gain = (final - start) if sh.higher_is_better else (start - final)
    return gain > min_gain * max(abs(start), 1e-12)


def metric_cell(sh: Shape, metric: float, ref: float) -> str:
    """The ratio to the reference (relative metrics) or the signed difference (travel metrics)."""
    if not (math.isfinite(metric) and math.isfinite(ref)):
        return "nan"
    if sh.tolerance == "travel" or ref == 0:
        return f"{metric - ref:+.3g}"
    return f"{metric / ref:.3f}"


def judge(sh: Shape, rec: Mapping[str, Any], ref: Mapping[str, Any] | None) -> list[str]:
    """Why ``rec`` fails (empty: it passes). ``ref``: the same seed's reference run ("none", or "dropped" for the
    fault shapes)."""
    why: list[str] = []
    if rec.get("error"):
        why.append(f"exception {rec['error']}")
    metric = _num(rec["metric"])
    if sh.section == "faults" and rec["config"] not in ("none", "dropped"):
        faults = set(rec.get("fault_steps", []))
        skipped = {e.get("step") for e in rec["events"] if e.get("kind") == "skip"}
        missed = sorted(faults - skipped)
        if missed:
            why.append(f"{len(missed)} of {len(faults)} corrupt batches not skipped (first at step {missed[0]})")
        other = [
            e
            for e in rec["events"]
            if e.get("kind") in ACTION_KINDS and not (e.get("kind") == "skip" and e.get("step") in faults)
        ]
        if other:
            why.append(f"{len(other)} other actions: " + "; ".join(event_line(e, 200) for e in other[:3]))
    elif rec["actions"]:
        why.append(f"{len(rec['actions'])} actions: " + "; ".join(event_line(e, 200) for e in rec["actions"][:3]))
    if ref is not None and rec is not ref and not within(sh, metric, _num(ref["metric"]), _num(ref["start_metric"])):
        tol = tolerance(sh, _num(ref["metric"]), _num(ref["start_metric"]))
        why.append(f"metric {metric:.4g} vs {_num(ref['metric']):.4g} (tolerance {tol:.3g})")
    return why


def lr_ratio(rec: Mapping[str, Any], ref: Mapping[str, Any] | None) -> float:
    """The smallest ratio final LR / reference final LR over every param group (1.0: no LR change)."""
    if ref is None:
        return float("nan")
    ratios = [
        a / b
        for ga, gb in zip(rec.get("lrs", []), ref.get("lrs", []))
        for a, b in zip(ga, gb)
        if b and math.isfinite(b)
    ]
    return min(ratios) if ratios else float("nan")


def reference_config(sh: Shape) -> str:
    return "dropped" if sh.section == "faults" else "none"


def configs_for(sh: Shape, wanted: Sequence[str] | None = None) -> list[str]:
    """The configurations run for ``sh``: its reference, then ``wanted`` (default: the default three plus the
    shape's extras), the fault shapes' unguarded run included."""
    ref = reference_config(sh)
    base = list(wanted) if wanted else [*DEFAULT_CONFIGS, *sh.extra_configs]
    out = [ref] + [c for c in base if c != ref]
    return list(dict.fromkeys(out))
