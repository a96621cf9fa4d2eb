"""The Circuit: the selected neurons, their scores and statistics, and where they came from."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import validation
from ._io import atomic_path, write_text_atomic
from .errors import CircuitMismatchError, CNAError, CircuitWeightsWarning
from .models.content import weights_differ
from .validation import printable

_FORMAT = "cna_fast.circuit/1"
_PER_NEURON = validation.PER_NEURON


# Longer than 150 lines: one value type with its validation, file formats (safetensors, JSON, CSV)
# and checks against a model, which all read the same fields.
@dataclass
class Circuit:
    """Neurons `(layers[i], neurons[i])`, ranked by |score|, with per-neuron statistics.

    experts: on mixture-of-experts models, the routed expert of each neuron, or -1 for an
    ordinary neuron (dense layer or shared expert); None for circuits of dense models.
    deltas: mean(positive) - mean(negative); scores: the ranking score (delta, Welch t or Cohen's d).
    meta: model name, architecture fingerprint, scoring settings, prompt counts.
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
        if not isinstance(self.meta, dict):
            raise CNAError(f"circuit meta must be a dict, got {type(self.meta).__name__}")
        self.layers = validation.index_tensor("layers", self.layers)
        self.neurons = validation.index_tensor("neurons", self.neurons)
        size = self.layers.numel()
        if self.neurons.shape != (size,):
            raise CNAError(f"circuit has {size} layer entries but {self.neurons.numel()} neuron entries")
        if self.experts is not None:
            self.experts = torch.as_tensor(self.experts, dtype=torch.int64).cpu()
            if self.experts.shape != (size,):
                raise CNAError(f"circuit has {size} layer entries but {self.experts.numel()} expert entries")
        for name in _PER_NEURON:
            setattr(self, name, validation.float_tensor(name, getattr(self, name), size))
        fingerprint = self.meta.get("fingerprint") or {}
        ordinary = ~self.routed
        validation.check_neurons(self.layers[ordinary], self.neurons[ordinary], fingerprint)
        if self.routed.any():
            _check_routed_unique(self)
        validation.check_scores(self)
        if (self.caa_layers is None) != (self.caa_directions is None):
            raise CNAError("caa_layers and caa_directions come together")
        if self.caa_layers is not None:
            self.caa_layers = validation.index_tensor("caa_layers", self.caa_layers)
            self.caa_directions = validation.check_caa(self.caa_layers, self.caa_directions, fingerprint)

    def __len__(self) -> int:
        return self.layers.numel()

    @property
    def architecture(self) -> dict[str, Any]:
        """The architecture of the model the circuit was found on (model type, layers, widths), if recorded."""
        return dict(self.meta.get("fingerprint", {}))

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Deprecated name of `architecture`."""
        warnings.warn("Circuit.fingerprint is deprecated: use Circuit.architecture", DeprecationWarning, stacklevel=2)
        return self.architecture

    @property
    def routed(self) -> torch.Tensor:
        """Bool mask of the neurons that belong to a routed expert (all False for dense circuits)."""
        return self.experts >= 0 if self.experts is not None else torch.zeros(len(self), dtype=torch.bool)

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

    def validate(self, model) -> None:
        """Raise CircuitMismatchError unless this circuit fits `model`'s layers and widths."""
        from .models import get_adapter

        self.check_fits(get_adapter(model).architecture())

    def check_fits(self, architecture: dict[str, Any]) -> None:
        """Raise CircuitMismatchError unless this circuit fits a model of `architecture` (adapter.architecture())."""
        mine = self.architecture
        num_layers = int(architecture["num_layers"])
        widths = architecture["d_ff"] if isinstance(architecture["d_ff"], list) else [architecture["d_ff"]] * num_layers
        if mine and (mine.get("num_layers") != num_layers or mine.get("d_ff") != architecture["d_ff"]
                     or mine.get("model_type") != architecture.get("model_type")):
            raise CircuitMismatchError(
                f"circuit was found on a model with {mine.get('num_layers')} layers x {mine.get('d_ff')} neurons "
                f"({mine.get('model_type')}), but this model has {num_layers} layers x {architecture['d_ff']} "
                f"neurons ({architecture.get('model_type')}): discover a circuit on this model"
            )
        if self.routed.any():
            _check_experts_fit(self, architecture)
        ordinary = ~self.routed
        for layer, neuron in zip(self.layers[ordinary].tolist(), self.neurons[ordinary].tolist()):
            if not 0 <= layer < num_layers or not 0 <= neuron < widths[layer]:
                raise CircuitMismatchError(
                    f"circuit neuron (layer {layer}, index {neuron}) does not exist in this model "
                    f"({num_layers} layers x {architecture['d_ff']} neurons)"
                )
        _check_content(self, architecture)

    def layer_counts(self) -> list[int]:
        """Number of circuit neurons in each layer of the model (index = layer)."""
        num_layers = int(self.architecture.get("num_layers", int(self.layers.max()) + 1 if len(self) else 0))
        return torch.bincount(self.layers, minlength=num_layers).tolist()

    def summary(self, top: int = 10) -> str:
        """A human-readable report: provenance, neurons per layer, the top neurons."""
        meta, architecture = self.meta, self.architecture
        model = (f"circuit: {len(self)} neurons of {meta.get('model', '?')} "
                 f"({architecture.get('model_type', '?')}, {architecture.get('num_layers', '?')} layers x "
                 f"{architecture.get('d_ff', '?')} neurons)")
        settings = (f"score: {meta.get('score', '?')}   position: {meta.get('position', '?')}   "
                    f"prompts: {meta.get('n_positive', '?')} positive / {meta.get('n_negative', '?')} negative   "
                    f"excluded layers: {meta.get('exclude_layers') or 'none'}   "
                    f"universal neurons removed: {meta.get('universal_removed', 0)}")
        lines = [printable(model), printable(settings)]  # meta comes from a file: no terminal escapes
        lines += [
            "",
            "neurons per layer:",
        ]
        counts = self.layer_counts()
        widest = max(counts, default=0) or 1
        for layer, count in enumerate(counts):
            if count:
                lines.append(f"  layer {layer:3d} {count:4d} {'#' * max(1, round(30 * count / widest))}")
        expert_header = f" {'expert':>6}" if self.experts is not None else ""
        lines += ["", f"top {min(top, len(self))} neurons (of {len(self)}):",
                  f"  {'rank':>4} {'layer':>5}{expert_header} {'neuron':>6} {'score':>10} {'delta':>10} {'mean+':>10} "
                  f"{'mean-':>10}"]
        for record in self.records()[:top]:
            values = " ".join(_number(record[name]) for name in ("scores", "deltas", "mean_positive", "mean_negative"))
            expert = "" if "expert" not in record else f" {record['expert'] if record['expert'] >= 0 else '-':>6}"
            lines.append(f"  {record['rank']:4d} {record['layer']:5d}{expert} {record['neuron']:6d} {values}")
        return "\n".join(lines + routing_lines(self.meta.get("routing"), top))

    def random_like(self, seed: int = 0) -> "Circuit":
        """A control circuit: as many neurons per layer (and expert) as this one, drawn at random among the others."""
        d_ff = self.architecture.get("d_ff")
        if d_ff is None:
            raise CNAError("a random control circuit needs the circuit's recorded architecture (made by discover)")
        groups = [(layer, -1, members, d_ff[layer] if isinstance(d_ff, list) else d_ff)
                  for layer, members in self.by_layer().items()]
        groups += [(layer, expert, members, self.architecture["experts"]["width"])
                   for (layer, expert), members in self.by_expert().items()]
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
        meta = {**self.meta, "random_control": {"seed": seed}}
        return Circuit(layers=layers, neurons=neurons, scores=nan, deltas=nan, mean_positive=nan, mean_negative=nan,
                       std_positive=nan, std_negative=nan, meta=meta,
                       experts=experts if self.experts is not None else None)

    def records(self) -> list[dict[str, Any]]:
        """One dict per neuron, in rank order."""
        columns = {name: getattr(self, name).tolist() for name in _PER_NEURON}
        experts = self.experts.tolist() if self.experts is not None else None
        return [
            {"rank": i + 1, "layer": layer, **({"expert": experts[i]} if experts is not None else {}), "neuron": neuron,
             **{name: _finite_or_none(columns[name][i]) for name in _PER_NEURON}}
            for i, (layer, neuron) in enumerate(zip(self.layers.tolist(), self.neurons.tolist()))
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors (tensors + JSON metadata), atomically."""
        tensors = {"layers": self.layers.contiguous(), "neurons": self.neurons.contiguous()}
        tensors.update({name: getattr(self, name).contiguous() for name in _PER_NEURON})
        if self.experts is not None:
            tensors["experts"] = self.experts.contiguous()
        if self.caa_layers is not None:
            tensors.update(caa_layers=self.caa_layers.contiguous(), caa_directions=self.caa_directions.contiguous())
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "meta": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        """Read a circuit written by `save`."""
        from .paths import require_file

        require_file(path, "circuit file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                meta = validation.parse_header(header, list(handle.keys()), str(path), _FORMAT)
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except CNAError:
            raise
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise CNAError(f"cannot read circuit file {str(path)!r}: {error}") from error
        try:
            return cls(meta=meta, **tensors)
        except CNAError as error:
            raise CNAError(f"circuit file {str(path)!r} is invalid: {error}") from None

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Metadata and neurons as JSON text; also written to `path` if given."""
        text = json.dumps({"meta": self.meta, "neurons": self.records()}, indent=2, sort_keys=False)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per neuron as CSV text; also written to `path` if given."""
        buffer = io.StringIO()
        expert = ["expert"] if self.experts is not None else []
        writer = csv.DictWriter(buffer, fieldnames=["rank", "layer", *expert, "neuron", *_PER_NEURON],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records())
        text = buffer.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text


def routing_lines(routing: dict[str, Any] | None, top: int) -> list[str]:
    """The experts whose routing frequency differs most between the sides, as report lines."""
    if not routing:
        return []
    positive, negative = torch.tensor(routing["positive"]), torch.tensor(routing["negative"])  # [layers, experts]
    gap = (positive - negative).abs().flatten()
    order = torch.sort(gap, descending=True, stable=True).indices[:top]
    experts = positive.shape[1]
    lines = ["", f"routing frequency per {routing.get('unit', 'sample')} (experts that differ most between the sides):",
             f"  {'layer':>5} {'expert':>6} {'positive':>9} {'negative':>9}"]
    for flat in order.tolist():
        row, expert = divmod(flat, experts)
        lines.append(f"  {routing['layers'][row]:5d} {expert:6d} {100 * positive[row, expert]:8.1f}% "
                     f"{100 * negative[row, expert]:8.1f}%")
    return lines


def _check_routed_unique(circuit: Circuit) -> None:
    """Each routed (layer, expert, neuron) once."""
    routed = circuit.routed
    triples = torch.stack([circuit.layers[routed], circuit.experts[routed], circuit.neurons[routed]], 1)
    if torch.unique(triples, dim=0).shape[0] != triples.shape[0]:
        raise CNAError("circuit lists a routed neuron (layer, expert, index) more than once: each neuron may appear "
                       "once")


def _check_experts_fit(circuit: Circuit, architecture: dict[str, Any]) -> None:
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


def _check_content(circuit: Circuit, fingerprint: dict[str, Any]) -> None:
    """CAA width against the model's hidden size; a warning when the weights differ although the shapes match."""
    d_model = fingerprint.get("d_model")
    if d_model is not None and circuit.caa_directions is not None and circuit.caa_directions.shape[1] != d_model:
        raise CircuitMismatchError(f"the circuit's CAA directions are {circuit.caa_directions.shape[1]} wide but this "
                                   f"model's hidden size is {d_model}: discover a circuit on this model")
    if weights_differ(circuit.architecture.get("weights"), fingerprint.get("weights")):
        warnings.warn(f"this circuit was discovered on {printable(circuit.meta.get('model', 'another model'))}, whose "
                      "down-projection weights differ from this model's although the shapes match (base vs "
                      "instruct, or another fine-tune?): its neurons may mean something else here; rediscover "
                      "on this model to be sure", CircuitWeightsWarning, stacklevel=4)


def _number(value: float | None) -> str:
    return f"{value:10.4f}" if value is not None else f"{'nan':>10}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
