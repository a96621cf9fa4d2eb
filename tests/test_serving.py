"""vLLM's LoRA adapter checks (cna_fast.serving), reproduced here: exports pass them, broken adapters fail them."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cna_fast import CNAError
from cna_fast.cli import main
from cna_fast.export import export_lora
from cna_fast.export import check_vllm_adapter, serve_rank
from tests.test_export import make_circuit, new_model
from tests.tiny import build_tiny_model

VLLM_LORA_ARCHS = ("llama", "qwen2", "phi3", "phi", "gemma2", "mistral")


def architecture(model) -> str:
    return type(model).__name__


@pytest.mark.parametrize("arch", VLLM_LORA_ARCHS)
def test_dense_exports_pass_vllm_checks(arch: str, tmp_path: Path) -> None:
    model = build_tiny_model(arch, vocab_size=400)
    out = export_lora(model, make_circuit(model), 0.0, tmp_path / "lora")
    result = check_vllm_adapter(out, architecture=architecture(model), model=model)
    assert result.problems == []
    assert result.rank == 3 and result.max_lora_rank == 8
    assert len(result.modules) == 3 and all(m.endswith(("down_proj", "fc2")) for m in result.modules)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_architectures_without_vllm_lora_are_named(arch: str, tmp_path: Path) -> None:
    model = new_model(arch)
    out = export_lora(model, make_circuit(model), 0.0, tmp_path / "lora")  # still a valid PEFT adapter
    problems = check_vllm_adapter(out, architecture=architecture(model), model=model).problems
    assert len(problems) == 1 and "does not implement LoRA" in problems[0]
    assert check_vllm_adapter(out, model=model).problems == []  # the files themselves are what vLLM parses


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return edit


def _edit_tensors(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_model.safetensors"
        save_file(change(load_file(str(path))), str(path))
    return edit


def _rename_with_adapter_name(tensors: dict) -> dict:
    return {key.replace(".lora_A.", ".lora_A.default."): value for key, value in tensors.items()}


def _drop_one_b(tensors: dict) -> dict:
    dropped = next(key for key in tensors if key.endswith("lora_B.weight"))
    return {key: value for key, value in tensors.items() if key != dropped}


def _integer_weights(tensors: dict) -> dict:
    return {key: value.to(torch.int32) for key, value in tensors.items()}


def _wider_a(tensors: dict) -> dict:
    return {key: torch.zeros(value.shape[0], value.shape[1] + 1) if "lora_A" in key else value
            for key, value in tensors.items()}


def _add_bias(tensors: dict) -> dict:
    key = next(iter(tensors)).replace("lora_A.weight", "lora_B.bias").replace("lora_B.weight", "lora_B.bias")
    return {**tensors, key: torch.zeros(4)}


def _remove_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


BREAKAGES = {
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "dora": (_edit_config(use_dora=True), "DoRA"),
    "bias": (_edit_config(bias="all"), "bias"),
    "rank above 512": (_edit_config(r=1024, lora_alpha=1024), "above vLLM's largest"),
    "rank_pattern above 512": (_edit_config(rank_pattern={"model.layers.0.mlp.down_proj": 640}), "640"),
    "zero rank": (_edit_config(r=0), "positive integer"),
    "no lora_alpha": (_edit_config(lora_alpha=None), "lora_alpha"),
    "adapter name in keys": (_edit_tensors(_rename_with_adapter_name), "not a weight name"),
    "bias weights": (_edit_tensors(_add_bias), "not a weight name"),
    "A without B": (_edit_tensors(_drop_one_b), "needs both A and B"),
    "integer dtype": (_edit_tensors(_integer_weights), "dtype"),
    "shape off the model": (_edit_tensors(_wider_a), "adapter maps"),
    "no weights": (_remove_weights, "no adapter weights"),
}


@pytest.fixture(scope="module")
def valid_adapter(tmp_path_factory):
    model = new_model("llama")
    folder = tmp_path_factory.mktemp("valid") / "lora"
    export_lora(model, make_circuit(model), 2.0, folder)
    return model, folder


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_each_vllm_rule_rejects_a_broken_adapter(case: str, valid_adapter, tmp_path: Path) -> None:
    model, folder = valid_adapter
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    edit, expected = BREAKAGES[case]
    edit(broken)
    problems = check_vllm_adapter(broken, architecture="LlamaForCausalLM", model=model).problems
    assert problems and any(expected in problem for problem in problems), problems
    assert check_vllm_adapter(folder, architecture="LlamaForCausalLM", model=model).problems == []


def test_serve_rank_is_the_smallest_allowed_value() -> None:
    assert [serve_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512, 513)] == [1, 8, 8, 16, 320, 320, 512, 512, None]


def test_rank_above_vllm_maximum(tmp_path: Path) -> None:
    model = build_tiny_model("llama", vocab_size=400, intermediate_size=600)
    circuit = make_circuit(model, [1] * 513, list(range(513)))
    with pytest.raises(CNAError, match="folded"):
        export_lora(model, circuit, 0.0, tmp_path / "lora")
    assert list(tmp_path.iterdir()) == []
    out = export_lora(model, circuit, 0.0, tmp_path / "lora", check_vllm=False)  # PEFT-only adapter on request
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 513
    assert "above vLLM's largest" in " ".join(check_vllm_adapter(out).problems)
    circuit = make_circuit(model, [1] * 512, list(range(512)))
    out = export_lora(model, circuit, 0.0, tmp_path / "lora512")
    assert check_vllm_adapter(out, architecture="LlamaForCausalLM", model=model).max_lora_rank == 512


def test_cli_prints_the_vllm_command(model_dir, tmp_path: Path, capsys) -> None:
    from cna_fast import load_model

    model, _ = load_model(model_dir)
    circuit = make_circuit(model)
    for name in ("scores", "deltas", "mean_positive"):  # make_circuit shares one tensor; files need their own
        setattr(circuit, name, getattr(circuit, name).clone())
    circuit.save(tmp_path / "circuit.safetensors")
    out = tmp_path / "adapter"
    code = main(["export", "--model", str(model_dir), "--circuit", str(tmp_path / "circuit.safetensors"),
                 "--multiplier", "0", "--format", "lora", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"vllm serve {model_dir} --enable-lora --max-lora-rank 8 --lora-modules steered={out.absolute()}" in printed
    assert '"model": "steered"' in printed


def test_four_bit_base_export_passes_vllm_checks(tmp_path: Path, plain_tokenizer) -> None:
    pytest.importorskip("bitsandbytes")
    from tests.test_quantized import D_FF, load_warm_four_bit

    folder = tmp_path / "base"
    build_tiny_model("llama", len(plain_tokenizer), intermediate_size=D_FF, seed=3).save_pretrained(folder)
    plain_tokenizer.save_pretrained(folder)
    model, _ = load_warm_four_bit(folder)
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    circuit = make_circuit(model, [0, 1, 1, 3], [3, 17, 40, 63])
    out = export_lora(model, circuit, 0.0, tmp_path / "lora")
    result = check_vllm_adapter(out, architecture="LlamaForCausalLM", model=model)
    assert result.problems == [] and result.rank == 2
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(tensor.dtype == torch.float32 and tensor.abs().sum() > 0 for tensor in tensors.values())
