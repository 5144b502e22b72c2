"""The shared argument checks: accepted values pass through, wrong types/values name the argument."""

import pytest

from lightning_gradguard.core.arg_checks import check_bool, check_choice, check_int, is_number


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
