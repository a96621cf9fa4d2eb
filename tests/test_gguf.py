"""GGUF in (load_model("x.gguf"), converted once, keyed by content) and GGUF out (export_gguf).

The GGUF files are written here with the `gguf` package (tests/tiny_gguf.py); the exported files are
read back through transformers' own GGUF loader and compared with the steered source model, and with
the source file tensor by tensor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from cna_fast import CNAError, load_model
from cna_fast.cli import main
from cna_fast.export.gguf import export_gguf
from cna_fast.models import gguf_source
from cna_fast.steering import steer
from tests.test_export import make_circuit
from tests.tiny import build_tiny_model
from tests.tiny_gguf import DOWN_TYPES, round_trip, write_tiny_llama_gguf

# Layers 0-3 store ffn_down as F32, F16, Q8_0, Q4_1; the circuit touches layers 0, 2 and 3.
LAYERS = [0, 2, 3, 3, 0]
NEURONS = [5, 40, 0, 95, 64]
# Largest logit error allowed per written type (logits here are O(1)); the steering effect is far larger.
TOLERANCE = {"F32": 1e-6, "F16": 1e-4, "BF16": 1e-3, "Q8_0": 2e-3, None: 1e-3}


pytestmark = pytest.mark.usefixtures("private_cache")  # every test converts into its own cache folder


def inputs(tokenizer):
    return tokenizer(["what is the capital of france", "zebra stripes on the savanna"], return_tensors="pt",
                     padding=True)


@torch.no_grad()
def logits(model, batch, circuit=None, multiplier=1.0):
    if circuit is None:
        return model(**batch).logits
    with steer(model, circuit, multiplier):
        return model(**batch).logits


def cache_folders() -> list[Path]:
    import os

    return sorted(path for path in Path(os.environ["CNA_FAST_CACHE"]).glob("gguf-*") if path.is_dir())


# ------------------------------------------------------------------------------------------------ GGUF in


def test_gguf_loads_as_the_values_it_stores(tiny_gguf, tokenizer):
    path, truth = tiny_gguf
    model, loaded_tokenizer = load_model(path)
    assert gguf_source(model) == path.resolve()
    batch = inputs(tokenizer)
    torch.testing.assert_close(logits(model, batch), logits(truth, batch), atol=1e-6, rtol=0)
    text = "what is the capital of france"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_conversion_is_cached_by_content(tmp_path, tokenizer):
    path = tmp_path / "model.gguf"
    write_tiny_llama_gguf(path, tokenizer, seed=0)
    load_model(path)
    [folder] = cache_folders()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load_model(str(path))  # the same file again: no new conversion
    assert cache_folders() == [folder] and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    copy = tmp_path / "copy.gguf"  # the same bytes under another name share the folder
    copy.write_bytes(path.read_bytes())
    load_model(copy)
    assert cache_folders() == [folder]

    truth = write_tiny_llama_gguf(path, tokenizer, seed=1)  # same name and size, new content
    model, _ = load_model(path)
    assert len(cache_folders()) == 2
    batch = inputs(tokenizer)
    torch.testing.assert_close(logits(model, batch), logits(truth, batch), atol=1e-6, rtol=0)


def test_bad_tiny_ggufs_raise(tmp_path, tiny_gguf):
    with pytest.raises(CNAError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CNAError, match="not a GGUF file"):
        load_model(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf[0].read_bytes()[:5000])
    with pytest.raises(CNAError, match="corrupt or truncated"):
        load_model(truncated)
    unsupported = tmp_path / "unsupported.gguf"
    writer = GGUFWriter(unsupported, "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CNAError, match="rwkv6"):
        load_model(unsupported)
    assert cache_folders() == []


# ----------------------------------------------------------------------------------------------- GGUF out


def tensors_of(path: Path) -> dict:
    return {tensor.name: tensor for tensor in GGUFReader(path).tensors}


def expected_down(source, layer: int, neurons: list[int], multiplier: float) -> np.ndarray:
    """The source's ffn_down of `layer`, dequantized, with the circuit's columns scaled (numpy, float64 product)."""
    weight = np.asarray(quants.dequantize(source.data, source.tensor_type), dtype=np.float64)
    weight[:, neurons] *= multiplier
    return weight.astype(np.float32)


def check_exported_file(source_path: Path, out: Path, multiplier: float, gguf_type: str | None) -> None:
    """Tensors outside the circuit's ffn_down are byte-identical; those are the scaled source in the new type;
    every source key is kept with its value; provenance is recorded."""
    source, exported = tensors_of(source_path), tensors_of(out)
    assert list(exported) == list(source)
    changed = {f"blk.{layer}.ffn_down.weight" for layer in LAYERS}
    for name, tensor in source.items():
        if name in changed:
            continue
        assert exported[name].tensor_type == tensor.tensor_type, name
        assert list(exported[name].shape) == list(tensor.shape), name
        assert exported[name].data.tobytes() == tensor.data.tobytes(), name
    for layer in sorted(set(LAYERS)):
        name = f"blk.{layer}.ffn_down.weight"
        source_type = DOWN_TYPES[layer]
        written = gguf_type or (source_type if source_type in ("F32", "F16", "Q8_0") else "F16")
        assert exported[name].tensor_type == GGMLQuantizationType[written]
        neurons = [n for l_, n in zip(LAYERS, NEURONS) if l_ == layer]
        want = expected_down(source[name], layer, neurons, multiplier)
        if written == "BF16":
            want_stored = round_trip_bf16(want)
        else:
            want_stored = round_trip(want, written)
        got = np.asarray(quants.dequantize(exported[name].data, exported[name].tensor_type), dtype=np.float32)
        np.testing.assert_array_equal(got, want_stored)
    old_fields, new_fields = GGUFReader(source_path).fields, GGUFReader(out).fields
    for key, field in old_fields.items():
        if not key.startswith("GGUF."):
            assert new_fields[key].contents() == field.contents(), key
    assert new_fields["cna_fast.multiplier"].contents() == multiplier
    assert new_fields["cna_fast.circuit.layers"].contents() == LAYERS
    assert new_fields["cna_fast.circuit.neurons"].contents() == NEURONS


def round_trip_bf16(weight: np.ndarray) -> np.ndarray:
    """bfloat16 rounding (nearest even), written with torch: independent of the gguf package."""
    return torch.from_numpy(weight).to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("gguf_type", [None, "F32", "F16", "BF16", "Q8_0"])
def test_exported_gguf_equals_steered_model(tiny_gguf, tokenizer, tmp_path, gguf_type):
    path, _ = tiny_gguf
    multiplier = 2.5
    model, _ = load_model(path)
    circuit = make_circuit(model, LAYERS, NEURONS)
    out = export_gguf(model, circuit, multiplier, tmp_path / "steered.gguf", gguf_type=gguf_type)
    assert out == tmp_path / "steered.gguf" and sorted(p.name for p in tmp_path.iterdir()) == ["steered.gguf"]
    check_exported_file(path, out, multiplier, gguf_type)

    served, _ = load_model(out)  # through transformers' GGUF loader
    batch = inputs(tokenizer)
    expected = logits(model, batch, circuit, multiplier)
    error = (logits(served, batch) - expected).abs().max()
    effect = (logits(model, batch) - expected).abs().max()
    assert error <= TOLERANCE[gguf_type] and effect > 20 * error, (error, effect)


def test_ablation_export_and_cli(tiny_gguf, tokenizer, tmp_path, capsys):
    """Multiplier 0 through `cna export --format gguf`; the written file reproduces the ablated model."""
    path, _ = tiny_gguf
    model, _ = load_model(path)
    circuit = make_circuit(model, LAYERS, NEURONS)
    for name in ("scores", "deltas", "mean_positive"):  # make_circuit shares one tensor; files need their own
        setattr(circuit, name, getattr(circuit, name).clone())
    circuit.save(tmp_path / "circuit.safetensors")
    out = tmp_path / "ablated.gguf"
    code = main(["export", "--model", str(path), "--circuit", str(tmp_path / "circuit.safetensors"),
                 "--multiplier", "0", "--format", "gguf", "--out", str(out)])
    assert code == 0 and "ollama" in capsys.readouterr().out.lower()
    check_exported_file(path, out, 0.0, None)
    served, _ = load_model(out)
    batch = inputs(tokenizer)
    expected = logits(model, batch, circuit, 0.0)
    error = (logits(served, batch) - expected).abs().max()
    assert error <= TOLERANCE[None] and (logits(model, batch) - expected).abs().max() > 20 * error

    code = main(["export", "--model", str(path), "--circuit", str(tmp_path / "circuit.safetensors"),
                 "--multiplier", "0", "--format", "gguf", "--out", str(out)])
    assert code == 2  # exists, no --force
    code = main(["export", "--model", str(path), "--circuit", str(tmp_path / "circuit.safetensors"),
                 "--multiplier", "0", "--format", "gguf", "--gguf-type", "Q8_0", "--out", str(out), "--force"])
    assert code == 0 and GGUFReader(out).tensors[0].name == "token_embd.weight"


def test_export_refusals(tiny_gguf, tokenizer, tmp_path):
    path, _ = tiny_gguf
    model, _ = load_model(path)
    circuit = make_circuit(model, LAYERS, NEURONS)
    plain = build_tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(CNAError, match="convert_hf_to_gguf"):
        export_gguf(plain, make_circuit(plain, LAYERS, NEURONS), 0.0, tmp_path / "x.gguf")
    with pytest.raises(CNAError, match="source GGUF itself"):
        export_gguf(model, circuit, 0.0, path, force=True)
    with pytest.raises(CNAError, match="is a folder"):
        export_gguf(model, circuit, 0.0, tmp_path)
    with pytest.raises(CNAError, match="does not exist"):
        export_gguf(model, circuit, 0.0, tmp_path / "missing" / "x.gguf")
    with pytest.raises(CNAError, match="unknown GGUF tensor type"):
        export_gguf(model, circuit, 0.0, tmp_path / "x.gguf", gguf_type="Q4_K")
    (tmp_path / "x.gguf").write_text("keep")
    with pytest.raises(CNAError, match="exists"):
        export_gguf(model, circuit, 0.0, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no partial files


def test_export_refuses_a_source_changed_since_loading(tmp_path, tokenizer):
    path = tmp_path / "model.gguf"
    write_tiny_llama_gguf(path, tokenizer, seed=0)
    model, _ = load_model(path)
    write_tiny_llama_gguf(path, tokenizer, seed=1)
    with pytest.raises(CNAError, match="changed since"):
        export_gguf(model, make_circuit(model, LAYERS, NEURONS), 0.0, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


# ------------------------------------------------------------------------------------ embedded default model


@pytest.mark.slow
def test_default_model_gguf_export(default_model, tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (Q4_1): 46 neurons in 12 layers ablated; ffn_down rewritten as F16."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = default_model
    source_path = gguf_source(model)
    assert source_path is not None and source_path.name.endswith(".Q4_1.gguf")
    generator = torch.Generator().manual_seed(0)
    layers = [2 + (i % 12) * 2 for i in range(46)]
    neurons = [int(v) for v in torch.randperm(1536, generator=generator)[:46]]
    circuit = make_circuit(model, layers, neurons)
    out = export_gguf(model, circuit, 0.0, tmp_path / "steered.gguf")
    source, exported = tensors_of(source_path), tensors_of(out)
    changed = {f"blk.{layer}.ffn_down.weight" for layer in layers}
    assert all(exported[name].data.tobytes() == tensor.data.tobytes()
               for name, tensor in source.items() if name not in changed)
    assert {exported[name].tensor_type.name for name in changed} == {"F16"}

    served = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    batch = tokenizer(["Quelle est la capitale de la France ?", "Write a haiku about the sea."], return_tensors="pt",
                      padding=True)
    expected = logits(model, batch, circuit, 0.0)
    error = (logits(served, batch) - expected).abs().max()
    effect = (logits(model, batch) - expected).abs().max()
    assert error < 0.05 and effect > 20 * error, (error, effect)


def test_every_command_takes_a_gguf_model(tiny_gguf, prompt_files, tmp_path, capsys):
    """discover, then generate, with --model pointing at the .gguf file."""
    path, _ = tiny_gguf
    positive, negative = prompt_files
    circuit_file = tmp_path / "circuit.safetensors"
    assert main(["discover", "--model", str(path), "--positive", str(positive), "--negative", str(negative),
                 "--top-k", "3", "--out", str(circuit_file), "--quiet"]) == 0
    assert main(["generate", "--model", str(path), "--circuit", str(circuit_file), "--prompt", "zebra",
                 "--max-new-tokens", "3", "--quiet"]) == 0
    assert ">>> zebra" in capsys.readouterr().out
    assert main(["discover", "--model", str(tmp_path / "nope.gguf"), "--positive", str(positive), "--negative",
                 str(negative), "--out", str(tmp_path / "c2.safetensors")]) == 2


def test_expert_tensors_are_refused_clearly():
    from cna_fast.export.gguf import _down_tensor

    with pytest.raises(CNAError, match="mixture of experts"):
        _down_tensor({"blk.3.ffn_down_exps.weight": object()}, 3)
    with pytest.raises(CNAError, match="no tensor"):
        _down_tensor({}, 3)
