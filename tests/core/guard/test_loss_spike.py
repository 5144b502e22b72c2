"""LossSpikeDetector against a plain-Python reference of the windowed z-score."""

import math
import random
import statistics

import pytest
import torch

from lightning_gradguard.core.guard._loss_spike import LossSpikeDetector


def _reference(values, zscore, window, min_samples):
    hist, out = [], []  # (value, kept) over the last `window` steps
    for v in values:
        kept = [x for x, k in hist if k]
        spike = False
        if math.isfinite(v) and len(kept) >= min_samples:
            mean = statistics.fmean(kept)
            std = statistics.stdev(kept) if len(kept) > 1 else 0.0
            std = max(std, 0.05 * abs(mean) + 1e-12)  # the floor of core/thresholds.zscore
            spike = (v - mean) / std > zscore
        out.append(spike)
        hist.append((v, math.isfinite(v) and not spike))
        hist = hist[-window:]
    return out


def test_matches_reference_with_spikes_and_nonfinite_values():
    rng = random.Random(0)
    values = [1.0 + 0.05 * rng.gauss(0, 1) for _ in range(200)]
    for i in (30, 31, 90, 150):
        values[i] = 3.0
    values[60], values[61], values[120] = math.nan, math.inf, -math.inf
    det = LossSpikeDetector(zscore=5.0, window=20, min_samples=5)
    got = [bool(det.update(torch.tensor(v))) for v in values]
    assert got == _reference(values, 5.0, 20, 5)
    assert got[30]
    assert got[31]
    assert got[90]
    assert got[150]
    assert sum(got) == 4
    assert int(det.compute()["count"]) <= 20


def test_memory_is_bounded_and_state_round_trips():
    det = LossSpikeDetector(zscore=3.0, window=8)
    for i in range(1000):
        det.update(torch.tensor(1.0 + (i % 3) * 0.01))
    assert det._values.numel() == 8
    clone = LossSpikeDetector(zscore=3.0, window=8)
    clone.load_state_dict(det.state_dict())
    for v in (1.0, 1.5, 1.01):
        assert bool(clone.update(torch.tensor(v))) == bool(det.update(torch.tensor(v)))


def test_flat_loss_does_not_divide_by_zero():
    det = LossSpikeDetector(zscore=3.0, window=10, min_samples=3)
    flags = [bool(det.update(torch.tensor(v))) for v in (2.0, 2.0, 2.0, 2.0, 2.001, 2.5)]
    assert flags == [False, False, False, False, False, True]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"zscore": 0}, "LossSpikeDetector: zscore must be finite and > 0"),
        ({"zscore": float("inf")}, "zscore must be finite and > 0"),
        ({"window": 1}, "window must be an int >= 2"),
        ({"window": 5, "min_samples": 6}, r"min_samples must be an int >= 2 and <= 5, got 6"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossSpikeDetector(**kwargs)
