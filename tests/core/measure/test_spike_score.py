"""SpikeScore against an independent brute-force computation (numpy over the whole stream)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.core.measure._spike_score import SpikeScore


def reference(losses: list[float], norms: list[float], window: int = 128, sigmas: float = 6.0) -> tuple[int, int]:
    """(spikes, judged) recomputed from scratch at every step with numpy (population std, as OLMo-core)."""
    spikes = judged = 0
    seen: dict[str, list[float]] = {"loss": [], "norm": []}
    for loss, norm in zip(losses, norms):
        verdicts = []
        for key, value in (("loss", loss), ("norm", norm)):
            if not math.isfinite(value):
                verdicts.append(True)
                continue
            hist = np.asarray(seen[key][-window:], dtype=np.float64)
            if len(hist) == window:
                mean, std = hist.mean(), hist.std()
                if std > 1e-12 * abs(mean):
                    verdicts.append(bool(value > mean + sigmas * std))
            seen[key].append(value)
        if verdicts:
            judged += 1
            spikes += any(verdicts)
    return spikes, judged


def stream(seed: int, n: int, level: float, noise: float, spike_every: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    losses = level * (1 + noise * rng.standard_normal(n))
    norms = np.exp(rng.normal(0.0, 0.3, n))
    losses[::spike_every] *= 40.0
    norms[7 :: spike_every * 2] *= 1e3
    return [float(x) for x in losses], [float(x) for x in norms]


@pytest.mark.parametrize(
    ("seed", "level", "noise"),
    [(0, 2.3, 0.05), (1, 1e6, 1e-9), (2, -3.0, 0.2), (3, 1e-20, 0.1)],
)
def test_matches_brute_force(seed: int, level: float, noise: float) -> None:
    losses, norms = stream(seed, 1500, level, noise, spike_every=97)
    score = SpikeScore()
    flags = [score.update(loss, norm) for loss, norm in zip(losses, norms)]
    spikes, judged = reference(losses, norms)
    assert (score.spikes, score.judged) == (spikes, judged)
    assert sum(flags) == spikes
    assert score.score == pytest.approx(spikes / judged)
    if level > 0:  # the injected spikes are found (a negative loss times 40 is a dip, not a spike)
        assert spikes >= 10


def test_nonfinite_values_spike_and_never_enter_the_window() -> None:
    score = SpikeScore(window=4)
    assert score.update(float("nan"), 1.0) is True  # before any window: still the worst spike
    for x in [1.0, 1.1, 0.9, 1.0]:
        score.update(x, 1.0 + x / 10)
    assert score.update(1.02, float("inf")) is True
    assert score.update(1.02, 1.1) is False
    assert score.spikes == 2
    assert all(math.isfinite(v) for v in score.state_dict()["norm"])


def test_constant_series_and_missing_loss_judge_nothing() -> None:
    score = SpikeScore(window=8)
    for _ in range(50):
        assert score.update(0.0, 1.0) is False  # a loss of exactly 0 and a constant norm: no distribution
    assert score.update(5.0, 1.0) is False  # a level shift after a constant stretch is not a spike
    assert score.judged == 0
    assert score.score is None
    only_norm = SpikeScore(window=4)
    for x in [1.0, 1.2, 0.8, 1.1, 100.0]:
        only_norm.update(None, x)
    assert (only_norm.spikes, only_norm.judged) == (1, 1)


def test_state_dict_resume_continues_exactly() -> None:
    losses, norms = stream(5, 600, 1.0, 0.1, spike_every=53)
    whole = SpikeScore()
    for loss, norm in zip(losses, norms):
        whole.update(loss, norm)
    first = SpikeScore()
    for loss, norm in zip(losses[:311], norms[:311]):
        first.update(loss, norm)
    resumed = SpikeScore()
    resumed.load_state_dict(first.state_dict())
    for loss, norm in zip(losses[311:], norms[311:]):
        resumed.update(loss, norm)
    assert (resumed.spikes, resumed.judged) == (whole.spikes, whole.judged)


@pytest.mark.parametrize(("kwargs", "match"), [({"window": 1}, "window"), ({"sigmas": 0}, "sigmas")])
def test_bad_arguments_name_themselves(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpikeScore(**kwargs)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
        ),
        max_size=60,
    )
)
def test_any_stream_never_raises(rows: list) -> None:
    # 1.8e308 and -1.8e308 next to each other, NaN, inf, None: the score's own arithmetic never raises
    score = SpikeScore(window=4)
    for loss, norm in rows:
        assert score.update(loss, norm) in (True, False)
    assert score.score is None or 0.0 <= score.score <= 1.0
    SpikeScore(window=4).load_state_dict(score.state_dict())


def test_values_at_the_float_limit_do_not_overflow() -> None:
    score = SpikeScore(window=3)
    for v in [1.7e308, -1.7e308, 1.7e308, 1.0, 1.7e308, 1e300]:
        score.update(v, v)
    assert score.judged >= 0
