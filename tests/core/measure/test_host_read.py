"""read_scalars: values and types on the CPU; the stacked path (used on accelerators) gives the same numbers."""

from __future__ import annotations

import math

import torch

from lightning_gradguard.core.measure._host_read import read_scalars


def test_cpu_values_are_read_exactly():
    vals = read_scalars(
        [torch.tensor(0.1, dtype=torch.float64), torch.tensor(True), torch.tensor(3), torch.tensor(math.inf)],
        torch.device("cpu"),
    )
    assert vals == [0.1, True, 3, math.inf]  # float64 not rounded to float32 on this path


def test_stacked_path_agrees_with_direct_reads():
    """The stacked path is the one accelerators take; forced here on the CPU, it must read the same numbers."""
    tensors = [torch.tensor(2.5), torch.tensor(False), torch.tensor(math.nan), torch.tensor([7.0]), torch.tensor(1e300)]
    direct = read_scalars(tensors, torch.device("cpu"))
    stacked = read_scalars(tensors, torch.device("cpu"), stack=True)
    assert all(isinstance(v, float) for v in stacked)
    assert direct[0] == stacked[0] == 2.5
    assert bool(direct[1]) is bool(stacked[1]) is False
    assert math.isnan(direct[2])
    assert math.isnan(stacked[2])
    assert direct[3] == stacked[3] == 7.0
    assert stacked[4] == math.inf  # float32 on that path: what the guard reads are float32 norms and losses


def test_empty():
    assert read_scalars([], torch.device("cpu")) == []
