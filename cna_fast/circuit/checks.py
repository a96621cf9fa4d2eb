"""Content checks for circuits made in code or read from files (which may be damaged or crafted).

Every number read from a file is bounded here before anything is allocated from it: a layer index
or layer count of 3e9 in a 2 KB file must be an error, not a 24 GB allocation.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CircuitMismatchError, CNAError

MAX_LAYERS = 4096  # the deepest models have ~130 layers
MAX_WIDTH = 1 << 24  # the widest MLPs have ~10^5 neurons per layer
MAX_EXPERTS = 1 << 16  # the most routed experts per layer in use are ~10^3
INDEX_FIELDS = ("layers", "neurons")
PER_NEURON = ("scores", "deltas", "mean_positive", "mean_negative", "std_positive", "std_negative")
CAA_FIELDS = ("caa_layers", "caa_directions")
OPTIONAL_FIELDS = (*CAA_FIELDS, "experts")  # experts: mixture-of-experts circuits only


def index_tensor(name: str, value: Any) -> torch.Tensor:
    """A 1-D int64 CPU tensor of non-negative indices; floats, bools and other shapes are errors."""
    tensor = torch.as_tensor(value).detach().cpu()
    if tensor.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise CNAError(f"circuit field {name} must hold integers, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise CNAError(f"circuit field {name} must be one-dimensional, got shape {list(tensor.shape)}")
    tensor = tensor.to(torch.int64)
    if int(tensor.min()) < 0:
        raise CNAError(f"circuit field {name} holds a negative index ({int(tensor.min())})")
    return tensor


def float_tensor(name: str, value: Any, size: int) -> torch.Tensor:
    """A float64 CPU tensor [size] without infinities."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if tensor.shape != (size,):
        raise CNAError(f"circuit field {name} has shape {list(tensor.shape)}, expected [{size}]")
    if torch.isinf(tensor).any():
        raise CNAError(f"circuit field {name} holds infinite values: the statistics overflowed; rediscover the "
                       "circuit (in float32 or bfloat16 rather than float16)")
    return tensor


