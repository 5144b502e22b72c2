"""End to end: a real ``tensorboard`` server serves what GradientNormMonitor wrote (histograms and scalars over HTTP).

The HTTP routes are those of the installed tensorboard's plugins (``tensorboard/plugins/histogram/
histograms_plugin.py``: ``/tags`` and ``/histograms?run=&tag=``; ``scalars_plugin.py``: ``/scalars?run=&tag=``),
mounted under ``/data/plugin/<plugin name>``. The run name is the log directory relative to ``--logdir``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradguard import GradientNormMonitor
from tests.models import TinyRegression, make_trainer

# how long to wait for the server to serve what was written: generous, because a loaded CI machine can take tens of
# seconds to start it; the test never waits longer than the server needs (it polls)
STARTUP_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read().decode())


@pytest.fixture
def tensorboard_server(tmp_path):
    """Start ``python -m tensorboard.main`` on 127.0.0.1 and a free port; yield (base_url, logdir); always stop it."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}", logdir, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _poll(url: str, proc: subprocess.Popen, until) -> object:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"tensorboard exited with code {proc.returncode}:\n{output[-2000:]}")
        try:
            data = _get_json(url)
            if until(data):
                return data
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            last_error = err
        time.sleep(0.3)
    pytest.fail(f"tensorboard did not serve {url} within {STARTUP_TIMEOUT_S}s (last error: {last_error})")


@pytest.mark.slow
def test_tensorboard_serves_gradguard_histograms(tensorboard_server):
    base, logdir, proc = tensorboard_server
    torch.manual_seed(0)
    monitor = GradientNormMonitor(log_every_n_steps=2, flow_every_n_logs=0)
    trainer = make_trainer(logdir, [monitor], max_steps=6)  # TensorBoardLogger at logs/run/version_0
    trainer.fit(TinyRegression())
    run = "run/version_0"

    tags = _poll(f"{base}/data/plugin/histograms/tags", proc, lambda d: "gradguard/layer_grad_norms" in d.get(run, {}))
    assert {"gradguard/layer_grad_norms", "gradguard/update_ratio"} <= set(tags[run])

    query = urllib.parse.urlencode({"run": run, "tag": "gradguard/layer_grad_norms"})
    served = _get_json(f"{base}/data/plugin/histograms/histograms?{query}")
    # each entry is [wall_time, step, [[left, right, count], ...]]
    assert [entry[1] for entry in served] == [0, 2, 4]
    for entry in served:
        assert sum(bucket[2] for bucket in entry[2]) == pytest.approx(3)  # one value per layer: net.0, net.2, net.4

    # the served buckets span the values written to the event file
    ea = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    ea.Reload()
    for entry, event in zip(served, ea.Histograms("gradguard/layer_grad_norms")):
        lows = [b[0] for b in entry[2] if b[2] > 0]
        highs = [b[1] for b in entry[2] if b[2] > 0]
        assert min(lows) <= event.histogram_value.min * (1 + 1e-6)
        assert max(highs) >= event.histogram_value.max * (1 - 1e-6)

    query = urllib.parse.urlencode({"run": run, "tag": "gradguard/grad_norm"})
    scalars = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
    assert [point[1] for point in scalars] == [0, 2, 4]
    assert scalars[-1][2] == pytest.approx(monitor.last_grad_norm, rel=1e-6)
