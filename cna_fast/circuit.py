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

from ._io import atomic_path, write_text_atomic
from .errors import CircuitMismatchError, CNAError

_FORMAT = "cna_fast.circuit/1"
_PER_NEURON = ("scores", "deltas", "mean_positive", "mean_negative", "std_positive", "std_negative")


# Longer than 150 lines: one value type with its validation, file formats (safetensors, JSON, CSV)
# and checks against a model, which all read the same fields.
@dataclass
class Circuit:
    """Neurons `(layers[i], neurons[i])`, ranked by |score|, with per-neuron statistics.

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

    def __post_init__(self) -> None:
        self.layers = torch.as_tensor(self.layers, dtype=torch.int64).cpu()
        self.neurons = torch.as_tensor(self.neurons, dtype=torch.int64).cpu()
        size = self.layers.numel()
        for name in _PER_NEURON:
            value = torch.as_tensor(getattr(self, name), dtype=torch.float64).cpu()
            if value.shape != (size,):
                raise CNAError(f"circuit field {name} has shape {list(value.shape)}, expected [{size}]")
            setattr(self, name, value)
        if self.neurons.shape != (size,):
            raise CNAError(f"circuit has {size} layer entries but {self.neurons.numel()} neuron entries")
        if (self.caa_layers is None) != (self.caa_directions is None):
            raise CNAError("caa_layers and caa_directions come together")
        if self.caa_layers is not None:
            self.caa_layers = torch.as_tensor(self.caa_layers, dtype=torch.int64).cpu()
            self.caa_directions = torch.as_tensor(self.caa_directions, dtype=torch.float32).cpu()
            if self.caa_directions.dim() != 2 or self.caa_directions.shape[0] != self.caa_layers.numel():
                raise CNAError(f"caa_directions must be [{self.caa_layers.numel()}, d_model], "
                               f"got {list(self.caa_directions.shape)}")

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

    def by_layer(self) -> dict[int, torch.Tensor]:
        """Sorted neuron indices of each layer that has any."""
        return {int(layer): torch.sort(self.neurons[self.layers == layer]).values
                for layer in torch.unique(self.layers).tolist()}

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
        for layer, neuron in zip(self.layers.tolist(), self.neurons.tolist()):
            if not 0 <= layer < num_layers or not 0 <= neuron < widths[layer]:
                raise CircuitMismatchError(
                    f"circuit neuron (layer {layer}, index {neuron}) does not exist in this model "
                    f"({num_layers} layers x {architecture['d_ff']} neurons)"
                )

    def layer_counts(self) -> list[int]:
        """Number of circuit neurons in each layer of the model (index = layer)."""
        num_layers = int(self.architecture.get("num_layers", int(self.layers.max()) + 1 if len(self) else 0))
        return torch.bincount(self.layers, minlength=num_layers).tolist()

    def summary(self, top: int = 10) -> str:
        """A human-readable report: provenance, neurons per layer, the top neurons."""
        meta, architecture = self.meta, self.architecture
        lines = [
            f"circuit: {len(self)} neurons of {meta.get('model', '?')} "
            f"({architecture.get('model_type', '?')}, {architecture.get('num_layers', '?')} layers x "
            f"{architecture.get('d_ff', '?')} neurons)",
            f"score: {meta.get('score', '?')}   position: {meta.get('position', '?')}   "
            f"prompts: {meta.get('n_positive', '?')} positive / {meta.get('n_negative', '?')} negative   "
            f"excluded layers: {meta.get('exclude_layers') or 'none'}   "
            f"universal neurons removed: {meta.get('universal_removed', 0)}",
            "",
            "neurons per layer:",
        ]
        counts = self.layer_counts()
        widest = max(counts, default=0) or 1
        for layer, count in enumerate(counts):
            if count:
                lines.append(f"  layer {layer:3d} {count:4d} {'#' * max(1, round(30 * count / widest))}")
        lines += ["", f"top {min(top, len(self))} neurons (of {len(self)}):",
                  f"  {'rank':>4} {'layer':>5} {'neuron':>6} {'score':>10} {'delta':>10} {'mean+':>10} {'mean-':>10}"]
        for record in self.records()[:top]:
            values = " ".join(_number(record[name]) for name in ("scores", "deltas", "mean_positive", "mean_negative"))
            lines.append(f"  {record['rank']:4d} {record['layer']:5d} {record['neuron']:6d} {values}")
        return "\n".join(lines)

    def random_like(self, seed: int = 0) -> "Circuit":
        """A control circuit: as many neurons in each layer as this one, drawn at random among the others."""
        width = self.architecture.get("d_ff")
        if not isinstance(width, int):
            raise CNAError("a random control circuit needs the circuit's recorded architecture (uniform d_ff)")
        generator = torch.Generator().manual_seed(seed)
        layers, neurons = [], []
        for layer, members in self.by_layer().items():
            candidates = torch.ones(width, dtype=torch.bool)
            candidates[members] = False
            pool = candidates.nonzero().flatten()
            chosen = pool[torch.randperm(pool.numel(), generator=generator)[:members.numel()]]
            layers += [layer] * members.numel()
            neurons += chosen.tolist()
        nan = torch.full((len(layers),), float("nan"))
        meta = {**self.meta, "random_control": {"seed": seed}}
        return Circuit(layers=layers, neurons=neurons, scores=nan, deltas=nan, mean_positive=nan, mean_negative=nan,
                       std_positive=nan, std_negative=nan, meta=meta)

    def records(self) -> list[dict[str, Any]]:
        """One dict per neuron, in rank order."""
        columns = {name: getattr(self, name).tolist() for name in _PER_NEURON}
        return [
            {"rank": i + 1, "layer": layer, "neuron": neuron,
             **{name: _finite_or_none(columns[name][i]) for name in _PER_NEURON}}
            for i, (layer, neuron) in enumerate(zip(self.layers.tolist(), self.neurons.tolist()))
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors (tensors + JSON metadata), atomically."""
        tensors = {"layers": self.layers.contiguous(), "neurons": self.neurons.contiguous()}
        tensors.update({name: getattr(self, name).contiguous() for name in _PER_NEURON})
        if self.caa_layers is not None:
            tensors.update(caa_layers=self.caa_layers.contiguous(), caa_directions=self.caa_directions.contiguous())
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT, "meta": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        """Read a circuit written by `save`."""
        if not os.path.isfile(path):
            raise CNAError(f"circuit file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise CNAError(f"cannot read circuit file {str(path)!r}: {error}") from error
        if header.get("format") != _FORMAT:
            raise CNAError(f"{str(path)!r} is not a cna_fast circuit file (no {_FORMAT} header)")
        return cls(meta=json.loads(header.get("meta", "{}")), **tensors)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Metadata and neurons as JSON text; also written to `path` if given."""
        text = json.dumps({"meta": self.meta, "neurons": self.records()}, indent=2, sort_keys=False)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per neuron as CSV text; also written to `path` if given."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["rank", "layer", "neuron", *_PER_NEURON], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records())
        text = buffer.getvalue()
        if path is not None:
            write_text_atomic(path, text)
        return text


def _number(value: float | None) -> str:
    return f"{value:10.4f}" if value is not None else f"{'nan':>10}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
