"""The callbacks pickle (Lightning's ``ddp_spawn`` launcher and hyperparameter-search tools pickle them), before a
fit and after one; what they hold as weak references is found again at the next setup."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from lightning_gradguard import GradientNormMonitor, NaNGuard, default_callbacks
from tests.ddp_runner import run_ddp_script
from tests.models import TinyRegression, loader, make_trainer


def test_the_callbacks_pickle_before_and_after_a_fit_and_train_again(tmp_path):
    callbacks = default_callbacks()
    copies = pickle.loads(pickle.dumps(callbacks))  # a WeakSet in the monitor made this fail
    make_trainer(tmp_path / "a", copies, max_steps=6).fit(TinyRegression(nan_at_steps=(3,)), loader())
    guard = next(cb for cb in copies if isinstance(cb, NaNGuard))
    assert [e["kind"] for e in guard.events] == ["skip"]
    again = pickle.loads(pickle.dumps(copies))  # after a fit (a weak reference to the Trainer)
    monitor = next(cb for cb in again if isinstance(cb, GradientNormMonitor))
    make_trainer(tmp_path / "b", again, max_steps=4).fit(TinyRegression(), loader())
    assert monitor.last_grad_norm is not None


def test_default_callbacks_under_ddp_spawn(tmp_path):
    proc = run_ddp_script(Path(__file__).parents[1] / "compat" / "ddp_spawn_script.py", tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 1
    assert result["steps"] == 10
    assert result["kinds"] == ["skip"]
