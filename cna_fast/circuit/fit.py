"""Does a circuit fit a model? Shapes and widths (an error), weights (a warning), the model it was found on.

Also the random control circuit of the same shape, which needs the recorded architecture too.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .._io import printable
from ..errors import CircuitMismatchError, CircuitWeightsWarning, CNAError
from ..models import DEFAULT_MODEL_NAME, get_adapter
from ..models.content import weights_differ


def check_model(circuit, model) -> None:
    """Raise CircuitMismatchError unless the circuit fits `model`'s layers and widths."""
    check_fits(circuit, get_adapter(model).architecture())


def check_fits(circuit, architecture: dict[str, Any]) -> None:
    """Raise CircuitMismatchError unless the circuit fits a model of `architecture` (adapter.architecture())."""
    mine = circuit.architecture
    num_layers = int(architecture["num_layers"])
    widths = architecture["d_ff"] if isinstance(architecture["d_ff"], list) else [architecture["d_ff"]] * num_layers
    if mine and (mine.get("num_layers") != num_layers or mine.get("d_ff") != architecture["d_ff"]
                 or mine.get("model_type") != architecture.get("model_type")):
        raise CircuitMismatchError(
            f"circuit was found on a model with {mine.get('num_layers')} layers x {mine.get('d_ff')} neurons "
            f"({mine.get('model_type')}), but this model has {num_layers} layers x {architecture['d_ff']} "
            f"neurons ({architecture.get('model_type')}): discover a circuit on this model"
        )
    if circuit.routed.any():
        _check_experts_fit(circuit, architecture)
    ordinary = ~circuit.routed
    for layer, neuron in zip(circuit.layers[ordinary].tolist(), circuit.neurons[ordinary].tolist()):
        if not 0 <= layer < num_layers or not 0 <= neuron < widths[layer]:
            raise CircuitMismatchError(
                f"circuit neuron (layer {layer}, index {neuron}) does not exist in this model "
                f"({num_layers} layers x {architecture['d_ff']} neurons)"
            )
    _check_content(circuit, architecture)


def check_found_on(circuit, requested: str | None, where: str) -> str | None:
    """Before any model loads: the default model (`requested` None) is refused for a circuit found on another
    model; a note when the requested model is not the one the circuit names."""
    found_on = circuit.meta.get("model")
    if not found_on:
        return None
    if requested is None and found_on != DEFAULT_MODEL_NAME:
        raise CNAError(f"{where} was found on model {found_on!r}, not on the default {DEFAULT_MODEL_NAME}: "
                       f"pass --model {found_on}")
    if requested is not None and str(requested) != found_on:
        return f"{where} was found on model {found_on!r}; applying it to {str(requested)!r}"
    return None


def random_like(circuit, seed: int = 0):
    """As many neurons per layer (and expert) as `circuit`, drawn at random among the others; no statistics."""
    architecture = circuit.architecture
    d_ff = architecture.get("d_ff")
    if d_ff is None:
        raise CNAError("a random control circuit needs the circuit's recorded architecture (made by discover)")
    groups = [(layer, -1, members, d_ff[layer] if isinstance(d_ff, list) else d_ff)
              for layer, members in circuit.by_layer().items()]
    groups += [(layer, expert, members, architecture["experts"]["width"])
               for (layer, expert), members in circuit.by_expert().items()]
    generator = torch.Generator().manual_seed(seed)
    layers, experts, neurons = [], [], []
    for layer, expert, members, width in groups:
        candidates = torch.ones(width, dtype=torch.bool)
        candidates[members] = False
        pool = candidates.nonzero().flatten()
        chosen = pool[torch.randperm(pool.numel(), generator=generator)[:members.numel()]]
        layers += [layer] * members.numel()
        experts += [expert] * members.numel()
        neurons += chosen.tolist()
    nan = torch.full((len(layers),), float("nan"))
    meta = {**circuit.meta, "random_control": {"seed": seed}}
    return type(circuit)(layers=layers, neurons=neurons, scores=nan, deltas=nan, mean_positive=nan,
                         mean_negative=nan, std_positive=nan, std_negative=nan, meta=meta,
                         experts=experts if circuit.experts is not None else None)


def _check_experts_fit(circuit, architecture: dict[str, Any]) -> None:
    """Raise CircuitMismatchError unless every routed neuron exists in a model of `architecture`."""
    mine, theirs = circuit.architecture.get("experts"), architecture.get("experts")
    if theirs is None:
        raise CircuitMismatchError("this circuit has routed-expert neurons, but the model has no mixture-of-experts "
                                   "layers: discover a circuit on this model")
    if mine is not None and (mine.get("num_experts"), mine.get("width")) != (theirs["num_experts"], theirs["width"]):
        raise CircuitMismatchError(
            f"circuit was found on a model with {mine.get('num_experts')} experts x {mine.get('width')} neurons, but "
            f"this model has {theirs['num_experts']} experts x {theirs['width']} neurons: discover a circuit on this "
            "model")
    routed = circuit.routed
    for layer, expert, neuron in zip(circuit.layers[routed].tolist(), circuit.experts[routed].tolist(),
                                     circuit.neurons[routed].tolist()):
        if (layer not in theirs["layers"] or not 0 <= expert < theirs["num_experts"]
                or not 0 <= neuron < theirs["width"]):
            raise CircuitMismatchError(
                f"circuit neuron (layer {layer}, expert {expert}, index {neuron}) does not exist in this model "
                f"(MoE layers {theirs['layers']}, {theirs['num_experts']} experts x {theirs['width']} neurons)")


def _check_content(circuit, architecture: dict[str, Any]) -> None:
    """CAA width against the model's hidden size; a warning when the weights differ although the shapes match."""
    d_model = architecture.get("d_model")
    if d_model is not None and circuit.caa_directions is not None and circuit.caa_directions.shape[1] != d_model:
        raise CircuitMismatchError(f"the circuit's CAA directions are {circuit.caa_directions.shape[1]} wide but this "
                                   f"model's hidden size is {d_model}: discover a circuit on this model")
    if weights_differ(circuit.architecture.get("weights"), architecture.get("weights")):
        warnings.warn(f"this circuit was discovered on {printable(circuit.meta.get('model', 'another model'))}, whose "
                      "down-projection weights differ from this model's although the shapes match (base vs "
                      "instruct, or another fine-tune?): its neurons may mean something else here; rediscover "
                      "on this model to be sure", CircuitWeightsWarning, stacklevel=5)
