"""A circuit's file formats: safetensors (the circuit file), JSON and CSV views, and the readable summary."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._io import atomic_path, csv_text, printable, write_text_atomic
from ..errors import CNAError
from ..paths import require_file
from .checks import INDEX_FIELDS, PER_NEURON, parse_header

FORMAT = "cna_fast.circuit/1"


def save(circuit, path: str | os.PathLike) -> None:
    """Write as safetensors (tensors + JSON metadata), atomically."""
    tensors = {name: getattr(circuit, name).contiguous() for name in (*INDEX_FIELDS, *PER_NEURON)}
    if circuit.experts is not None:
        tensors["experts"] = circuit.experts.contiguous()
    if circuit.caa_layers is not None:
        tensors.update(caa_layers=circuit.caa_layers.contiguous(), caa_directions=circuit.caa_directions.contiguous())
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(circuit.meta, sort_keys=True)})


def load(cls, path: str | os.PathLike):
    """Read a circuit of class `cls` written by `save`; damaged or crafted files are a CNAError."""
    require_file(path, "circuit file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            meta = parse_header(header, list(handle.keys()), str(path), FORMAT)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except CNAError:
        raise
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise CNAError(f"cannot read circuit file {str(path)!r}: {error}") from error
    try:
        return cls(meta=meta, **tensors)
    except CNAError as error:
        raise CNAError(f"circuit file {str(path)!r} is invalid: {error}") from None


def records(circuit) -> list[dict[str, Any]]:
    """One dict per neuron, in rank order (non-finite statistics as None)."""
    columns = {name: getattr(circuit, name).tolist() for name in PER_NEURON}
    experts = circuit.experts.tolist() if circuit.experts is not None else None
    return [
        {"rank": i + 1, "layer": layer, **({"expert": experts[i]} if experts is not None else {}), "neuron": neuron,
         **{name: _finite_or_none(columns[name][i]) for name in PER_NEURON}}
        for i, (layer, neuron) in enumerate(zip(circuit.layers.tolist(), circuit.neurons.tolist()))
    ]


def to_json(circuit, path: str | os.PathLike | None = None) -> str:
    """Metadata and neurons as JSON text; also written to `path` if given."""
    text = json.dumps({"meta": circuit.meta, "neurons": records(circuit)}, indent=2, sort_keys=False)
    if path is not None:
        write_text_atomic(path, text + "\n")
    return text


def to_csv(circuit, path: str | os.PathLike | None = None) -> str:
    """One row per neuron as CSV text; also written to `path` if given."""
    expert = ["expert"] if circuit.experts is not None else []
    text = csv_text(records(circuit), ["rank", "layer", *expert, "neuron", *PER_NEURON])
    if path is not None:
        write_text_atomic(path, text)
    return text


def summary(circuit, top: int = 10) -> str:
    """A human-readable report: provenance, neurons per layer, the top neurons, the routing frequencies."""
    meta, architecture = circuit.meta, circuit.architecture
    model = (f"circuit: {len(circuit)} neurons of {meta.get('model', '?')} "
             f"({architecture.get('model_type', '?')}, {architecture.get('num_layers', '?')} layers x "
             f"{architecture.get('d_ff', '?')} neurons)")
    settings = (f"score: {meta.get('score', '?')}   reduction: {meta.get('reduction', '?')}   "
                f"prompts: {meta.get('n_positive', '?')} positive / {meta.get('n_negative', '?')} negative   "
                f"excluded layers: {meta.get('exclude_layers') or 'none'}   "
                f"universal neurons removed: {meta.get('universal_removed', 0)}")
    lines = [printable(model), printable(settings), "", "neurons per layer:"]  # meta comes from a file: escaped
    counts = circuit.layer_counts()
    widest = max(counts, default=0) or 1
    for layer, count in enumerate(counts):
        if count:
            lines.append(f"  layer {layer:3d} {count:4d} {'#' * max(1, round(30 * count / widest))}")
    expert_header = f" {'expert':>6}" if circuit.experts is not None else ""
    lines += ["", f"top {min(top, len(circuit))} neurons (of {len(circuit)}):",
              f"  {'rank':>4} {'layer':>5}{expert_header} {'neuron':>6} {'score':>10} {'delta':>10} {'mean+':>10} "
              f"{'mean-':>10}"]
    for record in records(circuit)[:top]:
        values = " ".join(_number(record[name]) for name in ("scores", "deltas", "mean_positive", "mean_negative"))
        expert = "" if "expert" not in record else f" {record['expert'] if record['expert'] >= 0 else '-':>6}"
        lines.append(f"  {record['rank']:4d} {record['layer']:5d}{expert} {record['neuron']:6d} {values}")
    return "\n".join(lines + routing_lines(meta.get("routing"), top))


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


def _number(value: float | None) -> str:
    return f"{value:10.4f}" if value is not None else f"{'nan':>10}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
