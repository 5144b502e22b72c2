"""Vanishing and exploding layer detectors against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.core.measure._layer_health import ExplodingDetector, VanishingDetector

NAMES = ["a", "b", "c"]
NAN, INF = math.nan, math.inf


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------- vanishing


def test_vanishing_needs_patience_consecutive_updates():
    det = VanishingDetector(threshold=1e-6, patience=3)
    history = [t(1e-9, 1e-9, 1e-2), t(1e-9, 1e-3, 1e-2), t(1e-9, 1e-9, 1e-2), t(1e-9, 1e-9, 1e-2)]
    flagged = []
    for ratios in history:
        det.update(ratios, NAMES)
        flagged.append(det.flagged_names())
    # "a" is low 4 times in a row; "b" is interrupted at the 2nd update, so its streak restarts
    assert flagged == [[], [], ["a"], ["a"]]
    assert det.streak.tolist() == [4, 2, 0]


def test_vanishing_threshold_is_strict_and_zero_counts():
    det = VanishingDetector(threshold=1e-6, patience=1)
    det.update(t(1e-6, 0.0, 5e-7), NAMES)
    assert det.compute().tolist() == [False, True, True]


def test_vanishing_nonfinite_resets_streak():
    det = VanishingDetector(threshold=1e-6, patience=2)
    for ratios in (t(1e-9, 1e-9, 1e-9), t(NAN, INF, 1e-9)):
        det.update(ratios, NAMES)
    assert det.streak.tolist() == [0, 0, 2]
    assert det.flagged_names() == ["c"]


def test_vanishing_follows_layers_by_name():
    det = VanishingDetector(threshold=1e-6, patience=2)
    det.update(t(1e-9, 1e-9, 1e-9), NAMES)
    det.update(t(1e-9, 1e-9), ["c", "d"])  # "a", "b" had no gradient, "d" is new
    assert det.names == ["c", "d"]
    assert det.streak.tolist() == [2, 1]
    det.update(t(1e-9, 1e-9, 1e-9), ["a", "c", "d"])
    assert det.streak.tolist() == [1, 3, 2]  # "a" starts over: its history was dropped when it disappeared


def test_vanishing_state_dict_round_trip_weights_only(tmp_path):
    det = VanishingDetector(threshold=1e-5, patience=4)
    for _ in range(3):
        det.update(t(1e-9, 1.0, 1e-9), NAMES)
    path = tmp_path / "v.pt"
    torch.save(det.state_dict(), path)
    other = VanishingDetector(threshold=1e-5, patience=4)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.names == NAMES
    assert torch.equal(other.streak, det.streak)
    other.update(t(1e-9, 1.0, 1e-9), NAMES)
    assert other.flagged_names() == ["a", "c"]


def test_vanishing_reset_and_tolerant_load():
    det = VanishingDetector()
    det.update(t(0.0, 0.0, 0.0), NAMES)
    det.reset()
    assert det.names == []
    assert det.streak.numel() == 0
    det.load_state_dict({"names": ["x"], "streak": torch.zeros(5, dtype=torch.long)})  # wrong shape: ignored
    assert det.streak.tolist() == [0]
    det.load_state_dict({})
    assert det.names == []


def test_values_must_match_names():
    with pytest.raises(ValueError, match="one value per layer: got 2 values for 3 layer names"):
        VanishingDetector().update(t(1.0, 2.0), NAMES)


# ---------------------------------------------------------------------------- exploding


def reference_exploding(
    seq: list[list[float]], factor: float, decay: float, warmup: int, z: float = 3.0
) -> list[list[bool]]:
    """Plain-python per-layer reference of the documented rule: a band of max(log factor, z * std) above the EMA
    of the log norm; the history takes the value capped at the band."""
    n = len(seq[0])
    mean = [0.0] * n
    var = [0.0] * n
    count = [0] * n
    out = []
    for norms in seq:
        flags = []
        for i, x in enumerate(norms):
            valid = math.isfinite(x) and x > 0
            lx = math.log(x) if valid else 0.0
            bound = mean[i] + max(math.log(factor), z * math.sqrt(var[i]))
            flags.append(valid and count[i] >= warmup and lx > bound)
            if valid:
                if count[i] == 0:
                    mean[i] = lx
                else:
                    dev = min(lx, bound) - mean[i]
                    mean[i] += (1 - decay) * dev
                    var[i] = decay * (var[i] + (1 - decay) * dev * dev)
                count[i] += 1
        out.append(flags)
    return out


def test_exploding_matches_reference_and_caps_spikes():
    seq = [[1.0, 2.0, 3.0], [1.2, 2.2, 2.9], [0.9, 1.8, 3.1], [50.0, 2.0, 3.0], [1.1, 2.1, 300.0], [60.0, 2.0, 3.0]]
    det = ExplodingDetector(factor=10.0, ema_decay=0.8, warmup=3)
    got = []
    for norms in seq:
        det.update(t(*norms), NAMES)
        got.append(det.compute().tolist())
    assert got == reference_exploding(seq, 10.0, 0.8, 3)
    assert got[3] == [True, False, False]
    assert got[4] == [False, False, True]
    assert got[5] == [True, False, False]  # the first spike was capped, so the second one still stands out


@pytest.mark.parametrize("z", [0.0, 1.0, 3.0])
def test_exploding_matches_reference_on_noisy_streams(z):
    g = torch.Generator().manual_seed(0)
    # layer a steady, b swinging ~10x log-normally, c steady with rare 30x jumps
    seq = []
    for i in range(60):
        b = float(torch.exp(torch.randn((), generator=g) * 1.5))
        c = 30.0 if i % 17 == 16 else 1.0 + 0.1 * float(torch.rand((), generator=g))
        seq.append([1.0 + 0.05 * float(torch.rand((), generator=g)), b, c])
    det = ExplodingDetector(factor=10.0, ema_decay=0.9, warmup=5, z=z)
    got = []
    for norms in seq:
        det.update(t(*norms), NAMES)
        got.append(det.compute().tolist())
    assert got == reference_exploding(seq, 10.0, 0.9, 5, z)


def test_exploding_band_widens_for_a_layer_that_swings_routinely():
    """A layer whose norm swings ~10x between logs (log-normal, sigma 1.5) is flagged at the factor alone again and
    again; with the z band it is flagged far less, while a steady layer's 30x jump is flagged either way."""
    g = torch.Generator().manual_seed(1)
    seq = []
    for i in range(200):
        b = float(torch.exp(torch.randn((), generator=g) * 1.5))
        c = 30.0 if i in (100, 150) else 1.0
        seq.append([1.0, b, c])
    flags = {}
    for z in (0.0, 3.0):
        det = ExplodingDetector(factor=10.0, warmup=5, z=z)
        count = [0, 0, 0]
        for norms in seq:
            det.update(t(*norms), NAMES)
            count = [n + int(f) for n, f in zip(count, det.compute().tolist())]
        flags[z] = count
    assert flags[0.0][2] == flags[3.0][2] == 2  # the steady layer's two jumps
    assert flags[0.0][0] == flags[3.0][0] == 0
    assert flags[0.0][1] >= 10
    assert flags[3.0][1] * 4 <= flags[0.0][1]


