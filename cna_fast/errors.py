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
