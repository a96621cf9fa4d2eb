"""cna_fast: fast Contrastive Neuron Attribution.

Find the few MLP neurons whose activations separate two prompt sets, then steer a model by scaling
exactly those neurons. Data flows one way: prompts -> capture -> stats -> attribution -> circuit
-> steering -> evaluate; each stage is a module usable on its own (docs/architecture.md).
"""
from .errors import CircuitMismatchError, CNAError, UnsupportedArchitectureError
from .models import get_adapter, load_model
from .prompts import PromptSource, bundled_prompts, read_prompts
from .stats import NeuronStats
from .settings import CaptureSettings
from .capture import capture_contrast
from .circuit import Circuit
from .attribution import attribute, score_neurons, select_neurons
from .pipeline import UniversalFilter, discover
from .steering import Steering, caa, generate, steer
from .export import export_folded, export_lora
from .gguf_export import export_gguf
from .tune import tune
from .batch_job import generate_to_file

__version__ = "0.1.0"

__all__ = [
    "CNAError",
    "CaptureSettings",
    "Circuit",
    "CircuitMismatchError",
    "NeuronStats",
    "PromptSource",
    "Steering",
    "UnsupportedArchitectureError",
    "UniversalFilter",
    "attribute",
    "bundled_prompts",
    "caa",
    "capture_contrast",
    "discover",
    "export_folded",
    "export_gguf",
    "export_lora",
    "generate",
    "generate_to_file",
    "get_adapter",
    "load_model",
    "read_prompts",
    "score_neurons",
    "select_neurons",
    "steer",
    "tune",
]
