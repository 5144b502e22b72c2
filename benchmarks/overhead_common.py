"""The harness shared by the ``overhead.py`` sections that drive callbacks by hand (micro, flat, cuda; heap_trace.py).

A real ``Trainer.fit`` of a small :class:`BenchModule` runs until optimizer step ``at_step``; there
:class:`Harness` saves the live gradients and calls a ``measure`` function that may restore them and advance the
Trainer's optimizer-step counter (both untimed) before every timed call, so each call is a fresh step for the
callbacks. :class:`CallbackDriver` runs one callback's per-step hooks, exactly those a fit would call.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import common  # noqa: F401 - puts the repository on sys.path before lightning_gradguard is imported
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

CLIP_METHODS = ("zscore", "percentile", "agc", "norm", "value", "per_parameter")
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
#: row labels the sections and the report share: the baseline every micro ratio is taken against, a memory snapshot
TORCH_CLIP = "torch clip_grad_norm_(foreach=True)"
SNAPSHOT = "core take_snapshot (model + Adam state to CPU)"

# ----------------------------------------------------------------------------------------------------------------------
# Models


def mlp(depth: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


class BenchModule(pl.LightningModule):
    """A LightningModule around ``net`` fed a fixed random batch; Adam, so snapshots carry real optimizer state."""

    def __init__(self, net: nn.Module, in_dim: int, batch: int = 8, steps: int = 64) -> None:
        super().__init__()
        self.net = net
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(batch * steps, in_dim, generator=g))
        self.batch = batch
        self.last_loss: torch.Tensor | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = self.net(x).float().pow(2).mean()
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch)


def quiet_trainer(
    root: str, callbacks: list[pl.Callback], max_steps: int, logger: bool = True, **kw: Any
) -> pl.Trainer:
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=TensorBoardLogger(root, name="bench", version=0) if logger else False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    opts.update(kw)
    return pl.Trainer(**opts)


@contextlib.contextmanager
def quiet_lightning():
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradguard")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lvl in old.items():
                logging.getLogger(n).setLevel(lvl)


# ----------------------------------------------------------------------------------------------------------------------
# gradguard candidates (constructed defensively: the callbacks are optional until they exist)


def try_make(factory: Callable[[], pl.Callback]) -> tuple[pl.Callback | None, str]:
    try:
        return factory(), ""
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return None, f"{type(e).__name__}: {e}"


def clip_factory(method: str) -> Callable[[], pl.Callback]:
    def make() -> pl.Callback:
        from lightning_gradguard import AdaptiveGradientClipping

        return AdaptiveGradientClipping(method=method)

    return make


def monitor_factory(log_every: int | None) -> Callable[[], pl.Callback]:
    def make() -> pl.Callback:
        from lightning_gradguard import GradientNormMonitor

        return GradientNormMonitor(log_every_n_steps=log_every) if log_every else GradientNormMonitor()

    return make


def guard_factory(**kw: Any) -> Callable[[], pl.Callback]:
    def make() -> pl.Callback:
        from lightning_gradguard import NaNGuard

        return NaNGuard(**kw)

    return make


class CallbackDriver:
    """Runs a callback's per-step hooks outside the Trainer's own loop, inside a live fit, as a new step each time."""

    def __init__(self, cb: pl.Callback, trainer: pl.Trainer, module: BenchModule, optimizer: Any, batch: Any) -> None:
        self.cb, self.trainer, self.module, self.optimizer, self.batch = cb, trainer, module, optimizer, batch
        cls = type(cb)
        # only the hooks the callback overrides (the base ones are no-ops)
        self.hooks = [h for h in PER_STEP_HOOKS if getattr(cls, h) is not getattr(pl.Callback, h)]

    def start(self) -> None:
        from lightning_gradguard.callbacks._step_context import context_for

        t, m = self.trainer, self.module
        listeners = context_for(t).listeners
        before = list(listeners)
        for hook, args in (
            ("setup", (t, m, "fit")),
            ("on_fit_start", (t, m)),
            ("on_train_start", (t, m)),
            ("on_train_epoch_start", (t, m)),
        ):
            m._current_fx_name = hook
            getattr(self.cb, hook)(*args)
        m._current_fx_name = "on_before_optimizer_step"
        # the measurement listeners this callback registered (the monitor's, the guard's): only they may run in this
        # callback's rows, not those of every other candidate started in the same fit
        self.listeners = [fn for fn in listeners if fn not in before]

    def step(self) -> None:
        from lightning_gradguard.callbacks._step_context import context_for

        context_for(self.trainer).listeners[:] = self.listeners
        t, m, cb = self.trainer, self.module, self.cb
        loss = m.last_loss
        for hook in self.hooks:
            m._current_fx_name = hook
            if hook == "on_train_batch_start":
                cb.on_train_batch_start(t, m, self.batch, 0)
            elif hook == "on_before_backward":
                cb.on_before_backward(t, m, loss)
            elif hook == "on_after_backward":
                cb.on_after_backward(t, m)
            elif hook == "on_before_optimizer_step":
                cb.on_before_optimizer_step(t, m, self.optimizer)
            elif hook == "on_before_zero_grad":
                cb.on_before_zero_grad(t, m, self.optimizer)
            elif hook == "on_train_batch_end":
                cb.on_train_batch_end(t, m, {"loss": loss}, self.batch, 0)
        m._current_fx_name = "on_before_optimizer_step"


def start_driver(
    make: Callable[[], pl.Callback],
    trainer: pl.Trainer,
    module: BenchModule,
    optimizer: Any,
    batch: Any,
    next_step: Callable[[], None],
    preroll: int = 0,
) -> tuple[CallbackDriver | None, str]:
    """Build the callback, start it and run ``preroll`` fresh steps (past warm-up phases, statistics filled).

    Returns the driver and ``""``, or ``None`` and the reason the callback could not be built, started or stepped.
    """
    cb, err = try_make(make)
    if cb is None:
        return None, err
    driver = CallbackDriver(cb, trainer, module, optimizer, batch)
    try:
        driver.start()
        for _ in range(preroll):
            next_step()
            driver.step()
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return None, f"{type(e).__name__}: {e}"
    return driver, ""


def param_names(module: nn.Module, params: list[torch.Tensor]) -> list[str]:
    """The qualified names of ``params`` in ``module``, in the order given."""
    names_of = {id(p): n for n, p in module.named_parameters()}
    return [names_of[id(p)] for p in params]


def _step_progress(trainer: pl.Trainer) -> Any:
    return trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total


class Harness(pl.Callback):
    """At optimizer step ``at_step`` of a real fit, runs ``measure(trainer, module, optimizer)`` on live gradients."""

    def __init__(self, at_step: int, measure: Callable[..., Any]) -> None:
        self.at_step = at_step
        self.measure = measure
        self.result: Any = None
        self.batch: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        if trainer.global_step != self.at_step:
            return
        progress = _step_progress(trainer)
        start = progress.completed
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        saved = [p.grad.detach().clone() for p in params]
        grads = [p.grad for p in params]

        def restore() -> None:
            torch._foreach_copy_(grads, saved)

        def next_step() -> None:
            restore()
            progress.completed += 1

        try:
            self.result = self.measure(trainer, pl_module, optimizer, self.batch, params, restore, next_step)
        finally:
            progress.completed = start
            for p, g in zip(params, saved):
                p.grad = g
            trainer.should_stop = True


def run_in_fit(
    model_factory: Callable[[], nn.Module],
    in_dim: int,
    measure: Callable[..., Any],
    at_step: int = 3,
    **trainer_kw: Any,
) -> Any:
    """Fit a :class:`BenchModule` around ``model_factory()`` and return what ``measure`` returned at ``at_step``.

    ``trainer_kw`` go to the Trainer (e.g. ``accelerator="cuda"``).
    """
    torch.manual_seed(0)
    module = BenchModule(model_factory(), in_dim)
    harness = Harness(at_step, measure)
    with tempfile.TemporaryDirectory() as root, quiet_lightning():
        trainer = quiet_trainer(root, [harness], max_steps=at_step + 1, **trainer_kw)
        trainer.fit(module)
    return harness.result