def test_exploding_warmup_blocks_early_flags():
    det = ExplodingDetector(factor=2.0, warmup=3)
    for norms in ([1.0, 1.0, 1.0], [100.0, 1.0, 1.0], [1e4, 1.0, 1.0]):
        det.update(t(*norms), NAMES)
        assert det.flagged_names() == []
    det.update(t(1e6, 1.0, 1.0), NAMES)
    assert det.flagged_names() == ["a"]


def test_exploding_ignores_nan_inf_and_zero():
    det = ExplodingDetector(factor=10.0, warmup=1)
    det.update(t(1.0, 1.0, 1.0), NAMES)
    det.update(t(NAN, INF, 0.0), NAMES)
    assert det.flagged_names() == []  # inf is not "exploding": it is non-finite, NaNGuard's business
    assert det.count.tolist() == [1, 1, 1]
    assert det.running_norm().tolist() == [1.0, 1.0, 1.0]
    det.update(t(1000.0, 1.0, 1.0), NAMES)
    assert det.flagged_names() == ["a"]


def test_exploding_running_norm_nan_before_first_value():
    det = ExplodingDetector()
    det.update(t(0.0, 2.0, NAN), NAMES)
    rn = det.running_norm()
    assert math.isnan(rn[0])
    assert rn[1] == pytest.approx(2.0)
    assert math.isnan(rn[2])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.just(0.0)), min_size=3, max_size=3
        ),
        min_size=1,
        max_size=20,
    )
)
def test_exploding_state_never_poisoned(seq):
    det = ExplodingDetector(factor=5.0, warmup=2)
    for norms in seq:
        det.update(t(*norms), NAMES)
    assert torch.isfinite(det._log_mean).all()
    seen = det.count > 0
    assert torch.isfinite(det.running_norm()[seen]).all()


def test_exploding_state_dict_round_trip_weights_only(tmp_path):
    det = ExplodingDetector(factor=3.0, ema_decay=0.5, warmup=2)
    for norms in ([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]):
        det.update(t(*norms), NAMES)
    path = tmp_path / "e.pt"
    torch.save(det.state_dict(), path)
    other = ExplodingDetector(factor=3.0, ema_decay=0.5, warmup=2)
    other.load_state_dict(torch.load(path, weights_only=True))
    for d in (det, other):
        d.update(t(100.0, 2.0, 3.0), NAMES)
    assert other.flagged_names() == det.flagged_names() == ["a"]
    assert torch.equal(other.running_norm(), det.running_norm())


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: VanishingDetector(threshold=0.0), ValueError, r"threshold must be finite and > 0, got 0.0"),
        (lambda: VanishingDetector(threshold="x"), TypeError, r"threshold must be a number"),
        (lambda: VanishingDetector(patience=0), ValueError, r"patience must be an int >= 1, got 0"),
        (lambda: VanishingDetector(patience=1.5), TypeError, r"patience must be an int"),
        (lambda: ExplodingDetector(factor=1.0), ValueError, r"factor must be finite and > 1, got 1.0"),
        (lambda: ExplodingDetector(factor=math.inf), ValueError, r"factor must be finite and > 0"),
        (lambda: ExplodingDetector(ema_decay=1.0), ValueError, r"ema_decay must be in the open interval"),
        (lambda: ExplodingDetector(ema_decay=None), TypeError, r"ema_decay must be a float"),
        (lambda: ExplodingDetector(warmup=0), ValueError, r"warmup must be an int >= 1, got 0"),
        (lambda: ExplodingDetector(z=-0.5), ValueError, r"z must be finite and >= 0, got -0.5"),
        (lambda: ExplodingDetector(z="3"), TypeError, r"z must be a number >= 0"),
    ],
)
def test_validation(factory, error, match):
    with pytest.raises(error, match=match):
        factory()
