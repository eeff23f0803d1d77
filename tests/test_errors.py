"""The argument checks of ppq_lightning.errors: what they accept (returned unchanged) and the one
message shape of what they reject."""

import math
import re

import pytest

from ppq_lightning.errors import (
    InvariantError,
    PPQConfigError,
    bad_value,
    check_bool,
    check_choice,
    check_int,
    check_number,
)


def _raises(message: str):
    """Expect a PPQConfigError with exactly ``message``."""
    return pytest.raises(PPQConfigError, match=f"^{re.escape(message)}$")


def test_bad_value_builds_the_message_shape():
    error = bad_value("sparsity", 1.5, "a float in [0, 1)")
    assert isinstance(error, PPQConfigError) and isinstance(error, ValueError)
    assert str(error) == "sparsity=1.5 is not allowed: expected a float in [0, 1)."
    assert str(bad_value("pattern", "2:5", "N:M")) == "pattern='2:5' is not allowed: expected N:M."


def test_invariant_error_is_a_runtime_error():
    assert issubclass(InvariantError, RuntimeError)


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0, {}),
        (-5, {}),
        (1, {"minimum": 1}),
        (8, {"maximum": 8}),
        (2, {"minimum": 2, "maximum": 2}),
    ],
)
def test_check_int_returns_accepted_values(value, kwargs):
    assert check_int("n", value, **kwargs) is value


def test_check_int_accepts_none_only_when_allowed():
    assert check_int("n", None, minimum=1, allow_none=True) is None
    with _raises("n=None is not allowed: expected an integer >= 1."):
        check_int("n", None, minimum=1)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {"minimum": 1}, "r=0 is not allowed: expected an integer >= 1."),
        (9, {"maximum": 8}, "r=9 is not allowed: expected an integer <= 8."),
        (1, {"minimum": 2, "maximum": 8}, "r=1 is not allowed: expected an integer from 2 to 8."),
        (9, {"minimum": 2, "maximum": 8}, "r=9 is not allowed: expected an integer from 2 to 8."),
        (True, {}, "r=True is not allowed: expected an integer."),
        (False, {"minimum": 0}, "r=False is not allowed: expected an integer >= 0."),
        (2.0, {}, "r=2.0 is not allowed: expected an integer."),
        ("3", {}, "r='3' is not allowed: expected an integer."),
        (
            0,
            {"minimum": 1, "allow_none": True},
            "r=0 is not allowed: expected None or an integer >= 1.",
        ),
        (0, {"minimum": 1, "allowed": "a rank"}, "r=0 is not allowed: expected a rank."),
        (
            0,
            {"minimum": 1, "allow_none": True, "allowed": "a rank"},
            "r=0 is not allowed: expected a rank.",
        ),
    ],
)
def test_check_int_rejects_with_the_range_in_the_message(value, kwargs, message):
    with _raises(message):
        check_int("r", value, **kwargs)


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0.5, {}),
        (-3, {}),
        (0.0, {"low": 0}),
        (1.0, {"high": 1}),
        (1e-9, {"low": 0, "low_open": True}),
        (0.999, {"low": 0, "high": 1, "low_open": True, "high_open": True}),
        (math.inf, {"low": 0}),
    ],
)
def test_check_number_returns_accepted_values(value, kwargs):
    assert check_number("x", value, **kwargs) is value


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (True, {}, "x=True is not allowed: expected a finite number."),
        (False, {"low": 0}, "x=False is not allowed: expected a number >= 0."),
        (math.nan, {}, "x=nan is not allowed: expected a finite number."),
        (math.nan, {"low": 0, "high": 1}, "x=nan is not allowed: expected a number in [0, 1]."),
        (math.inf, {}, "x=inf is not allowed: expected a finite number."),
        ("0.5", {}, "x='0.5' is not allowed: expected a finite number."),
        (None, {}, "x=None is not allowed: expected a finite number."),
        (0, {"low": 0, "low_open": True}, "x=0 is not allowed: expected a number > 0."),
        (-0.1, {"low": 0}, "x=-0.1 is not allowed: expected a number >= 0."),
        (1, {"high": 1, "high_open": True}, "x=1 is not allowed: expected a number < 1."),
        (1.5, {"high": 1}, "x=1.5 is not allowed: expected a number <= 1."),
        (
            0,
            {"low": 0, "high": 1, "low_open": True, "high_open": True},
            "x=0 is not allowed: expected a number in (0, 1).",
        ),
        (
            1.0,
            {"low": 0, "high": 1, "high_open": True},
            "x=1.0 is not allowed: expected a number in [0, 1).",
        ),
        (
            0.0,
            {"low": 0, "high": 0.5, "low_open": True},
            "x=0.0 is not allowed: expected a number in (0, 0.5].",
        ),
        (
            2,
            {"low": 0, "high": 1, "allow_none": True},
            "x=2 is not allowed: expected None or a number in [0, 1].",
        ),
        (2, {"high": 1, "allowed": "a probability"}, "x=2 is not allowed: expected a probability."),
    ],
)
def test_check_number_rejects_with_the_interval_in_the_message(value, kwargs, message):
    with _raises(message):
        check_number("x", value, **kwargs)


def test_check_number_accepts_none_only_when_allowed():
    assert check_number("x", None, low=0, allow_none=True) is None


@pytest.mark.parametrize(("value", "choices"), [("a", ("a", "b")), (2, [1, 2]), (None, [None])])
def test_check_choice_returns_accepted_values(value, choices):
    assert check_choice("mode", value, choices) is value


def test_check_choice_accepts_any_iterable_of_choices():
    assert check_choice("dtype", "float64", {"float32": 1, "float64": 2}) == "float64"
    assert check_choice("mode", "b", (c for c in "ab")) == "b"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("c", "mode='c' is not allowed: expected one of a, b."),
        ("A", "mode='A' is not allowed: expected one of a, b."),
        (None, "mode=None is not allowed: expected one of a, b."),
    ],
)
def test_check_choice_rejects_with_every_choice_in_the_message(value, message):
    with _raises(message):
        check_choice("mode", value, ["a", "b"])


@pytest.mark.parametrize("value", [True, 1.0])
def test_check_choice_compares_types_too(value):
    # True == 1 == 1.0 in Python, but none of them is the choice 1
    with _raises(f"k={value!r} is not allowed: expected one of 1, 2."):
        check_choice("k", value, [1, 2])


@pytest.mark.parametrize("value", [True, False])
def test_check_bool_returns_accepted_values(value):
    assert check_bool("flag", value) is value


@pytest.mark.parametrize("value", [0, 1, "false", "True", None])
def test_check_bool_rejects_everything_else(value):
    with _raises(f"flag={value!r} is not allowed: expected true or false."):
        check_bool("flag", value)


def test_check_folder_accepts_folders_to_be_and_refuses_files(tmp_path):
    from ppq_lightning.errors import check_folder

    assert check_folder("out", tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_folder("out", str(tmp_path)) == tmp_path
    (tmp_path / "f").write_text("")
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(PPQConfigError, match=r"out='.*' is not allowed.*'.*f' is a file"):
            check_folder("out", bad)
    for bad in ("", 3, None):
        with pytest.raises(PPQConfigError, match=f"out={bad!r}"):
            check_folder("out", bad)
