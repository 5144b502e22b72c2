"""Every constructor argument of the three callbacks rejects bad values (hypothesis-generated).

An independent oracle states each argument's documented type and range. Values drawn from a broad pool (ints,
floats with NaN/inf, bools, None, strings, lists, tuples, arbitrary objects) that the oracle calls bad must raise
``TypeError`` (wrong type) or ``ValueError`` (wrong value), with a message naming the argument and the value
received. A test also checks that the oracle covers every argument of the signature, so a new argument without a
validation test fails here.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_gradguard import AdaptiveGradientClipping, GradientNormMonitor, NaNGuard


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


Rule = tuple[Callable[[Any], bool], Callable[[Any], bool]]  # (type ok, value ok given the type is ok)


def choice(*options: str) -> Rule:
    return (lambda v: isinstance(v, str)), (lambda v: v in options)


def integer(low: int, optional: bool = False) -> Rule:
    return (lambda v: (optional and v is None) or _integer(v)), (lambda v: v is None or v >= low)


def number(ok: Callable[[float], bool], optional: bool = False) -> Rule:
    return (lambda v: (optional and v is None) or _number(v)), (lambda v: v is None or ok(v))


def boolean() -> Rule:
    return (lambda v: isinstance(v, bool)), (lambda v: True)


def positive_finite(v: float) -> bool:
    return 0 < v < math.inf


ORACLE: dict[type, dict[str, Rule]] = {
    AdaptiveGradientClipping: {
        "method": choice("zscore", "percentile", "agc", "norm", "value", "per_parameter"),
        "z_threshold": number(positive_finite),
        "clip_to": choice("threshold", "mean"),
        "ema_decay": number(lambda v: 0 < v < 1),
        "percentile": number(lambda v: 0 < v <= 100),
        "window": (lambda v: _integer(v), lambda v: 2 <= v <= 10**6),
        "percentile_estimator": choice("window", "histogram"),
        "clipping": number(positive_finite),
        "eps": number(positive_finite),
        "exclude": (
            lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)),
            lambda v: v is None or all(v),
        ),
        "max_norm": number(positive_finite),
        "clip_value": number(positive_finite),
        "norm_type": number(lambda v: 1 <= v <= 100 or v == math.inf),  # p-norms, 1 ... 100 or inf
        "warmup_steps": (lambda v: _integer(v), lambda v: 0 <= v <= 10**5),
        "fallback_factor": number(lambda v: 1 <= v < math.inf),
        "fallback_max_norm": number(positive_finite, optional=True),
        "log_every_n_steps": integer(1, optional=True),
        "progress_bar": boolean(),
    },
    NaNGuard: {
        "action": choice("auto", "rollback", "skip", "halt"),
        "lr_factor": number(lambda v: 0 < v <= 1),
        "max_consecutive_skips": integer(0),
        "escalate_to": choice("rollback", "halt"),
        "snapshot": choice("auto", "memory", "checkpoint"),
        "snapshot_every_n_steps": integer(1),
        "snapshot_confirm_steps": integer(0),
        "max_rollbacks": integer(0),
        "check_params": boolean(),
        "divergence": boolean(),
        "stability": boolean(),
        "spike_zscore": number(positive_finite, optional=True),
        "spike_window": (lambda v: _integer(v), lambda v: 2 <= v <= 10**6),
        "amp_scale_floor": number(positive_finite),
        "raise_on_halt": boolean(),
        "save_bad_batch": boolean(),
        "report_dir": ((lambda v: v is None or isinstance(v, (str, os.PathLike))), (lambda v: True)),
        "log_every_n_steps": integer(1, optional=True),
        "history_size": (lambda v: _integer(v), lambda v: 1 <= v <= 10**6),
        "min_lr_scale": number(lambda v: 0 < v <= 1),
        "lr_recovery_steps": integer(1, optional=True),
        "rollback_refill_steps": integer(1, optional=True),
        "rerun": boolean(),
        "bad_batch_window": integer(0),
        "amp_max_halvings": integer(1, optional=True),
        "shard_snapshots": boolean(),
        "snapshot_budget_mb": number(positive_finite, optional=True),
    },
    GradientNormMonitor: {
        "log_every_n_steps": integer(1, optional=True),
        "norm_type": number(lambda v: v > 0),
        "log_grad_histograms": boolean(),
        "flow_every_n_logs": integer(0, optional=True),
        "vanishing_threshold": number(positive_finite),
        "vanishing_patience": integer(1),
        "exploding_factor": number(lambda v: 1 < v < math.inf),
        "exploding_ema_decay": number(lambda v: 0 < v < 1),
        "exploding_warmup": integer(1),
        "exploding_z": number(lambda v: 0 <= v < math.inf),
        "progress_bar": boolean(),
    },
}

#: Constructor context for method-specific options: an option the chosen method does not use is refused (even a
#: good value), so each is tried with a method that uses it.
CONTEXT: dict[tuple[type, str], dict[str, Any]] = {
    (AdaptiveGradientClipping, name): {"method": method}
    for method, names in {
        "percentile": ("percentile", "window", "percentile_estimator"),
        "agc": ("clipping", "eps", "exclude"),
        "norm": ("max_norm",),
        "value": ("clip_value",),
    }.items()
    for name in names
}

ANY_VALUE = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, -1, 0.0, 1.0, 0.5, 100.0, 100.5, math.inf, -math.inf, math.nan]),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["zscore", "mean", "window", "rollback", "halt", "memory", "", "1", "0.5"]),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
    st.tuples(st.text(max_size=3)),
    st.builds(object),
    st.just(b"bytes"),
    st.just({"a": 1}),
)


def _bad(rule: Rule, value: Any) -> bool:
    type_ok, value_ok = rule
    return not (type_ok(value) and value_ok(value))


CASES = [pytest.param(cls, name, id=f"{cls.__name__}-{name}") for cls, rules in ORACLE.items() for name in rules]


@pytest.mark.parametrize("cls", list(ORACLE))
def test_oracle_covers_every_constructor_argument(cls):
    params = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    assert sorted(params) == sorted(ORACLE[cls])


@pytest.mark.parametrize(("cls", "name"), CASES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_bad_values_raise_naming_the_argument(cls, name, data):
    rule = ORACLE[cls][name]
    value = data.draw(ANY_VALUE.filter(lambda v: _bad(rule, v)), label=name)
    expected = TypeError if not rule[0](value) else ValueError
    with pytest.raises((TypeError, ValueError)) as info:
        cls(**CONTEXT.get((cls, name), {}), **{name: value})
    assert type(info.value) is expected, (name, value, info.value)
    message = str(info.value)
    assert name in message, message
    assert "got" in message, message


GOOD_CANDIDATES = [
    True, False, None, 0, 1, 2, 3, 5, 50, 1000, 1e-7, 0.01, 0.5, 0.97, 1.0, 2.5, 10.0, 100.0, math.inf,
    "zscore", "percentile", "agc", "norm", "value", "per_parameter", "threshold", "mean", "window", "histogram",
    "auto", "rollback", "skip", "halt", "memory", "checkpoint", "reports", Path("reports"),
    ["head"], ("head.*", "fc"), [],
]  # fmt: skip


@pytest.mark.parametrize(("cls", "name"), CASES)
def test_good_values_are_accepted(cls, name):
    """The other side of the oracle: every candidate it calls good constructs (the oracle is not 'reject all')."""
    rule = ORACLE[cls][name]
    good = [v for v in GOOD_CANDIDATES if not _bad(rule, v)]
    assert len(good) >= 2
    for value in good:
        cls(**CONTEXT.get((cls, name), {}), **{name: value})
