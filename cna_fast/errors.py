"""Errors raised for bad user input. The CLI turns each into a message and exit code 2."""


class CNAError(ValueError):
    """Bad input: the message names the problem and how to fix it."""


class CircuitMismatchError(CNAError):
    """A circuit was applied to a model whose architecture it does not fit."""


class UnsupportedArchitectureError(CNAError):
    """The model's architecture has no adapter."""


class CircuitWeightsWarning(UserWarning):
    """A circuit is applied to a model of the same shape but with other weights than the one it was found on."""
