"""Circuit: file format, JSON/CSV export, validation against models, atomic saving."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import cna_fast.circuit.files as circuit_module
from cna_fast import get_adapter
from cna_fast.attribution import attribute
from cna_fast.circuit import Circuit
from cna_fast.errors import CircuitMismatchError, CNAError
from cna_fast.stats import NEGATIVE, POSITIVE, NeuronStats
from tests.tiny import ARCH_CONFIGS

TENSOR_FIELDS = ("layers", "neurons", "scores", "deltas", "mean_positive", "mean_negative",
                 "std_positive", "std_negative")
WIDTH = 96  # tiny_llama's d_ff
N_LAYERS = 4


def contrast_stats(n_positive: int, n_negative: int, seed: int = 0) -> NeuronStats:
    """Stats for a 4 x 96 model from random rows; positive and negative sides have different means."""
    rng = np.random.default_rng(seed)
    pos = rng.normal(0.0, 1.0, size=(N_LAYERS, n_positive, WIDTH)) + rng.normal(0, 2, size=(N_LAYERS, 1, WIDTH))
    neg = rng.normal(0.0, 1.0, size=(N_LAYERS, n_negative, WIDTH))
    rows = torch.from_numpy(np.concatenate([pos, neg], axis=1))
    labels = torch.tensor([POSITIVE] * n_positive + [NEGATIVE] * n_negative)
    stats = NeuronStats(range(N_LAYERS), WIDTH)
    stats.update(rows, labels)
    return stats


def tiny_model(model_type: str, vocab_size: int, **overrides):
    """A random-weight tiny model like tests.tiny.build_tiny_model, with config overrides."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, pad_token_id=2,
                                  **{**ARCH_CONFIGS[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def hand_circuit(layers: list[int], neurons: list[int], meta: dict | None = None) -> Circuit:
    """A circuit with given neuron positions and dummy statistics."""
    n = len(layers)
    values = torch.arange(n, 0, -1, dtype=torch.float64)
    return Circuit(layers=layers, neurons=neurons, scores=values, deltas=values, mean_positive=values,
                   mean_negative=torch.zeros(n), std_positive=torch.ones(n), std_negative=torch.ones(n),
                   meta=meta or {})


@pytest.fixture
def circuit(tiny_llama) -> Circuit:
    """Top 12 neurons of hand-made stats, with the tiny Llama's architecture in meta."""
    meta = {"model": "tiny-llama", "architecture": get_adapter(tiny_llama).architecture(), "note": ["a", 1, 2.5]}
    return attribute(contrast_stats(9, 14), top_k=12, meta=meta)


@pytest.fixture
def nan_circuit() -> Circuit:
    """One positive prompt: every std_positive is NaN (ddof=1)."""
    return attribute(contrast_stats(1, 5, seed=3), top_k=7)


def test_save_load_round_trip(circuit: Circuit, tmp_path: Path) -> None:
    path = tmp_path / "circuit.safetensors"
    circuit.save(path)
    loaded = Circuit.load(path)
    assert len(loaded) == len(circuit) == 12
    for name in TENSOR_FIELDS:
        original, restored = getattr(circuit, name), getattr(loaded, name)
        assert restored.dtype == original.dtype and torch.equal(original, restored), name
    assert loaded.meta == circuit.meta
    assert loaded.meta["note"] == ["a", 1, 2.5] and loaded.architecture == circuit.architecture
    assert os.listdir(tmp_path) == ["circuit.safetensors"]


def test_round_trip_keeps_nan(nan_circuit: Circuit, tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    nan_circuit.save(path)
    loaded = Circuit.load(path)
    assert torch.isnan(loaded.std_positive).all()
    assert torch.equal(loaded.std_negative, nan_circuit.std_negative)


def test_to_json_lists_neurons_in_rank_order(nan_circuit: Circuit, tmp_path: Path) -> None:
    """Strict JSON (no NaN literal), ranks 1..n in circuit order, NaN std as null, finite values kept."""
    def reject(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    text = nan_circuit.to_json()
    data = json.loads(text, parse_constant=reject)
    assert data["meta"] == nan_circuit.meta
    records = data["neurons"]
    assert [r["rank"] for r in records] == list(range(1, len(nan_circuit) + 1))
    assert [(r["layer"], r["neuron"]) for r in records] == list(zip(nan_circuit.layers.tolist(),
                                                                    nan_circuit.neurons.tolist()))
    magnitudes = [abs(r["scores"]) for r in records]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert all(r["std_positive"] is None for r in records)
    assert [r["std_negative"] for r in records] == pytest.approx(nan_circuit.std_negative.tolist(), rel=1e-15)
    assert [r["deltas"] for r in records] == pytest.approx(nan_circuit.deltas.tolist(), rel=1e-15)
    path = tmp_path / "circuit.json"
    assert nan_circuit.to_json(path) == text
    assert path.read_text(encoding="utf-8") == text + "\n"


def test_to_csv_one_row_per_neuron(nan_circuit: Circuit, tmp_path: Path) -> None:
    text = nan_circuit.to_csv()
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == ["rank", "layer", "neuron", "scores", "deltas", "mean_positive", "mean_negative",
                                 "std_positive", "std_negative"]
    rows = list(reader)
    assert len(rows) == len(nan_circuit) == 7
    assert [int(r["rank"]) for r in rows] == list(range(1, 8))
    assert [(int(r["layer"]), int(r["neuron"])) for r in rows] == list(zip(nan_circuit.layers.tolist(),
                                                                           nan_circuit.neurons.tolist()))
    assert all(r["std_positive"] == "" for r in rows)
    assert [float(r["scores"]) for r in rows] == pytest.approx(nan_circuit.scores.tolist(), rel=1e-15)
    path = tmp_path / "circuit.csv"
    nan_circuit.to_csv(path)
    assert path.read_text(encoding="utf-8") == text
    assert len(text.splitlines()) == 8


def test_by_layer_groups_sorted_neurons() -> None:
    circuit = hand_circuit([2, 0, 2, 2], [50, 7, 3, 90])
    groups = circuit.by_layer()
    assert sorted(groups) == [0, 2]
    assert groups[0].tolist() == [7] and groups[2].tolist() == [3, 50, 90]


def test_validate_accepts_matching_model(circuit: Circuit, tiny_llama) -> None:
    circuit.validate(tiny_llama)
    circuit.check_fits({"model_type": "llama", "num_layers": 4, "d_ff": 96})


def test_validate_rejects_different_layer_count(circuit: Circuit, tokenizer) -> None:
    model = tiny_model("llama", len(tokenizer), num_hidden_layers=3)
    with pytest.raises(CircuitMismatchError):
        circuit.validate(model)
    with pytest.raises(CircuitMismatchError):
        circuit.check_fits({"model_type": "llama", "num_layers": 5, "d_ff": 96})


def test_validate_rejects_different_width(circuit: Circuit, tokenizer) -> None:
    gpt2 = tiny_model("gpt2", len(tokenizer), n_inner=128)
    assert get_adapter(gpt2).architecture()["num_layers"] == 4  # only the width differs
    with pytest.raises(CircuitMismatchError):
        circuit.validate(gpt2)
    with pytest.raises(CircuitMismatchError):
        circuit.check_fits({"model_type": "llama", "num_layers": 4, "d_ff": 64})


@pytest.mark.parametrize("layer, neuron", [(0, 96), (4, 0), (1, -1), (-1, 5)])
def test_neuron_out_of_range(tiny_llama, layer: int, neuron: int) -> None:
    """Indices outside 4 layers x 96 neurons are rejected: on construction when the circuit's own architecture (or
    the sign) rules them out, else when applied to the model."""
    architecture = get_adapter(tiny_llama).architecture()
    with pytest.raises(CNAError, match="out of range|negative"):
        hand_circuit([0, layer], [1, neuron], meta={"architecture": architecture})
    with pytest.raises(CircuitMismatchError if min(layer, neuron) >= 0 else CNAError):
        hand_circuit([0, layer], [1, neuron]).validate(tiny_llama)


def test_circuit_without_architecture_checks_indices(tokenizer) -> None:
    """No architecture: neuron 95 fits a 96-wide model but not a 64-wide one."""
    circuit = hand_circuit([3], [95])
    circuit.check_fits({"num_layers": 4, "d_ff": 96})
    narrow = tiny_model("llama", len(tokenizer), intermediate_size=64)
    with pytest.raises(CircuitMismatchError):
        circuit.validate(narrow)


def test_mismatched_field_lengths() -> None:
    with pytest.raises(CNAError):
        Circuit(layers=[0, 1], neurons=[0, 1], scores=[1.0], deltas=[1.0, 2.0], mean_positive=[0.0, 0.0],
                mean_negative=[0.0, 0.0], std_positive=[1.0, 1.0], std_negative=[1.0, 1.0])
    with pytest.raises(CNAError):
        Circuit(layers=[0, 1], neurons=[0], scores=[1.0, 2.0], deltas=[1.0, 2.0], mean_positive=[0.0, 0.0],
                mean_negative=[0.0, 0.0], std_positive=[1.0, 1.0], std_negative=[1.0, 1.0])


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CNAError):
        Circuit.load(tmp_path / "missing.safetensors")
    with pytest.raises(CNAError):
        Circuit.load(tmp_path)  # a folder is not a circuit file


def test_load_stats_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    contrast_stats(3, 3).save(path)
    with pytest.raises(CNAError, match="not a cna_fast circuit"):
        Circuit.load(path)


@pytest.mark.parametrize("content", [b"", bytes(range(7, 71)), b'{"json": "but not safetensors"}'],
                         ids=["empty", "binary", "text"])
def test_load_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(CNAError):
        Circuit.load(path)


def test_save_to_missing_folder(circuit: Circuit, tmp_path: Path) -> None:
    target = tmp_path / "absent" / "circuit.safetensors"
    with pytest.raises(CNAError):
        circuit.save(target)
    assert not target.exists() and not target.parent.exists()
    assert os.listdir(tmp_path) == []
    with pytest.raises(CNAError):
        circuit.to_json(target.with_suffix(".json"))
    with pytest.raises(CNAError):
        circuit.to_csv(target.with_suffix(".csv"))
    assert os.listdir(tmp_path) == []


def test_failed_save_leaves_no_temp_file(circuit: Circuit, tmp_path: Path) -> None:
    """Meta that is not JSON fails inside the atomic write: nothing is left in the folder."""
    circuit.meta["bad"] = object()
    with pytest.raises((TypeError, CNAError)):
        circuit.save(tmp_path / "circuit.safetensors")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_previous_file(circuit: Circuit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies halfway leaves the old file intact and no temporary file."""
    path = tmp_path / "circuit.safetensors"
    circuit.save(path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(circuit_module, "save_file", half_write)
    with pytest.raises(OSError):
        circuit.save(path)
    assert os.listdir(tmp_path) == ["circuit.safetensors"]
    assert path.read_bytes() == before
    assert math.isfinite(float(Circuit.load(path).scores[0]))
