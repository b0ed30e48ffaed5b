"""The field checks the configs share (taskvec_interp.validate): exact types, finite ranges, one message style
naming the field and the value. Each config's own refusals are in test_bad_inputs.py."""

from __future__ import annotations

import math

import pytest

from taskvec_interp import validate as V


@pytest.mark.parametrize("value", [True, 1.0, "3", None, -1])
def test_check_int_refuses_what_is_not_an_int_at_least_the_minimum(value):
    with pytest.raises(ValueError, match=r"^n_per_task must be an int >= 0, got "):
        V.check_int("n_per_task", value)


def test_check_int_and_optional_int_accept_ints():
    V.check_int("k", 1, 1)
    V.check_optional_int("layer", None)
    V.check_optional_int("layer", 3)
    with pytest.raises(ValueError, match="layer must be an int >= 0, got -2"):
        V.check_optional_int("layer", -2)


@pytest.mark.parametrize("value", [math.nan, math.inf, True, "0.1"])
def test_check_number_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match="lr must be a finite number"):
        V.check_number("lr", value)


def test_check_number_ranges_closed_and_open():
    V.check_number("dropout", 0.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"dropout must be in \[0.0, 1.0\), got 1.0"):
        V.check_number("dropout", 1.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"lr must be > 0.0, got 0.0"):
        V.check_number("lr", 0.0, 0.0, low_open=True)


def test_check_choice_compares_exactly():
    V.check_choice("mode", "add", ("add", "replace"))
    with pytest.raises(ValueError, match="mode must be one of"):
        V.check_choice("mode", "swap", ("add", "replace"))
    with pytest.raises(ValueError, match="flag must be one of"):
        V.check_choice("flag", True, (1, 2))  # True is not 1


def test_check_ints_and_choices_return_tuples_and_refuse_repeats():
    assert V.check_ints("shots", [1, 4]) == (1, 4)
    assert V.check_ints("layers", (), allow_empty=True) == ()
    with pytest.raises(ValueError, match=r"shots must not list a value twice, got \[1, 1\]"):
        V.check_ints("shots", [1, 1])
    with pytest.raises(ValueError, match="shots must be a non-empty list of ints"):
        V.check_ints("shots", "14")
    assert V.check_choices("modes", ["add"], ("add", "replace")) == ("add",)
    with pytest.raises(ValueError, match="modes must not list a value twice"):
        V.check_choices("modes", ["add", "add"], ("add", "replace"))


def test_check_bool_str_dict():
    V.check_bool("logprob", False)
    with pytest.raises(ValueError, match="logprob must be True or False, got 1"):
        V.check_bool("logprob", 1)
    V.check_str("family", "bitwise")
    with pytest.raises(ValueError, match="family must be a non-empty string"):
        V.check_str("family", "")
    V.check_dict("settings", {"td": {}})
    with pytest.raises(ValueError, match="settings must be a dict with string keys"):
        V.check_dict("settings", {1: 2})
