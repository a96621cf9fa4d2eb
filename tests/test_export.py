"""Serving exports: folded checkpoints and PEFT LoRA adapters reproduce the steering hooks; safe output folders."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_fast import get_adapter
from cna_fast.circuit import Circuit
from cna_fast.errors import CNAError
from cna_fast.export import dense_weight, export_folded, export_lora
from cna_fast.steering import steer
from tests.tiny import DOWN_PATHS, assert_state_identical, build_tiny_model, snapshot

ARCHS = ("llama", "gpt2", "phi3", "gpt_neox")
VOCAB = 400
ATOL = 1e-5

# Layers 0, 1 and 3 (none in 2) with 1, 2 and 3 neurons: LoRA rank 3, layer 0 and 1 zero-padded.
CIRCUIT_LAYERS = [3, 1, 0, 3, 1, 3]
CIRCUIT_NEURONS = [95, 7, 5, 0, 90, 40]


# ----------------------------------------------------------------------------------------------- helpers


def new_model(arch: str) -> nn.Module:
    """The tiny model of `arch`, always the same weights (seed 0)."""
    return build_tiny_model(arch, vocab_size=VOCAB, seed=0)


def down_name(arch: str, layer: int) -> str:
    blocks, down = DOWN_PATHS[arch]
    return f"{blocks}.{layer}.{down}"


def make_circuit(model: nn.Module, layers: Sequence[int] = CIRCUIT_LAYERS,
                 neurons: Sequence[int] = CIRCUIT_NEURONS) -> Circuit:
    """A circuit at the given positions, dummy statistics, the model's architecture in meta."""
    n = len(layers)
    values = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    return Circuit(layers=list(layers), neurons=list(neurons), scores=values, deltas=values, mean_positive=values,
                   mean_negative=torch.zeros(n), std_positive=torch.ones(n), std_negative=torch.ones(n),
                   meta={"architecture": get_adapter(model).architecture(), "note": "export test"})


def token_ids(rows: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=generator)


@torch.no_grad()
def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits


def hook_logits(model: nn.Module, circuit: Circuit, multiplier: float, input_ids: torch.Tensor) -> torch.Tensor:
    with steer(model, circuit, multiplier):
        return logits_of(model, input_ids)