def _count(value: Any, name: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise CNAError(f"circuit architecture {name} must be an integer in 1..{upper}, got {value!r}")
    return value


def architecture_widths(architecture: Mapping[str, Any]) -> list[int]:
    """The per-layer MLP widths a recorded architecture describes, after checking its types and bounds."""
    if not isinstance(architecture, Mapping):
        raise CNAError(f"circuit architecture must be an object, got {type(architecture).__name__}")
    if not isinstance(architecture.get("model_type"), str):
        raise CNAError(f"circuit architecture model_type must be text, got {architecture.get('model_type')!r}")
    num_layers = _count(architecture.get("num_layers"), "num_layers", MAX_LAYERS)
    d_ff = architecture.get("d_ff")
    if isinstance(d_ff, list):
        if len(d_ff) != num_layers:
            raise CNAError(f"circuit architecture lists {len(d_ff)} widths for {num_layers} layers")
        widths = [_count(width, "d_ff", MAX_WIDTH) for width in d_ff]
    else:
        widths = [_count(d_ff, "d_ff", MAX_WIDTH)] * num_layers
    if "d_model" in architecture:
        _count(architecture["d_model"], "d_model", MAX_WIDTH)
    return widths


def check_neurons(layers: torch.Tensor, neurons: torch.Tensor, architecture: Mapping[str, Any]) -> None:
    """Indices within the recorded architecture (or the global bounds without one), each pair once."""
    if layers.numel() == 0:
        return
    widths = architecture_widths(architecture) if architecture else None
    num_layers = len(widths) if widths else MAX_LAYERS
    if int(layers.max()) >= num_layers:
        raise CircuitMismatchError(f"circuit layer {int(layers.max())} is out of range (the model it was found on "
                                   f"has {num_layers} layers)")
    limits = torch.tensor(widths) if widths else torch.full((MAX_LAYERS,), MAX_WIDTH)
    outside = neurons >= limits[layers]
    if outside.any():
        first = int(outside.nonzero()[0])
        raise CircuitMismatchError(f"circuit neuron (layer {int(layers[first])}, index {int(neurons[first])}) is out "
                                   f"of range (width {int(limits[layers[first]])})")
    pairs = layers * MAX_WIDTH + neurons
    if torch.unique(pairs).numel() != pairs.numel():
        values, counts = torch.unique(pairs, return_counts=True)
        twice = int(values[counts > 1][0])
        raise CNAError(f"circuit lists neuron (layer {twice // MAX_WIDTH}, index {twice % MAX_WIDTH}) more than once: "
                       "each neuron may appear once")


def check_scores(circuit) -> None:
    """Measured circuits need finite scores and means; random controls (meta random_control) have none."""
    if "random_control" in circuit.meta:
        return
    for name in ("scores", "deltas", "mean_positive", "mean_negative"):
        missing = int(torch.isnan(getattr(circuit, name)).sum())
        if missing:
            raise CNAError(f"circuit {name} are NaN for {missing} of {len(circuit)} neurons: the statistics behind "
                           "them are not numbers (NaN activations, e.g. a float16 overflow, or a damaged checkpoint); "
                           "rediscover in float32 or bfloat16, without resuming from that checkpoint")


def check_caa(caa_layers: torch.Tensor, caa_directions: Any, architecture: Mapping[str, Any]) -> torch.Tensor:
    """CAA directions: [len(caa_layers), d_model] finite floats, layers unique and in range."""
    directions = torch.as_tensor(caa_directions).detach().cpu()
    if not directions.is_floating_point():
        raise CNAError(f"caa_directions must hold floats, got {directions.dtype}")
    directions = directions.to(torch.float32)
    if directions.dim() != 2 or directions.shape[0] != caa_layers.numel():
        raise CNAError(f"caa_directions must be [{caa_layers.numel()}, d_model], got {list(directions.shape)}")
    if torch.unique(caa_layers).numel() != caa_layers.numel():
        raise CNAError("caa_layers lists a layer more than once")
    num_layers = architecture.get("num_layers", MAX_LAYERS) if architecture else MAX_LAYERS
    if caa_layers.numel() and int(caa_layers.max()) >= num_layers:
        raise CNAError(f"caa_layers holds layer {int(caa_layers.max())}, out of range ({num_layers} layers)")
    d_model = architecture.get("d_model") if architecture else None
    if d_model is not None and directions.shape[1] != d_model:
        raise CNAError(f"caa_directions are {directions.shape[1]} wide but the model's hidden size is {d_model}")
    if not torch.isfinite(directions).all():
        raise CNAError("caa_directions hold NaN or infinite values: rediscover the circuit")
    return directions


def parse_header(header: Mapping[str, str], names: list[str], path: str, expected_format: str) -> dict:
    """The meta object of a circuit file, after checking its format tag and the set of tensors."""
    if header.get("format") != expected_format:
        raise CNAError(f"{path!r} is not a cna_fast circuit file (no {expected_format} header)")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except (ValueError, RecursionError) as error:
        raise CNAError(f"circuit file {path!r} has metadata that is not valid JSON ({error}): the file is "
                       "damaged; rediscover the circuit") from None
    if not isinstance(meta, dict):
        raise CNAError(f"circuit file {path!r} has metadata of type {type(meta).__name__}, expected an object")
    required = set(INDEX_FIELDS) | set(PER_NEURON)
    missing, extra = sorted(required - set(names)), sorted(set(names) - required - set(OPTIONAL_FIELDS))
    if missing or extra:
        raise CNAError(f"circuit file {path!r} is damaged: missing tensors {missing or 'none'}, unexpected tensors "
                       f"{extra or 'none'}")
    return meta


def check_circuit(circuit) -> None:
    """Normalize a circuit's fields in place (int64 indices, float64 statistics, CPU) and check them."""
    if not isinstance(circuit.meta, dict):
        raise CNAError(f"circuit meta must be a dict, got {type(circuit.meta).__name__}")
    circuit.layers = index_tensor("layers", circuit.layers)
    circuit.neurons = index_tensor("neurons", circuit.neurons)
    size = circuit.layers.numel()
    if circuit.neurons.shape != (size,):
        raise CNAError(f"circuit has {size} layer entries but {circuit.neurons.numel()} neuron entries")
    if circuit.experts is not None:
        circuit.experts = _expert_tensor(circuit.experts)
        if circuit.experts.shape != (size,):
            raise CNAError(f"circuit has {size} layer entries but {circuit.experts.numel()} expert entries")
    for name in PER_NEURON:
        setattr(circuit, name, float_tensor(name, getattr(circuit, name), size))
    architecture = circuit.meta.get("architecture") or {}
    ordinary = ~circuit.routed
    check_neurons(circuit.layers[ordinary], circuit.neurons[ordinary], architecture)
    if circuit.routed.any():
        _check_routed_range(circuit, architecture)
        _check_routed_unique(circuit)
    check_scores(circuit)
    if (circuit.caa_layers is None) != (circuit.caa_directions is None):
        raise CNAError("caa_layers and caa_directions come together")
    if circuit.caa_layers is not None:
        circuit.caa_layers = index_tensor("caa_layers", circuit.caa_layers)
        circuit.caa_directions = check_caa(circuit.caa_layers, circuit.caa_directions, architecture)


def _expert_tensor(value: Any) -> torch.Tensor:
    """Expert indices: 1-D integers, -1 for an ordinary neuron, else 0..MAX_EXPERTS-1."""
    tensor = torch.as_tensor(value).detach().cpu()
    if tensor.numel() and (tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex()):
        raise CNAError(f"circuit field experts must hold integers, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise CNAError(f"circuit field experts must be one-dimensional, got shape {list(tensor.shape)}")
    tensor = tensor.to(torch.int64)
    if tensor.numel() and (int(tensor.min()) < -1 or int(tensor.max()) >= MAX_EXPERTS):
        bad = int(tensor.min()) if int(tensor.min()) < -1 else int(tensor.max())
        raise CNAError(f"circuit field experts holds expert {bad}: an expert index is -1 (an ordinary neuron) or "
                       f"0..{MAX_EXPERTS - 1}; the file is damaged")
    return tensor


def _check_routed_range(circuit, architecture: Mapping[str, Any]) -> None:
    """Routed neurons within the recorded experts (layers, expert count, expert width), or the global bounds."""
    experts = architecture.get("experts") if architecture else None
    routed = circuit.routed
    layers, expert_ids, neurons = circuit.layers[routed], circuit.experts[routed], circuit.neurons[routed]
    if experts is None:
        if int(layers.max()) >= MAX_LAYERS or int(neurons.max()) >= MAX_WIDTH:
            raise CNAError("circuit routed neuron index out of range: the file is damaged")
        return
    if not isinstance(experts, Mapping):
        raise CNAError(f"circuit architecture experts must be an object, got {type(experts).__name__}")
    count = _count(experts.get("num_experts"), "experts.num_experts", MAX_EXPERTS)
    width = _count(experts.get("width"), "experts.width", MAX_WIDTH)
    moe_layers = experts.get("layers")
    if not isinstance(moe_layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in moe_layers):
        raise CNAError(f"circuit architecture experts.layers must be a list of layer numbers, got {moe_layers!r}")
    for layer, expert, neuron in zip(layers.tolist(), expert_ids.tolist(), neurons.tolist()):
        if layer not in moe_layers or expert >= count or neuron >= width:
            raise CircuitMismatchError(
                f"circuit routed neuron (layer {layer}, expert {expert}, index {neuron}) is out of range: the model "
                f"it was found on has MoE layers {moe_layers}, {count} experts x {width} neurons; the file is damaged")


def _check_routed_unique(circuit) -> None:
    """Each routed (layer, expert, neuron) once."""
    routed = circuit.routed
    triples = torch.stack([circuit.layers[routed], circuit.experts[routed], circuit.neurons[routed]], 1)
    if torch.unique(triples, dim=0).shape[0] != triples.shape[0]:
        raise CNAError("circuit lists a routed neuron (layer, expert, index) more than once: each neuron may appear "
                       "once")
