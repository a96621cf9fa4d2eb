"""The circuit: the neurons a discovery selected, their statistics and provenance, the circuit file,
and the checks that it is well formed (`checks`) and fits a model (`fit`)."""
from .core import COLUMNS, Circuit, as_multiplier

__all__ = ["COLUMNS", "Circuit", "as_multiplier"]
