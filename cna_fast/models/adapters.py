"""Architecture adapters: where each layer's MLP neurons live.

A neuron is one coordinate of the input to the MLP's down projection (docs/architecture.md): `act(gate) * up`
in gated MLPs, `act(fc_in(x))` in plain ones. Every adapter therefore names the down projection;
its input is captured with a forward pre-hook, which works the same for `nn.Linear`, GPT-2's
`Conv1D` and bitsandbytes' quantized linears (their input stays in the compute dtype).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths for one architecture family.

    layers: dotted path from the causal-LM module to the list of decoder blocks.
    down: dotted path from a block to the down projection; its input is the neuron site.
    up: the up projection (gated MLPs), the fused gate+up projection (`fused_gate_up`), or the
        plain MLP's input projection.
    gate: the gate projection of gated MLPs with separate gate and up.
    """

    layers: str
    down: str
    up: str
    gate: str | None = None
    fused_gate_up: bool = False

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up


_GATED = ArchSpec(layers="model.layers", down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "olmo2": _GATED,
    "phi3": ArchSpec(layers="model.layers", down="mlp.down_proj", up="mlp.gate_up_proj", fused_gate_up=True),
    "phi": ArchSpec(layers="model.layers", down="mlp.fc2", up="mlp.fc1"),
    "gpt2": ArchSpec(layers="transformer.h", down="mlp.c_proj", up="mlp.c_fc"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h"),
}

_ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")
_ATTENTION_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
_ATTENTION_OUTPUT_NAMES = ("o_proj", "dense", "c_proj", "out_proj")


def _named_child(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    found = next((getattr(module, name) for name in names if isinstance(getattr(module, name, None), nn.Module)), None)
    if found is None:
        raise UnsupportedArchitectureError(f"cannot find the {what} of {type(module).__name__} (looked for "
                                           f"{', '.join(names)})")
    return found


def residual_writers(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two modules of a decoder block whose outputs are added to the residual stream: the attention and the MLP,
    or the norms after them where the block normalizes each write before adding it (Gemma 2/3, OLMo 2)."""
    if isinstance(getattr(block, "post_feedforward_layernorm", None), nn.Module):
        return block.post_attention_layernorm, block.post_feedforward_layernorm
    return _named_child(block, _ATTENTION_NAMES, "attention"), _named_child(block, _MLP_NAMES, "MLP")


def attention_output_projection(block: nn.Module) -> nn.Module:
    """The attention's output projection of a decoder block (o_proj, dense, c_proj or out_proj)."""
    attention = _named_child(block, _ATTENTION_NAMES, "attention")
    return _named_child(attention, _ATTENTION_OUTPUT_NAMES, "attention output projection")


def _in_features(module: nn.Module) -> int:
    """Input width of a linear-like module: nn.Linear, bitsandbytes linears, GPT-2 Conv1D."""
    width = getattr(module, "in_features", None)
    if width is None:
        width = getattr(module, "nx", None)  # transformers' Conv1D stores its input width as nx
    if width is None:
        raise UnsupportedArchitectureError(
            f"cannot read the input width of {type(module).__name__}; expected a Linear or Conv1D"
        )
    return int(width)


class ModelAdapter:
    """Finds the decoder blocks and the neuron site of each block's MLP in a causal LM."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        spec = ARCHITECTURES.get(model_type)
        if spec is None:
            raise UnsupportedArchitectureError(
                f"architecture {model_type!r} is not supported; supported model types: "
                f"{', '.join(sorted(ARCHITECTURES))}"
            )
        self.model = model
        self.model_type: str = model_type
        self.spec = spec
        self.blocks: nn.ModuleList = model.get_submodule(spec.layers)
        self.down_projs: list[nn.Module] = [block.get_submodule(spec.down) for block in self.blocks]
        self.widths: list[int] = [_in_features(down) for down in self.down_projs]
        self.activation: str = next(
            (str(getattr(config, key)) for key in _ACTIVATION_KEYS if getattr(config, key, None)), "unknown"
        )

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_neurons(self) -> int:
        """All MLP neurons of all layers together."""
        return sum(self.widths)

    def neurons_in(self, layers) -> int:
        """How many neurons the given layers hold together."""
        return sum(self.widths[layer] for layer in layers)

    @property
    def d_ff(self) -> int:
        """Neurons per layer; raises if layers differ in width."""
        if len(set(self.widths)) != 1:
            raise UnsupportedArchitectureError(f"layers have different MLP widths: {sorted(set(self.widths))}")
        return self.widths[0]

    @property
    def body(self) -> nn.Module:
        """The transformer without its LM head: attribution never needs logits."""
        return self.model.base_model

    def neuron_site(self, layer: int) -> nn.Module:
        """The module whose input holds layer `layer`'s neurons (the down projection)."""
        return self.down_projs[layer]

    def mlp(self, layer: int) -> nn.Module:
        """The MLP block that contains layer `layer`'s down projection."""
        return self.blocks[layer].get_submodule(self.spec.down.rsplit(".", 1)[0])

    def layer_device(self, layer: int) -> torch.device:
        """Device that holds layer `layer`'s MLP (differs per layer under a device_map)."""
        return next(self.down_projs[layer].parameters()).device

    def mlp_output_weights(self, layer: int) -> list[torch.Tensor]:
        """The weights of layer `layer`'s MLP that write into the residual stream: its down projection's (and bias)."""
        return list(self.down_projs[layer].parameters())

    def architecture(self) -> dict[str, Any]:
        """What a circuit must agree with to be applied to this model: model type, layer count, widths,
        hidden size, and a small sample of the down-projection weights (tells a base model from its fine-tune)."""
        from .content import weight_sample

        uniform = len(set(self.widths)) == 1
        architecture = {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "d_ff": self.widths[0] if uniform else list(self.widths),
        }
        d_model = getattr(self.down_projs[0], "out_features", None) or getattr(self.down_projs[0], "nf", None)
        if d_model is not None:
            architecture["d_model"] = int(d_model)
        weights = weight_sample(self.down_projs)
        if weights is not None:
            architecture["weights"] = weights  # content: tells a base model from its fine-tune
        return architecture


def cache_keyword(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes the KV cache.

    transformers 5.25 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40); older
    releases know only `past_key_values`. Asking the signature works for every model class and release.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def find_cache(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The KV cache object among a forward's arguments, whatever keyword or position carries it (None if none)."""
    from transformers import Cache

    return next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)
