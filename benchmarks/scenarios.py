"""Training scenarios shared by the benchmarks: the two gradguard examples and a character-level LSTM on real text.

A scenario turns ``(root, callbacks, steps, seed, lr, faults)`` into a finished (or failed) ``Trainer.fit`` and a final
metric. Faults are injected from outside the model by wrapping the instance's ``training_step``:

- ``nan``/``inf`` inputs: the first floating-point tensor of the batch is replaced by a copy filled with NaN/inf (for
  integer token inputs the model's ``poison_inputs(value)`` hook adds the value to the embeddings instead);
- ``spike``: the loss is multiplied by 1e4 at the given steps.

The character-level model trains on text that ships offline: the reStructuredText dataset descriptions bundled in
scikit-learn (``sklearn/datasets/descr/*.rst``, about 43 kB), falling back to the docstrings of Python's standard
library when scikit-learn is missing.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["EXAMPLES", "SCENARIOS", "CharLSTM", "Faults", "RunResult", "check_available", "fit", "load_text"]

# ----------------------------------------------------------------------------------------------------------------------
# Text


def load_text(max_chars: int = 60_000) -> tuple[str, str]:
    """(text, source description). scikit-learn's bundled dataset descriptions, else stdlib docstrings."""
    try:
        import sklearn

        descr = Path(sklearn.__file__).parent / "datasets" / "descr"
        files = sorted(descr.glob("*.rst"))
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
        if len(text) > 10_000:
            return text[:max_chars], f"scikit-learn {sklearn.__version__} datasets/descr/*.rst ({len(files)} files)"
    except ImportError:
        pass
    mods = ["collections", "functools", "itertools", "json", "pathlib", "re", "statistics", "textwrap", "typing"]
    parts = []
    for m in mods:
        mod = importlib.import_module(m)
        parts.append(mod.__doc__ or "")
        for name in dir(mod):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str) and not name.startswith("_"):
                parts.append(doc)
    text = "\n".join(parts)
    return text[:max_chars], "Python standard-library docstrings (" + ", ".join(mods) + ")"


