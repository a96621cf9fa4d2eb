"""GGUF LoRA out (export_gguf_lora): the adapter llama.cpp applies per request, checked without llama.cpp.

The written tensors are read back with the `gguf` package and checked against the folded math: for
every lora scale s, W + s * (alpha / r) * B @ A (llama.cpp's update, llama-graph.cpp build_lora_mm)
equals W with the circuit's columns scaled by 1 + s (m - 1), W being the source GGUF's own ffn_down,
dequantized. tests/test_llama_server.py runs the same file in a real llama-server.
"""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from cna_fast import CNAError, load_model
from cna_fast.circuit import Circuit
from cna_fast.cli import main
from cna_fast.export.gguf_lora import (adapter_tensors_from_gguf, effective_multiplier, export_gguf_lora,
                                       lora_scale_for, read_provenance)
from tests.test_export import make_circuit
from tests.test_gguf import LAYERS, NEURONS, inputs, logits

SCALES = (0.0, 0.5, 1.0, 2.0)


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def gguf_file(tiny_gguf):
    return tiny_gguf[0]


def dequantized(tensor) -> np.ndarray:
    return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def applied(reader: GGUFReader, base: np.ndarray, name: str, scale: float) -> np.ndarray:
    """W + scale * alpha / rank * B @ A, as llama.cpp computes the update (rank = B's ne[0])."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    lora_a, lora_b = dequantized(tensors[f"{name}.lora_a"]), dequantized(tensors[f"{name}.lora_b"])
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    rank = lora_b.shape[-1]
    return base + np.float32(scale * alpha / rank) * (lora_b @ lora_a)


@pytest.mark.parametrize("multiplier", [0.0, 3.0])
def test_tensors_are_the_folded_math(gguf_file, tmp_path, multiplier):
    model, _ = load_model(gguf_file)
    circuit = make_circuit(model, LAYERS, NEURONS)
    out = export_gguf_lora(model, circuit, multiplier, tmp_path / "steer.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steer.gguf"]
    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    rank = max(LAYERS.count(layer) for layer in set(LAYERS))
    assert fields["adapter.lora.alpha"] == rank and fields["cna_fast.multiplier"] == multiplier
    source = {tensor.name: tensor for tensor in GGUFReader(gguf_file).tensors}
    names = sorted(tensor.name for tensor in reader.tensors)
    assert names == sorted(f"blk.{layer}.ffn_down.weight.lora_{part}" for layer in set(LAYERS) for part in "ab")
    for tensor in reader.tensors:
        assert tensor.tensor_type == GGMLQuantizationType.F32
    for layer in set(LAYERS):
        name = f"blk.{layer}.ffn_down.weight"
        base = dequantized(source[name])
        chosen = [n for lay, n in zip(LAYERS, NEURONS) if lay == layer]
        lora_a = dequantized({t.name: t for t in reader.tensors}[f"{name}.lora_a"])
        assert lora_a.shape == (rank, base.shape[1])  # every layer padded to one rank: alpha / r = 1 everywhere
        for scale in SCALES:
            folded = base.copy()
            folded[:, chosen] *= np.float32(effective_multiplier(multiplier, scale))
            np.testing.assert_allclose(applied(reader, base, name, scale), folded, rtol=0, atol=1e-5)


def test_adapter_applied_in_torch_steers_like_the_hooks(gguf_file, tmp_path, tokenizer):
    """The adapter added to the loaded model's down projections at scale 0.5 = hooks at 1 + 0.5 (m - 1)."""
    model, _ = load_model(gguf_file)
    circuit = make_circuit(model, LAYERS, NEURONS)
    reader = GGUFReader(export_gguf_lora(model, circuit, 0.0, tmp_path / "steer.gguf"))
    batch = inputs(tokenizer)
    expected = logits(model, batch, circuit, effective_multiplier(0.0, 0.5))
    unsteered = logits(model, batch)
    with torch.no_grad():
        for layer in set(LAYERS):
            down = model.model.layers[layer].mlp.down_proj
            weight = down.weight.detach().numpy()
            down.weight.copy_(torch.from_numpy(applied(reader, weight, f"blk.{layer}.ffn_down.weight", 0.5)))
    error = (logits(model, batch) - expected).abs().max()
    assert error < 1e-4 and (unsteered - expected).abs().max() > 100 * error