def folder_contents(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder`."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ------------------------------------------------------------------------------------------ folded export


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("multiplier", [0.0, 2.5])
def test_folded_checkpoint_equals_hook_path(arch: str, multiplier: float, tmp_path: Path) -> None:
    model = new_model(arch)
    circuit = make_circuit(model)
    ids = token_ids()
    before = snapshot(model)
    out = export_folded(model, circuit, multiplier, tmp_path / "folded")
    assert out == tmp_path / "folded"
    assert_state_identical(model, before)  # the model in memory is untouched
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = hook_logits(model, circuit, multiplier, ids)
    torch.testing.assert_close(logits_of(loaded, ids), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(logits_of(model, ids), expected, atol=1e-4), "the circuit must change the logits"
    # only the circuit layers' down projections differ from the original weights
    changed = {name for name, tensor in loaded.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {f"{down_name(arch, layer)}.weight" for layer in set(CIRCUIT_LAYERS)}
    provenance = json.loads((out / "cna_fast_steering.json").read_text())
    assert provenance["format"] == "folded" and provenance["multiplier"] == multiplier
    assert provenance["neurons"] == len(circuit) and provenance["circuit_meta"]["note"] == "export test"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]  # no staging folder left


def test_folded_checkpoint_saves_the_tokenizer(tokenizer, tmp_path: Path) -> None:
    model = build_tiny_model("llama", vocab_size=len(tokenizer))
    out = export_folded(model, make_circuit(model), 0.0, tmp_path / "out", tokenizer=tokenizer)
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "what is the capital of france"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template


# -------------------------------------------------------------------------------------------- LoRA export


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("multiplier", [0.0, -1.5])
def test_lora_adapter_equals_hook_path(arch: str, multiplier: float, tmp_path: Path) -> None:
    model = new_model(arch)
    circuit = make_circuit(model)
    ids = token_ids(seed=1)
    before = snapshot(model)
    out = export_lora(model, circuit, multiplier, tmp_path / "lora")
    assert_state_identical(model, before)
    peft_model = PeftModel.from_pretrained(new_model(arch), str(out)).eval()  # a fresh copy of the base
    expected = hook_logits(model, circuit, multiplier, ids)
    torch.testing.assert_close(logits_of(peft_model, ids), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(logits_of(model, ids), expected, atol=1e-4), "the circuit must change the logits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapter_layout(arch: str, tmp_path: Path) -> None:
    """r == lora_alpha == most neurons in one layer; targets are the circuit layers' down projections;
    A holds one-hot rows on the circuit neurons (zero padding after), B = (m - 1) W[:, neurons]."""
    model = new_model(arch)
    multiplier = 3.0
    out = export_lora(model, make_circuit(model), multiplier, tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == 3
    per_layer = {layer: sorted(n for l_, n in zip(CIRCUIT_LAYERS, CIRCUIT_NEURONS) if l_ == layer)
                 for layer in set(CIRCUIT_LAYERS)}
    assert sorted(config["target_modules"]) == sorted(down_name(arch, layer) for layer in per_layer)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(per_layer)
    for layer, neurons in per_layer.items():
        name = down_name(arch, layer)
        lora_a = tensors[f"base_model.model.{name}.lora_A.weight"]
        lora_b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert lora_a.shape == (3, 96)
        expected_a = torch.zeros(3, 96)
        expected_a[torch.arange(len(neurons)), torch.tensor(neurons)] = 1.0
        assert torch.equal(lora_a, expected_a)
        weight = model.get_submodule(name).weight.detach()
        columns = weight[torch.tensor(neurons), :].T if arch == "gpt2" else weight[:, torch.tensor(neurons)]
        assert lora_b.shape == (64, 3)
        torch.testing.assert_close(lora_b[:, :len(neurons)], (multiplier - 1.0) * columns, atol=1e-6, rtol=0)
        assert torch.equal(lora_b[:, len(neurons):], torch.zeros(64, 3 - len(neurons)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dense_weight_is_out_by_in(arch: str) -> None:
    model = new_model(arch)
    down = model.get_submodule(down_name(arch, 1))
    expected = down.weight.detach().T if arch == "gpt2" else down.weight.detach()
    dense = dense_weight(down)
    assert dense.shape == (64, 96) and dense.dtype == torch.float32
    assert torch.equal(dense, expected)


# ---------------------------------------------------------------------------------------- output folders


EXPORTS: dict[str, Callable] = {"folded": export_folded, "lora": export_lora}


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_non_empty_folder_needs_force(kind: str, tmp_path: Path) -> None:
    export = EXPORTS[kind]
    model = new_model("llama")
    circuit = make_circuit(model)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    contents = folder_contents(out)
    with pytest.raises(CNAError):
        export(model, circuit, 0.0, out)
    assert folder_contents(out) == contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(CNAError, match="not a cna_fast export"):
        export(model, circuit, 0.0, out, force=True)  # force replaces only a previous export
    assert folder_contents(out) == contents

    (out / "cna_fast_steering.json").write_text("{}")  # now it is (marked as) a previous export
    export(model, circuit, 0.0, out, force=True)
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and "sub" not in names  # replaced, not merged
    assert "cna_fast_steering.json" in names
    assert ("config.json" if kind == "folded" else "adapter_config.json") in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (tmp_path / "empty").mkdir()  # an existing empty folder is fine without force
    export(model, circuit, 0.0, tmp_path / "empty")
    assert (tmp_path / "empty" / "cna_fast_steering.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_bad_destinations_and_multipliers_raise(kind: str, tmp_path: Path) -> None:
    export = EXPORTS[kind]
    model = new_model("gpt2")
    circuit = make_circuit(model)
    with pytest.raises(CNAError):
        export(model, circuit, 0.0, tmp_path / "missing" / "out")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CNAError):
        export(model, circuit, 0.0, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(CNAError):
            export(model, circuit, bad, tmp_path / "out")
    with pytest.raises(CNAError):
        export(model, make_circuit(model, [0, 2], [3, 96]), 0.0, tmp_path / "out")  # neuron index == width
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created, no staging folders


def test_failure_while_writing_leaves_no_staging_folder(tmp_path: Path) -> None:
    """An error raised after staging began (here: the tokenizer's save) removes the staging folder."""

    class BrokenTokenizer:
        def save_pretrained(self, folder) -> None:
            raise OSError("disk full")

    model = new_model("llama")
    before = snapshot(model)
    with pytest.raises(OSError, match="disk full"):
        export_folded(model, make_circuit(model), 0.0, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cna_fast_steering.json").write_text("{}")  # a previous export
    with pytest.raises(OSError, match="disk full"):
        export_folded(model, make_circuit(model), 0.0, tmp_path / "out", tokenizer=BrokenTokenizer(), force=True)
    assert folder_contents(tmp_path / "out") == {"cna_fast_steering.json": b"{}"}  # a failed forced export keeps it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert_state_identical(model, before)