class CharWindows(Dataset):
    def __init__(self, ids: torch.Tensor, seq_len: int, starts: torch.Tensor) -> None:
        self.ids, self.seq_len, self.starts = ids, seq_len, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.ids[s : s + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class CharLSTM(pl.LightningModule):
    """A character-level LSTM language model trained with plain SGD (momentum 0.9), as in the RNN literature.

    Metric: validation cross-entropy in bits per character (lower is better).
    """

    def __init__(
        self,
        lr: float = 1.0,
        hidden: int = 96,
        embed: int = 32,
        seq_len: int = 48,
        batch_size: int = 32,
        seed: int = 0,
        max_chars: int = 60_000,
    ) -> None:
        super().__init__()
        text, self.text_source = load_text(max_chars)
        vocab = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        split = int(len(ids) * 0.9)
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        self.seq_len, self.batch_size, self.lr, self.seed = seq_len, batch_size, lr, seed
        self.emb = nn.Embedding(len(vocab), embed)
        self.rnn = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, len(vocab))
        self._poison: float | None = None

    def poison_inputs(self, value: float) -> None:
        """Make the next forward pass see ``value`` (NaN/inf) added to its input embeddings."""
        self._poison = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        if self._poison is not None:
            e = e + self._poison
            self._poison = None
        out, _ = self.rnn(e)
        return self.head(out)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_bpc", self._loss(batch) / math.log(2), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, len(self.train_ids) - self.seq_len - 1, (self.batch_size * 25,), generator=g)
        return DataLoader(CharWindows(self.train_ids, self.seq_len, starts), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        n = len(self.val_ids) - self.seq_len - 1
        starts = torch.arange(0, n, self.seq_len)[:128]
        return DataLoader(CharWindows(self.val_ids, self.seq_len, starts), batch_size=64)


# ----------------------------------------------------------------------------------------------------------------------
# Faults


@dataclass
class Faults:
    """Steps (optimizer steps, ``trainer.global_step``) at which to inject each fault."""

    nan_at: set[int] = field(default_factory=set)
    inf_at: set[int] = field(default_factory=set)
    spike_at: set[int] = field(default_factory=set)
    spike_factor: float = 1e4

    @property
    def count(self) -> int:
        return len(self.nan_at) + len(self.inf_at) + len(self.spike_at)


def _poison_batch(batch: Any, value: float) -> tuple[Any, bool]:
    """A copy of ``batch`` whose first floating tensor is filled with ``value``; (batch, done)."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return torch.full_like(batch, value), True
        return batch, False
    if isinstance(batch, Mapping):
        out = dict(batch)
        for k, v in batch.items():
            new, done = _poison_batch(v, value)
            if done:
                out[k] = new
                return type(batch)(out) if not isinstance(batch, dict) else out, True
        return batch, False
    if isinstance(batch, (list, tuple)):
        items = list(batch)
        for i, v in enumerate(items):
            new, done = _poison_batch(v, value)
            if done:
                items[i] = new
                return (type(batch)(items) if isinstance(batch, list) else tuple(items)), True
        return batch, False
    return batch, False


def _scale_output(out: Any, factor: float) -> Any:
    if isinstance(out, torch.Tensor):
        return out * factor
    if isinstance(out, Mapping) and "loss" in out:
        d = dict(out)
        d["loss"] = d["loss"] * factor
        return d
    return out


def inject_faults(module: pl.LightningModule, faults: Faults) -> None:
    """Wrap ``module.training_step`` (on the instance) so that it injects ``faults`` at their steps."""
    if not faults.count:
        return
    original = module.training_step

    def training_step(batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        step = module.trainer.global_step
        for steps, value in ((faults.nan_at, float("nan")), (faults.inf_at, float("inf"))):
            if step in steps:
                batch, done = _poison_batch(batch, value)
                if not done and hasattr(module, "poison_inputs"):
                    module.poison_inputs(value)
        out = original(batch, batch_idx, *args, **kwargs)
        if step in faults.spike_at:
            out = _scale_output(out, faults.spike_factor)
        return out

    module.training_step = training_step  # type: ignore[method-assign]


class HealthCounter(pl.Callback):
    """Counts steps whose loss or gradients were non-finite, seen before any other callback acts (put it first)."""

    def __init__(self) -> None:
        self.nonfinite_grad_steps = 0
        self.nonfinite_loss_steps = 0
        self.steps = 0
        self.last_loss = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norms = torch.stack(torch._foreach_norm(grads))
            if not bool(torch.isfinite(norms).all()):
                self.nonfinite_grad_steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.steps += 1
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self.last_loss = float(loss.detach())
            if not math.isfinite(self.last_loss):
                self.nonfinite_loss_steps += 1


# ----------------------------------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Scenario:
    """How to build, train and score one model."""

    name: str
    build: Callable[[int, str, bool], tuple[pl.LightningModule, Any]]  # (seed, lr kind, tiny) -> (module, datamodule)
    metric: str  # key returned by trainer.validate
    higher_is_better: bool
    steps: int  # full-mode optimizer steps
    quick_steps: int
    describe: str = ""
    tiny_steps: int = 12
    cost: float = 1.0  # relative wall time of one run (for scheduling)
    es_monitor: str = "train_loss_epoch"  # what EarlyStopping(check_finite=True) watches
    es_higher_is_better: bool = False
    es_on_train_epoch_end: bool = True
    val_every: int = 0  # validation (and EarlyStopping checks) every n steps; 0 = only at the end


def _char_build(seed: int, lr: str, tiny: bool) -> tuple[pl.LightningModule, Any]:
    lrs = {"stable": 1.0, "explosive": 10.0}
    kw: dict[str, Any] = dict(hidden=24, embed=8, seq_len=16, batch_size=8, max_chars=8000) if tiny else {}
    return CharLSTM(lr=lrs[lr], seed=seed, **kw), None


# The examples' demo settings (lightning_gradguard/demo.py, DEMOS) are the "explosive" ones: there the unguarded
# run blows up. The "stable" ones are the same model and data at a learning rate where the unguarded run trains well.
# Probed on this machine (unguarded, 1 thread): LSTM Adam 0.01 learns the task (val MSE ~0.001-0.01) in 500-800 steps
# (seed-dependent plateau); CNN SGD 0.01 collapses to one class on seeds 1 and 2, 0.015 and 0.02 on seed 0, so the
# stable CNN LR is 0.005 (still slow: 0.1-0.4 accuracy after 200 steps). Steps are kept short for the time budget
# (LSTM ~9 ms/step, CNN ~40 ms/step on one thread here).
LSTM_STEPS, CNN_STEPS = 600, 150
LSTM_COST, CNN_COST = 1.7, 2.0  # relative to char_lstm's 150 steps (~3.5 s); longest runs are scheduled first
LSTM_LRS = {"stable": 0.01, "explosive": 0.1}  # Adam
CNN_LRS = {"stable": 0.005, "explosive": 0.03}  # SGD, momentum 0.9


def _lstm_build(seed: int, lr: str, tiny: bool) -> tuple[pl.LightningModule, Any]:
    from lightning_gradguard.examples.lstm import AddingProblemDataModule, AddingProblemLSTM

    if tiny:
        model = AddingProblemLSTM(hidden_size=8, lr=LSTM_LRS[lr], optimizer="adam")
        return model, AddingProblemDataModule(seq_len=10, num_train=256, num_val=64, batch_size=16, seed=seed)
    model = AddingProblemLSTM(hidden_size=32, lr=LSTM_LRS[lr], optimizer="adam")
    return model, AddingProblemDataModule(seq_len=30, num_train=4096, num_val=512, batch_size=64, seed=seed)


def _cnn_build(seed: int, lr: str, tiny: bool) -> tuple[pl.LightningModule, Any]:
    from lightning_gradguard.examples.deep_cnn import DeepPlainCNN, DigitsDataModule

    if tiny:
        model = DeepPlainCNN(depth=4, channels=4, lr=CNN_LRS[lr], optimizer="sgd", init="he")
        return model, DigitsDataModule(batch_size=16, seed=seed)
    model = DeepPlainCNN(depth=20, channels=16, lr=CNN_LRS[lr], optimizer="sgd", init="he")
    return model, DigitsDataModule(batch_size=64, seed=seed)


def _probe_lstm() -> None:
    from lightning_gradguard.examples.lstm import AddingProblemDataModule, AddingProblemLSTM  # noqa: F401


def _probe_cnn() -> None:
    from lightning_gradguard.examples.deep_cnn import load_digits_tensors

    load_digits_tensors()  # needs scikit-learn


SCENARIOS: dict[str, Scenario] = {
    "lstm": Scenario(
        name="lstm",
        build=_lstm_build,
        metric="val_mse",
        higher_is_better=False,
        steps=LSTM_STEPS,
        quick_steps=LSTM_STEPS,  # fewer steps and the stable reference has not learned the task yet
        describe=f"gradguard's LSTM example: 1-layer LSTM (32 units) on the adding problem, sequence length 30, "
        f"Adam (stable lr {LSTM_LRS['stable']}, explosive lr {LSTM_LRS['explosive']} = the demo's); metric: "
        "validation MSE (always predicting 1.0 scores 0.167)",
        cost=LSTM_COST,
    ),
    "deep_cnn": Scenario(
        name="deep_cnn",
        build=_cnn_build,
        metric="val_acc",
        higher_is_better=True,
        steps=CNN_STEPS,
        quick_steps=100,
        describe=f"gradguard's deep-CNN example: plain CNN, 20 conv layers (16 channels, He init, no batch norm or "
        f"shortcuts) on scikit-learn's digits, SGD momentum 0.9 (stable lr {CNN_LRS['stable']}, explosive lr "
        f"{CNN_LRS['explosive']} = the demo's); metric: validation accuracy (chance 0.1)",
        cost=CNN_COST,
    ),
    "char_lstm": Scenario(
        name="char_lstm",
        build=_char_build,
        metric="val_bpc",
        higher_is_better=False,
        steps=150,
        quick_steps=60,
        describe="character-level LSTM (1x96) language model, SGD momentum 0.9, on scikit-learn's dataset "
        "descriptions; metric: validation bits per character",
    ),
}

EXAMPLES = ("lstm", "deep_cnn")


def check_available(name: str) -> None:
    """Raise if scenario ``name`` cannot run (e.g. an example not written yet)."""
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}")
    probe = _PROBES.get(name)
    if probe is not None:
        probe()


def unavailable() -> dict[str, str]:
    """Scenarios that cannot run here, with the reason."""
    out = {}
    for name in SCENARIOS:
        try:
            check_available(name)
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"
    return out


def available() -> list[str]:
    missing = unavailable()
    return [n for n in SCENARIOS if n not in missing]


_PROBES: dict[str, Callable[[], None]] = {"lstm": _probe_lstm, "deep_cnn": _probe_cnn}


# ----------------------------------------------------------------------------------------------------------------------
# Running


@dataclass
class RunResult:
    survived: bool
    outcome: str  # "ok" | "diverged" | "halted" | "stopped early" | "error"
    metric: float
    nonfinite_steps: int
    steps_done: int
    wall_s: float
    error: str = ""


def params_finite(module: nn.Module) -> bool:
    ps = [p.detach() for p in module.parameters()]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(ps))).all()) if ps else True


def fit(
    scenario: str,
    root: str,
    callbacks: Iterable[pl.Callback],
    steps: int | None = None,
    seed: int = 0,
    lr: str = "stable",
    tiny: bool = False,
    faults: Faults | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    logger: bool = True,
) -> RunResult:
    """Train ``scenario`` with ``callbacks``; returns survival, final metric and counters."""
    import time

    sc = SCENARIOS[scenario]
    pl.seed_everything(seed, workers=False, verbose=False)
    module, dm = sc.build(seed, lr, tiny)
    inject_faults(module, faults or Faults())
    counter = HealthCounter()
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps or sc.steps,
        max_epochs=-1,
        logger=TensorBoardLogger(root, name="run", version=0) if logger else False,
        callbacks=[counter, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        log_every_n_steps=10,
    )
    if sc.val_every:
        opts.update(val_check_interval=sc.val_every, check_val_every_n_epoch=None)
    else:
        opts.update(limit_val_batches=0)
    opts.update(trainer_kwargs or {})
    trainer = pl.Trainer(**opts)
    t0 = time.perf_counter()
    error = ""
    try:
        trainer.fit(module, datamodule=dm) if dm is not None else trainer.fit(module)
    except Exception as e:  # noqa: BLE001 - a halted or crashed run is a result, not a benchmark failure
        error = f"{type(e).__name__}: {str(e)[:200]}"
    wall = time.perf_counter() - t0
    finite = params_finite(module)
    metric = float("nan")
    if finite:
        val = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=1.0,
        )
        try:
            out = (
                val.validate(module, datamodule=dm, verbose=False)
                if dm is not None
                else val.validate(module, verbose=False)
            )
            metric = float(out[0][sc.metric])
        except Exception as e:  # noqa: BLE001
            error = error or f"validate: {type(e).__name__}: {e}"
    done = trainer.global_step
    planned = steps or sc.steps
    if error:
        outcome = "halted" if "Divergence" in error else "error"
    elif not finite or not math.isfinite(metric):
        outcome = "diverged" if done >= planned else "stopped early, diverged"
    elif done < planned:
        outcome = "stopped early"
    else:
        outcome = "ok"
    return RunResult(
        survived=outcome == "ok",
        outcome=outcome,
        metric=metric,
        nonfinite_steps=max(counter.nonfinite_grad_steps, counter.nonfinite_loss_steps),
        steps_done=done,
        wall_s=wall,
        error=error,
    )