def test_overwrite_rules_and_cli(gguf_file, tmp_path, capsys):
    model, _ = load_model(gguf_file)
    circuit = make_circuit(model, LAYERS, NEURONS)
    for name in ("scores", "deltas", "mean_positive"):
        setattr(circuit, name, getattr(circuit, name).clone())
    circuit.save(tmp_path / "circuit.safetensors")
    out = tmp_path / "steer.gguf"
    command = ["export", "--model", str(gguf_file), "--circuit", str(tmp_path / "circuit.safetensors"),
               "--multiplier", "0", "--format", "gguf-lora", "--out", str(out)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "--lora-init-without-apply" in printed and '"lora"' in printed and "ADAPTER" in printed
    assert read_provenance(out)["multiplier"] == 0.0
    assert main(command) == 2  # exists, no --force
    assert main([*command[:-4], "--multiplier", "2", "--format", "gguf-lora", "--out", str(out), "--force"]) == 0
    assert read_provenance(out)["multiplier"] == 2.0
    other = tmp_path / "model.gguf"
    shutil.copy(gguf_file, other)
    with pytest.raises(CNAError, match="not a GGUF LoRA written by cna export"):
        export_gguf_lora(model, circuit, 0.0, other, force=True)
    assert other.read_bytes() == gguf_file.read_bytes()
    with pytest.raises(CNAError, match="identity"):
        export_gguf_lora(model, circuit, 1.0, tmp_path / "one.gguf")
    with pytest.raises(CNAError, match="is a folder"):
        export_gguf_lora(model, circuit, 0.0, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["circuit.safetensors", "model.gguf", "steer.gguf"]


def test_scale_formula():
    assert effective_multiplier(0.0, 0.5) == 0.5 and effective_multiplier(3.0, 2.0) == 5.0
    assert lora_scale_for(0.0, 0.25) == 0.75 and lora_scale_for(3.0, 5.0) == 2.0
    with pytest.raises(CNAError, match="identity"):
        lora_scale_for(1.0, 0.0)


def test_expert_adapters_are_stacked_3d():
    """Routed neurons: A [E, r, n_ff] and B [E, n_embd, r], the layout llama.cpp's build_lora_mm_id multiplies."""
    rng = np.random.default_rng(0)
    experts, hidden, width = 4, 8, 16
    weight = rng.standard_normal((experts, hidden, width)).astype(np.float32)
    tensor = SimpleNamespace(name="blk.1.ffn_down_exps.weight", data=weight, tensor_type=GGMLQuantizationType.F32)
    values = torch.ones(3, dtype=torch.float64)
    circuit = Circuit(layers=[1, 1, 1], neurons=[3, 7, 3], experts=[0, 0, 2], scores=values, deltas=values,
                      mean_positive=values, mean_negative=values, std_positive=values, std_negative=values)
    out = adapter_tensors_from_gguf(SimpleNamespace(tensors=[tensor]), circuit, 0.5)
    lora_a, lora_b = out["blk.1.ffn_down_exps.weight.lora_a"], out["blk.1.ffn_down_exps.weight.lora_b"]
    assert lora_a.shape == (experts, 2, width) and lora_b.shape == (experts, hidden, 2)
    for expert, chosen in ((0, [3, 7]), (1, []), (2, [3]), (3, [])):
        folded = weight[expert].copy()
        folded[:, chosen] *= 0.5
        np.testing.assert_allclose(weight[expert] + lora_b[expert] @ lora_a[expert], folded, atol=1e-6)
    with pytest.raises(CNAError, match="no blk.1.ffn_down_exps"):
        adapter_tensors_from_gguf(SimpleNamespace(tensors=[]), circuit, 0.5)
