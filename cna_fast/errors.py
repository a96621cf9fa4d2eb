"""Errors raised for bad user input, and the checks of plain values that raise them.

The CLI turns every CNAError into a one-line message and exit code 2.
"""
from __future__ import annotations

import numbers


class CNAError(ValueError):
    """Bad input: the message names the problem and how to fix it."""


class CircuitMismatchError(CNAError):
    """A circuit was applied to a model whose architecture it does not fit."""


class UnsupportedArchitectureError(CNAError):
    """The model's architecture has no adapter."""


class CircuitWeightsWarning(UserWarning):
    """A circuit is applied to a model of the same shape but with other weights than the one it was found on."""


def positive_int(value: object, name: str) -> int:
    """`value` as an int if it is a whole number of at least 1 (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CNAError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def one_of(value: object, choices: tuple, what: str, meanings: str = "") -> object:
    """`value` if it is one of `choices`; else a CNAError naming them (and what they mean, when given)."""
    if value not in choices:
        hint = f" ({meanings})" if meanings else ""
        raise CNAError(f"unknown {what} {value!r}: choose one of {', '.join(map(str, choices))}{hint}")
    return value


def not_one_string(value: object, name: str) -> object:
    """`value` (a list or a lazy stream of prompts, left unread) unless it is one string or a number: a string
    would be read as single characters."""
    if isinstance(value, (str, bytes)):
        raise CNAError(f"{name} must be a list of strings, got one string {value[:60]!r} (it would be read as single "
                       f"characters): pass [{value[:30]!r}]")
    if not hasattr(value, "__iter__"):
        raise CNAError(f"{name} must be a list of strings, got {type(value).__name__} {value!r}")
    return value


def text_list(value: object, name: str) -> list[str]:
    """`value` as a list of strings: a list (or other iterable) of text, never one string (which would be iterated
    as single characters)."""
    items = list(not_one_string(value, name))
    bad = next((item for item in items if not isinstance(item, str)), None)
    if bad is not None:
        raise CNAError(f"{name} must be a list of strings, but it holds {type(bad).__name__} {bad!r}")
    return items


def real_number(value: object, name: str) -> float:
    """`value` as a float if it is a real number (not text, not a bool)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise CNAError(f"{name} must be a number, got {type(value).__name__} {value!r}"
                       + (f": pass {name}={value.strip()}" if isinstance(value, str) else ""))
    return float(value)


def number_list(value: object, name: str) -> list[float]:
    """`value` as a list of floats: a list of real numbers, never a string or a single number."""
    if isinstance(value, (str, bytes, numbers.Number)) or not hasattr(value, "__iter__"):
        raise CNAError(f"{name} must be a list of numbers like [0, 0.5], got {type(value).__name__} {value!r}")
    return [real_number(item, f"each of {name}") for item in value]
