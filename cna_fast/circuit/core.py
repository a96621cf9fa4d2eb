"""The Circuit: the selected neurons, their scores and statistics, and where they came from.

The class holds the fields and the views every stage reads (per layer, per expert, the neuron
keys, subsets and unions); its checks (`checks`), file formats (`files`) and model checks (`fit`)
live beside it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CNAError
from . import checks, files, fit

COLUMNS = (*checks.INDEX_FIELDS, *checks.PER_NEURON)  # one value per neuron (besides `experts`)


def as_multiplier(value: object) -> float:
    """One finite multiplier as a float (ints, floats, numpy scalars and 0-dim tensors accepted)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CNAError(f"multiplier must be a number, got {value!r}; for several values use multipliers=") from None
    if not math.isfinite(number):
        raise CNAError(f"multiplier must be a finite number, got {value!r}")
    return number


@dataclass
class Circuit:
    """Neurons `(layers[i], neurons[i])`, ranked by |score|, with per-neuron statistics.

    experts: on mixture-of-experts models, the routed expert of each neuron, or -1 for an
    ordinary neuron (dense layer or shared expert); None for circuits of dense models.
    deltas: mean(positive) - mean(negative); scores: the ranking score (delta, Welch t or Cohen's d).
    meta: model name, its architecture, scoring settings, prompt counts (and, from `cna tune`, the multiplier).
    """

    layers: torch.Tensor
    neurons: torch.Tensor
    scores: torch.Tensor
    deltas: torch.Tensor
    mean_positive: torch.Tensor
    mean_negative: torch.Tensor
    std_positive: torch.Tensor
    std_negative: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    caa_layers: torch.Tensor | None = None
    caa_directions: torch.Tensor | None = None
    experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        checks.check_circuit(self)

    def __len__(self) -> int:
        return self.layers.numel()

    @property
    def architecture(self) -> dict[str, Any]:
        """The architecture of the model the circuit was found on (model type, layers, widths), if recorded."""
        return dict(self.meta.get("architecture", {}))

    @property
    def routed(self) -> torch.Tensor:
        """Bool mask of the neurons that belong to a routed expert (all False for dense circuits)."""
        return self.experts >= 0 if self.experts is not None else torch.zeros(len(self), dtype=torch.bool)

    def keys(self) -> list[tuple[int, int, int]]:
        """(layer, expert, neuron) of every neuron in rank order; expert -1 for ordinary neurons."""
        experts = self.experts.tolist() if self.experts is not None else [-1] * len(self)
        return list(zip(self.layers.tolist(), experts, self.neurons.tolist()))

    def by_layer(self) -> dict[int, torch.Tensor]:
        """Sorted indices of the ordinary (not routed-expert) neurons of each layer that has any."""
        ordinary = ~self.routed
        layers, neurons = self.layers[ordinary], self.neurons[ordinary]
        return {int(layer): torch.sort(neurons[layers == layer]).values for layer in torch.unique(layers).tolist()}

    def by_expert(self) -> dict[tuple[int, int], torch.Tensor]:
        """Sorted neuron indices of each (layer, expert) that has routed circuit neurons."""
        routed = self.routed
        pairs = torch.stack([self.layers[routed], self.experts[routed]], 1) if routed.any() else torch.empty(0, 2)
        return {(int(layer), int(expert)): torch.sort(self.neurons[routed & (self.layers == layer)
                                                                   & (self.experts == expert)]).values
                for layer, expert in torch.unique(pairs.long(), dim=0).tolist()}

    def select(self, index: Sequence[int] | torch.Tensor, meta: dict | None = None) -> "Circuit":
        """The neurons at `index` (in that order) as a circuit of their own, without CAA directions."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return Circuit(meta=dict(self.meta if meta is None else meta),
                       experts=None if self.experts is None else self.experts[index],
                       **{name: getattr(self, name)[index] for name in COLUMNS})

    @classmethod
    def join(cls, parts: Sequence["Circuit"], meta: dict) -> "Circuit":
        """The neurons of every part, in order, as one circuit (its neurons must be distinct)."""
        experts = None
        if any(part.experts is not None for part in parts):
            experts = torch.cat([part.experts if part.experts is not None else torch.full_like(part.layers, -1)
                                 for part in parts])
        return cls(meta=meta, experts=experts, **{name: torch.cat([getattr(part, name) for part in parts])
                                                  for name in COLUMNS})

    def layer_counts(self) -> list[int]:
        """Number of circuit neurons in each layer of the model (index = layer)."""
        num_layers = int(self.architecture.get("num_layers", int(self.layers.max()) + 1 if len(self) else 0))
        return torch.bincount(self.layers, minlength=num_layers).tolist()

    def random_like(self, seed: int = 0) -> "Circuit":
        """A control circuit: as many neurons per layer (and expert) as this one, drawn at random among the others."""
        return fit.random_like(self, seed)

    def recorded_multiplier(self, given: float | None = None, fallback: float | None = None) -> float:
        """The multiplier to steer with: `given`, else the one recorded by `cna tune`, else `fallback`."""
        if given is not None:
            return as_multiplier(given)
        if self.meta.get("multiplier") is not None:
            return as_multiplier(self.meta["multiplier"])
        if fallback is None:
            raise CNAError("this circuit records no multiplier (it was not made by cna tune): give --multiplier")
        return fallback

    def validate(self, model) -> None:
        """Raise CircuitMismatchError unless this circuit fits `model`'s layers and widths."""
        fit.check_model(self, model)

    def check_fits(self, architecture: dict[str, Any]) -> None:
        """Raise CircuitMismatchError unless this circuit fits a model of `architecture` (adapter.architecture())."""
        fit.check_fits(self, architecture)

    def check_found_on(self, requested: str | None, where: str = "this circuit") -> str | None:
        """Before any model loads: refuse the default model for a circuit found on another; a note if they differ."""
        return fit.check_found_on(self, requested, where)

    def records(self) -> list[dict[str, Any]]:
        """One dict per neuron, in rank order."""
        return files.records(self)

    def summary(self, top: int = 10) -> str:
        """A human-readable report: provenance, neurons per layer, the top neurons."""
        return files.summary(self, top)

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors (tensors + JSON metadata), atomically."""
        files.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        """Read a circuit written by `save`."""
        return files.load(cls, path)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Metadata and neurons as JSON text; also written to `path` if given."""
        return files.to_json(self, path)

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per neuron as CSV text; also written to `path` if given."""
        return files.to_csv(self, path)
