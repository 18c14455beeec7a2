"""Argument checks shared by every public constructor and function.

Each check raises before any state changes, with a message that names the
argument, the value it got and what to pass instead.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["positive_number", "positive_int", "non_negative_int", "number_in_range", "choice", "flag", "state_keys"]


def positive_number(name: str, value: object, fix: str, *, allow_inf: bool = False) -> float:
    """`value` as a float if it is a real number > 0 (and finite unless `allow_inf`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}; {fix}")
    number = float(value)
    if math.isnan(number) or number <= 0 or (math.isinf(number) and not allow_inf):
        kind = "a positive number" if allow_inf else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}; {fix}")
    return number


def positive_int(name: str, value: object, fix: str, *, allow_none: bool = False) -> int | None:
    """`value` as an int if it is an integer >= 1 (or None with `allow_none`)."""
    if value is None and allow_none:
        return None
    return _int_at_least(name, value, fix, 1)


def non_negative_int(name: str, value: object, fix: str) -> int:
    """`value` as an int if it is an integer >= 0 (a count, a step, a seed)."""
    return _int_at_least(name, value, fix, 0)


def _int_at_least(name: str, value: object, fix: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}; {fix}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}; {fix}")
    return int(value)


def number_in_range(name: str, value: object, low: float, high: float, fix: str, *, low_open: bool = True) -> float:
    """`value` as a float if it lies in (low, high] (or [low, high] with `low_open=False`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}; {fix}")
    number = float(value)
    above_low = number > low if low_open else number >= low
    if math.isnan(number) or not above_low or number > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}; {fix}")
    return number


def flag(name: str, value: object, fix: str, *, allow_none: bool = False) -> bool | None:
    """`value` if it is True or False (or None with `allow_none`): a string such as "no"
    would otherwise count as True."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}; {fix}")
    return value


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    """`value` if it is one of `options`."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value  # type: ignore[return-value]


def state_keys(owner: str, state: object, expected: set[str]) -> None:
    """Check that a state dict has exactly the `expected` keys."""
    if not isinstance(state, dict):
        raise TypeError(f"{owner}.load_state_dict expects a dict from {owner}.state_dict(), got {type(state).__name__}")
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{owner}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}; "
            f"pass the dict returned by {owner}.state_dict() of the same configuration"
        )
