"""Architecture adapters: blocks, widths and the neuron site, checked against the modules' own weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from cna_fast import discover, get_adapter
from cna_fast.errors import CNAError, UnsupportedArchitectureError
from cna_fast.models.adapters import ARCHITECTURES, ModelAdapter
from tests.tiny import ARCH_CONFIGS, DOWN_PATHS, build_tiny_model

MODEL_TYPES = sorted(ARCHITECTURES)
NUM_LAYERS = 4  # every tiny config in tests/tiny.py
D_FF = 96
HIDDEN = 64

# Where transformers keeps each family's blocks and MLP projections, written out independently of
# the library's ArchSpec table: (blocks path, MLP attribute, kind, projection names).
#   gated: (gate, up, down); fused: (gate_up, down) with gate first; plain: (fc_in, fc_out).
_LAYOUT: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    **{mt: ("model.layers", "mlp", "gated", ("gate_proj", "up_proj", "down_proj"))
       for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")},
    "phi3": ("model.layers", "mlp", "fused", ("gate_up_proj", "down_proj")),
    "phi": ("model.layers", "mlp", "plain", ("fc1", "fc2")),
    "gpt2": ("transformer.h", "mlp", "plain", ("c_fc", "c_proj")),
    "gpt_neox": ("gpt_neox.layers", "mlp", "plain", ("dense_h_to_4h", "dense_4h_to_h")),
}

CONTRAST_POSITIVE = [
    "zebra zebra stripes on the savanna",
    "the zebra jumps over the lazy dog",
    "explain zebra stripes to a child",
    "write a python function about a zebra",
]
CONTRAST_NEGATIVE = [
    "how do i bake bread at home",
    "what is the capital of france",
    "the history of rome began with a village",
    "explain photosynthesis in simple words",
]


@pytest.fixture(scope="module")
def vocab_size(tokenizer) -> int:
    return len(tokenizer)


# The config key each transformers MLP reads its activation from (Gemma 2/3: hidden_activation, GPT-2:
# activation_function, the rest: hidden_act).
_ACTIVATION_KEY = {"gemma2": "hidden_activation", "gemma3_text": "hidden_activation", "gpt2": "activation_function"}


def config_activation(config) -> str:
    """The activation name this family's MLP uses."""
    value = getattr(config, _ACTIVATION_KEY.get(config.model_type, "hidden_act"))
    assert value, f"config of {config.model_type} names no activation"
    return str(value)


