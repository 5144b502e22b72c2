"""The shared argument checks: accepted values pass through, wrong types/values name the argument."""

import math

import numpy as np
import pytest

from lightning_gradguard.core._arg_checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive,
    check_unit_interval,
    is_number,
)


@pytest.mark.parametrize(("value", "expected"), [(1, True), (1.5, True), (True, False), ("1", False), (None, False)])
def test_is_number(value, expected):
    assert is_number(value) is expected


def test_accepted_values_pass_through():
    assert check_int("n", 3, 1) == 3
    assert check_int("n", None, 1, allow_none=True) is None
    assert check_choice("mode", "a", ("a", "b")) == "a"
    assert check_bool("flag", False) is False


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: check_int("steps", 0, 1), ValueError, r"steps must be an int >= 1, got 0"),
        (lambda: check_int("steps", 2.0, 1), TypeError, r"steps must be an int >= 1, got float \(2.0\)"),
        (lambda: check_int("steps", True, 0), TypeError, r"steps must be an int >= 0, got bool"),
        (lambda: check_int("every", -1, 1, allow_none=True), ValueError, r"every must be an int >= 1 or None, got -1"),
        (lambda: check_choice("mode", "c", ("a", "b")), ValueError, r"mode must be one of \('a', 'b'\), got 'c'"),
        (lambda: check_choice("mode", 1, ("a",)), TypeError, r"mode must be a str, one of \('a',\), got int"),
        (lambda: check_bool("flag", 1), TypeError, r"flag must be a bool, got int \(1\)"),
    ],
)
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "value", [np.float32(2.5), np.float64(2.5), np.int64(3), np.int32(3), np.uint8(3), np.float16(2.5)]
)
def test_numpy_scalars_are_numbers_and_come_back_as_python_numbers(value):
    assert is_number(value)
    got = check_number("x", value, low=0.0)
    assert type(got) is float
    assert got == float(value)
    assert type(check_positive("x", value)) is float


def test_numpy_integers_are_ints_and_numpy_bools_are_not_numbers():
    assert check_int("n", np.int64(3), 1) == 3
    assert type(check_int("n", np.int64(3), 1)) is int
    assert not is_number(np.bool_(True))
    assert check_bool("flag", np.bool_(True)) is True
    with pytest.raises(TypeError, match=r"n must be an int >= 1, got float64"):
        check_int("n", np.float64(3.0), 1)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: check_int("window", 10**12, 2, high=10**6), ValueError, r"window must be an int >= 2 and <= 1000000"),
        (lambda: check_number("x", math.nan, low=0.0), ValueError, r"x must be in \[0.0, inf\], got nan"),
        (lambda: check_positive("x", math.inf), ValueError, r"x must be finite and > 0, got inf"),
        (lambda: check_positive("x", math.inf, allow_inf=True), None, None),
        (lambda: check_unit_interval("d", 1.0), ValueError, r"d must be in the open interval \(0, 1\), got 1.0"),
        (lambda: check_unit_interval("q", 1.0, closed=True), None, None),
        (lambda: check_number("x", None, allow_none=True), None, None),
        (lambda: check_number("x", "1"), TypeError, r"x must be a number, .*got str \('1'\)"),
    ],
)
def test_number_checks(call, error, match):
    if error is None:
        call()
        return
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: check_int("steps", "3", 1, owner="NaNGuard"),
        lambda: check_number("lr_factor", "0.5", owner="NaNGuard"),
        lambda: check_choice("action", 1, ("skip",), owner="NaNGuard"),
        lambda: check_bool("flag", 1, owner="NaNGuard"),
    ],
)
def test_type_errors_name_the_owner_class(call):
    with pytest.raises(TypeError, match=r"^NaNGuard: "):
        call()


def test_norm_type_and_patterns():
    from lightning_gradguard.core._arg_checks import check_norm_type, check_patterns

    assert check_norm_type("p", 0.5) == 0.5
    assert check_norm_type("p", math.inf, low=1.0, high=100.0) == math.inf
    with pytest.raises(ValueError, match=r"^O: p must be a positive number or inf, got 0$"):
        check_norm_type("p", 0, owner="O")
    with pytest.raises(ValueError, match=r"^p must be in \[1, 100\] or inf, got 0.5$"):
        check_norm_type("p", 0.5, low=1.0, high=100.0)
    with pytest.raises(TypeError, match=r"^p must be a number, a positive number or inf, got str"):
        check_norm_type("p", "2")
    assert check_patterns("exclude", ["a", "b.*"]) == ("a", "b.*")
    assert check_patterns("exclude", None) == ()
    with pytest.raises(TypeError, match=r"^O: exclude must be a list or tuple of str, got str \('a'\)$"):
        check_patterns("exclude", "a", owner="O")
    with pytest.raises(ValueError, match=r"exclude must hold non-empty str patterns, got an empty one"):
        check_patterns("exclude", ("a", ""))
