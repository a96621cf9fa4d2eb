"""cna_fast: fast Contrastive Neuron Attribution.

Find the few MLP neurons whose activations separate two prompt sets, then steer a model by scaling
exactly those neurons. Data flows one way: prompts -> capture -> stats -> attribution -> circuit
-> steering -> evaluation, with search, export and jobs on top; each stage is a folder usable on
its own (docs/architecture.md).
"""
from ._version import __version__
from .attribution import Selection, attribute, score_neurons, select_neurons
from .capture import Checkpoint, capture_contrast
from .circuit import Circuit
from .errors import CircuitMismatchError, CNAError, UnsupportedArchitectureError
from .export import export_folded, export_gguf, export_lora
from .jobs import generate_to_file
from .models import get_adapter, load_model
from .pipeline import UniversalFilter, discover
from .prompts import PromptSource, bundled_prompts, read_prompts
from .search import Judging, SearchBudget, SearchSpace, tune
from .settings import CaptureSettings
from .stats import MoEStats, NeuronStats
from .steering import GenerationSettings, Steering, caa, generate, steer

__all__ = [
    "CNAError",
    "CaptureSettings",
    "Checkpoint",
    "Circuit",
    "CircuitMismatchError",
    "GenerationSettings",
    "Judging",
    "MoEStats",
    "NeuronStats",
    "PromptSource",
    "SearchBudget",
    "SearchSpace",
    "Selection",
    "Steering",
    "UnsupportedArchitectureError",
    "UniversalFilter",
    "__version__",
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
