"""One place for the field checks every config runs in ``__post_init__`` (exact types, finite ranges)."""

from __future__ import annotations

import math


def check_int(name: str, value: object, minimum: int = 0) -> None:
    """``value`` must be an int (never a bool or a float) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be a finite int or float (not a bool) in the range, each end closed or open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        if high == math.inf:
            want = f"{'>' if low_open else '>='} {low}"
        else:
            want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_choice(name: str, value: object, choices: tuple | frozenset | set) -> None:
    """``value`` must be one of ``choices`` (compared exactly: ``True`` is not ``1``)."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_str(name: str, value: object, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}string, got {value!r}")


def check_optional_int(name: str, value: object, minimum: int = 0) -> None:
    """``None`` or an int ``>= minimum`` (see :func:`check_int`)."""
    if value is not None:
        check_int(name, value, minimum)


def check_ints(name: str, value: object, minimum: int = 0, *, distinct: bool = True,
               allow_empty: bool = False) -> tuple[int, ...]:
    """A non-empty (unless ``allow_empty``) list or tuple of ints ``>= minimum`` (distinct unless told), returned
    as a tuple."""
    want = f"a {'' if allow_empty else 'non-empty '}list of ints >= {minimum}"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must be {want}, got {v!r} in {list(value)}")
    if distinct and len(set(value)) != len(value):
        twice = sorted({v for v in value if list(value).count(v) > 1})
        raise ValueError(f"{name} must not list a value twice, got {list(value)} ({twice} twice)")
    return tuple(value)


def check_choices(name: str, value: object, choices: tuple | frozenset | set) -> tuple:
    """A non-empty list or tuple of distinct values of ``choices``, returned as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of {tuple(choices)}, got {value!r}")
    for v in value:
        if v not in choices:
            raise ValueError(f"{name} must be a non-empty list of {tuple(choices)}, got {v!r} in {list(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} must not list a value twice, got {list(value)}")
    return tuple(value)


def check_dict(name: str, value: object) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a dict with string keys, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# The three rules every experiment shares: one function each, one message style (``Config.field must ..., got ...``)
# ---------------------------------------------------------------------------------------------------------------
def check_seed(name: str, value: object) -> None:
    """A seed: an int ``>= 0`` (``torch.Generator().manual_seed`` takes it as it is)."""
    check_int(name, value, 0)


def check_n_boot(name: str, value: object) -> None:
    """Bootstrap resamples: an int ``>= 0``; ``0`` skips the bootstrap (confidence intervals are NaN)."""
    check_int(name, value, 0)


def check_knn_k(name: str, k: object, class_size: object, size_name: str) -> None:
    """``k``, the neighbours of the leave-one-out k-NN behind task decodability, against the class size.

    Each point of a class of ``class_size`` points has ``class_size - 1`` same-class neighbours; with
    ``k >= class_size - 1`` the vote can need more than there are, so TD reads low whatever the
    representation (:func:`~taskvec_interp.probes.decodability.task_decodability` refuses it too). So
    ``1 <= k <= class_size - 2``. ``name`` is the config's ``k`` (``SweepConfig.k``); ``size_name`` the field
    that sets the class size (``n_per_task``), already checked to be an int.
    """
    check_int(name, k, 1)
    if k > class_size - 2:  # type: ignore[operator]
        raise ValueError(f"{name} must be <= {size_name} - 2 = {class_size - 2} (each of the {class_size} points "  # type: ignore[operator]
                         f"per class has only {class_size - 1} same-class neighbours, so TD would read low "  # type: ignore[operator]
                         f"whatever the model does; use {size_name} >= {k + 2} or a smaller k), got {k}")
