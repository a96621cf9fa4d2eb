"""cna_fast: fast Contrastive Neuron Attribution.

Find the few MLP neurons whose activations separate two prompt sets, then steer a model by scaling
exactly those neurons. Data flows one way: prompts -> capture -> stats -> attribution -> circuit.
"""
from .errors import CircuitMismatchError, CNAError, UnsupportedArchitectureError
from .models import get_adapter, load_model
from .stats import NeuronStats
from .capture import capture_contrast
from .circuit import Circuit
from .attribution import discover, score_neurons, select_neurons

__version__ = "0.1.0"

__all__ = [
    "CNAError",
    "Circuit",
    "CircuitMismatchError",
    "NeuronStats",
    "UnsupportedArchitectureError",
    "capture_contrast",
    "discover",
    "get_adapter",
    "load_model",
    "score_neurons",
    "select_neurons",
]