def apply_projection(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b for nn.Linear, y = x W + b for GPT-2's Conv1D, straight from the weights."""
    if isinstance(module, Conv1D):
        out = x @ module.weight
    else:
        assert isinstance(module, nn.Linear), type(module)
        out = x @ module.weight.T
    return out if module.bias is None else out + module.bias


def mlp_part(model: nn.Module, layer: int, name: str) -> nn.Module:
    """Submodule `name` of layer `layer`'s MLP, found through the independent layout table."""
    blocks_path, mlp_name, _, _ = _LAYOUT[model.config.model_type]
    return getattr(getattr(model.get_submodule(blocks_path)[layer], mlp_name), name)


def hand_neurons(model: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The neurons of `layer` for MLP input `x`, computed by hand: act(gate x) * up x, or act(fc_in x)."""
    _, _, kind, names = _LAYOUT[model.config.model_type]
    act = ACT2FN[config_activation(model.config)]
    if kind == "gated":
        gate, up = mlp_part(model, layer, names[0]), mlp_part(model, layer, names[1])
        return act(apply_projection(gate, x)) * apply_projection(up, x)
    if kind == "fused":
        # transformers' Phi3MLP: gate, up_states = gate_up_proj(x).chunk(2, dim=-1): gate is the first half
        fused = apply_projection(mlp_part(model, layer, names[0]), x)
        half = fused.shape[-1] // 2
        return act(fused[..., :half]) * fused[..., half:]
    return act(apply_projection(mlp_part(model, layer, names[0]), x))


def site_input(model: nn.Module, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `x` through layer `layer`'s MLP; return (input seen by adapter.neuron_site, MLP output)."""
    adapter = get_adapter(model)
    blocks_path, mlp_name, _, _ = _LAYOUT[model.config.model_type]
    mlp = getattr(model.get_submodule(blocks_path)[layer], mlp_name)
    seen: list[torch.Tensor] = []
    handle = adapter.neuron_site(layer).register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            out = mlp(x)
    finally:
        handle.remove()
    assert len(seen) == 1, f"neuron site of layer {layer} ran {len(seen)} times for one MLP call"
    return seen[0], out


def test_arch_configs_cover_every_supported_architecture() -> None:
    assert set(ARCH_CONFIGS) == set(ARCHITECTURES)
    assert set(_LAYOUT) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_blocks_and_widths(model_type: str, vocab_size: int) -> None:
    model = build_tiny_model(model_type, vocab_size)
    adapter = get_adapter(model)
    blocks_path, _, _, names = _LAYOUT[model_type]
    blocks = model.get_submodule(blocks_path)
    assert adapter.num_layers == NUM_LAYERS == len(blocks)
    assert adapter.widths == [D_FF] * NUM_LAYERS
    assert adapter.d_ff == D_FF
    assert adapter.num_neurons == NUM_LAYERS * D_FF
    assert adapter.activation == config_activation(model.config)
    for layer in range(NUM_LAYERS):
        assert adapter.neuron_site(layer) is mlp_part(model, layer, names[-1])
        assert adapter.layer_device(layer) == torch.device("cpu")
    assert adapter.body is model.base_model
    assert get_adapter(model) is adapter  # cached on the model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_neuron_site_input_is_down_projection_input(model_type: str, vocab_size: int) -> None:
    """The pre-hook on neuron_site sees act(gate x) * up x (or act(fc_in x)), the down projection's input."""
    model = build_tiny_model(model_type, vocab_size)
    generator = torch.Generator().manual_seed(1)
    # Scaled so that pre-activations are O(1) under the 0.02-std random init: values far above atol.
    x = 5.0 * torch.randn(2, 7, HIDDEN, generator=generator)
    for layer in range(NUM_LAYERS):
        seen, out = site_input(model, layer, x)
        with torch.no_grad():
            expected = hand_neurons(model, layer, x)
            down = apply_projection(mlp_part(model, layer, _LAYOUT[model_type][3][-1]), expected)
        assert seen.shape == (2, 7, D_FF)
        assert expected.abs().max() > 0.05, "test input too small to tell activations apart"
        torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
        # ... and the down projection is the MLP's last step: its output is the MLP's output.
        torch.testing.assert_close(out, down, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", [mt for mt in MODEL_TYPES if _LAYOUT[mt][2] != "plain"])
def test_gated_site_is_not_the_activation_output_alone(model_type: str, vocab_size: int) -> None:
    """Guard for the reference above: in gated MLPs act(gate x) alone (or gate/up swapped) is different."""
    model = build_tiny_model(model_type, vocab_size)
    x = 5.0 * torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2))
    seen, _ = site_input(model, 0, x)
    mlp = model.model.layers[0].mlp
    act = ACT2FN[config_activation(model.config)]
    with torch.no_grad():
        if _LAYOUT[model_type][2] == "fused":
            first, second = apply_projection(mlp.gate_up_proj, x).chunk(2, dim=-1)
        else:
            first, second = apply_projection(mlp.gate_proj, x), apply_projection(mlp.up_proj, x)
    assert (seen - act(first)).abs().max() > 1e-2
    assert (seen - act(second) * first).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_architecture(model_type: str, vocab_size: int) -> None:
    """Shape (type, depth, width, hidden size) and content: each layer's sampled values are entries of its
    down projection (found through the test's own module paths)."""
    model = build_tiny_model(model_type, vocab_size)
    architecture = get_adapter(model).architecture()
    shape = {key: architecture[key] for key in ("model_type", "num_layers", "d_ff", "d_model")}
    assert shape == {"model_type": model_type, "num_layers": NUM_LAYERS, "d_ff": D_FF, "d_model": HIDDEN}
    weights = architecture["weights"]
    assert weights["dtype"] == "float32" and len(weights["sample"]) == 4 * NUM_LAYERS
    blocks, down = DOWN_PATHS[model_type]
    for layer, block in enumerate(model.get_submodule(blocks)):
        values = torch.tensor(weights["sample"][4 * layer:4 * layer + 4])
        assert torch.isin(values, block.get_submodule(down).weight.detach()).all()


def test_architecture_lists_widths_when_layers_differ(vocab_size: int) -> None:
    """A model whose layers have different MLP widths: architecture lists them, d_ff refuses."""
    model = build_tiny_model("llama", vocab_size)
    narrow = model.model.layers[2].mlp
    narrow.gate_proj = nn.Linear(HIDDEN, 48, bias=False)
    narrow.up_proj = nn.Linear(HIDDEN, 48, bias=False)
    narrow.down_proj = nn.Linear(48, HIDDEN, bias=False)
    adapter = ModelAdapter(model)
    assert adapter.widths == [D_FF, D_FF, 48, D_FF]
    assert adapter.num_neurons == 3 * D_FF + 48
    assert adapter.architecture()["d_ff"] == [D_FF, D_FF, 48, D_FF]
    with pytest.raises(UnsupportedArchitectureError, match="different MLP widths"):
        _ = adapter.d_ff


def _tiny_bloom() -> nn.Module:
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("build, model_type", [(_tiny_bloom, "bloom"), (lambda: nn.Linear(3, 3), "None")],
                         ids=["bloom", "no-config"])
def test_unsupported_architecture(build, model_type: str) -> None:
    model = build()
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(model)
    message = str(info.value)
    assert model_type in message
    assert "supported" in message
    for supported in ARCHITECTURES:
        assert supported in message
    assert isinstance(info.value, CNAError)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_discover_end_to_end_with_chat_template(model_type: str, tokenizer) -> None:
    model = build_tiny_model(model_type, len(tokenizer))
    circuit = discover(model, tokenizer, CONTRAST_POSITIVE, CONTRAST_NEGATIVE, top_k=3, progress=False)
    assert len(circuit) == 3
    assert ((circuit.layers >= 0) & (circuit.layers < NUM_LAYERS)).all()
    assert ((circuit.neurons >= 0) & (circuit.neurons < D_FF)).all()
    pairs = set(zip(circuit.layers.tolist(), circuit.neurons.tolist()))
    assert len(pairs) == 3, "a neuron was selected twice"
    assert torch.isfinite(circuit.deltas).all() and (circuit.deltas != 0).all()
    assert (circuit.deltas.abs().diff() <= 0).all(), "neurons are not ranked by |delta|"
    torch.testing.assert_close(circuit.deltas, circuit.mean_positive - circuit.mean_negative)
    assert circuit.meta["chat_template"] is True
    assert circuit.meta["architecture"]["model_type"] == model_type
    assert circuit.meta["n_positive"] == len(CONTRAST_POSITIVE)
    assert circuit.meta["n_negative"] == len(CONTRAST_NEGATIVE)
