"""Mixture-of-experts layers: where routed, shared and dense neurons live, and a hook between each
expert's gating and its down projection.

transformers 5 stores the routed experts of about 60 families as 3-D tensors behind
`use_experts_implementation` (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V3, ...). Every such
experts module carries the same description of itself (`has_gate`, `has_bias`, `is_transposed`,
`_apply_gate`, `gate_up_proj`/`up_proj`, `down_proj`), so one forward written against that
description serves all of them. `patched_experts` swaps it in for the modules of chosen layers:
it computes exactly what the implementation selected in the config computes (eager,
batched_mm or grouped_mm: same operations in the same order), and in the middle calls a
`RowHook` with every (token, expert) row's down-projection input `h = gate(x W_up[e])`, its expert
id, its token and its routing weight. The hook may scale `h` in place (steering) or fold it into
statistics (capture). The routing weight multiplies the down projection's output in every family,
so `w * h_j` is exactly the part of the output that neuron j of that expert contributes.

A routed neuron is (layer, expert, j). Ordinary neurons, those of dense MLP layers (DeepSeek-V3's
first layers, Qwen2-MoE's `mlp_only_layers`) and of shared experts (Qwen2-MoE, DeepSeek-V3), are
the inputs of ordinary down projections, one site per layer, as in dense models.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CNAError, UnsupportedArchitectureError

# hook(h [S, width] (may be scaled in place), expert_ids [S], token_ids [S], routing_weights [S])
RowHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_HOOKS = "_cna_fast_row_hooks"


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module decorated with `use_experts_implementation` (3-D down projection)."""
    down = getattr(module, "down_proj", None)
    return hasattr(module, "has_gate") and isinstance(down, torch.Tensor) and down.dim() == 3


def _linear_in_features(module: nn.Module) -> int:
    return int(module.in_features)


@dataclass(frozen=True)
class MoELayer:
    """One decoder block's MLP: its routed experts (if any) and its ordinary neuron site (if any).

    block: the module that holds router and experts (the `mlp` of the decoder layer).
    experts: the experts module, or None for a dense layer.
    ordinary: the down projection of the dense MLP or of the shared expert, or None.
    """

    block: nn.Module
    experts: nn.Module | None
    ordinary: nn.Linear | None

    @property
    def num_experts(self) -> int:
        return int(self.experts.down_proj.shape[0]) if self.experts is not None else 0

    @property
    def expert_width(self) -> int:
        """Neurons per expert: the down projection's input width."""
        if self.experts is None:
            return 0
        down = self.experts.down_proj
        return int(down.shape[1] if self.experts.is_transposed else down.shape[2])

    @property
    def ordinary_width(self) -> int:
        return _linear_in_features(self.ordinary) if self.ordinary is not None else 0


def find_layer(decoder_layer: nn.Module) -> MoELayer | None:
    """The MoE description of one decoder block, or None when it has no experts module and no MLP."""
    mlp = next((getattr(decoder_layer, name) for name in ("mlp", "feed_forward", "block_sparse_moe")
                if isinstance(getattr(decoder_layer, name, None), nn.Module)), None)
    if mlp is None:
        return None
    experts = next((module for module in mlp.modules() if is_experts_module(module)), None)
    if experts is None:
        down = getattr(mlp, "down_proj", None)
        return MoELayer(mlp, None, down) if isinstance(down, nn.Linear) else None
    shared = next((getattr(mlp, name) for name in _SHARED_NAMES if isinstance(getattr(mlp, name, None), nn.Module)),
                  None)
    down = getattr(shared, "down_proj", None) if shared is not None else None
    return MoELayer(mlp, experts, down if isinstance(down, nn.Linear) else None)


def is_moe_model(model: nn.Module) -> bool:
    """Whether any module of `model` is a transformers experts module."""
    return any(is_experts_module(module) for module in model.modules())


def expert_columns(experts: nn.Module, expert: int, neurons: torch.Tensor) -> torch.Tensor:
    """Columns `neurons` of expert `expert`'s down projection as an [out, k] view of the 3-D weight."""
    down = experts.down_proj
    if experts.is_transposed:  # [E, width, out]
        return down[expert][neurons.to(down.device)].T
    return down[expert][:, neurons.to(down.device)]  # [E, out, width]


def scale_expert_columns(weight: torch.Tensor, is_transposed: bool, expert: int, neurons: torch.Tensor,
                         factor: float) -> None:
    """Multiply the down-projection columns of `neurons` of one expert in a 3-D weight, in place."""
    index = neurons.to(weight.device)
    if is_transposed:
        weight[expert, index, :] *= factor
    else:
        weight[expert, :, index] *= factor


# ------------------------------------------------------------------------------- the hooked experts forward


def _project(module: nn.Module, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One expert's projection as the eager implementations write it (x W^T, or x W for transposed layouts)."""
    if module.is_transposed:
        out = rows @ weight
        return out + bias if bias is not None else out
    out = nn.functional.linear(rows, weight)
    return out + bias if bias is not None else out


def _gate(module: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """The down projection's input from the up (or fused gate+up) projection: the family's own gating."""
    return module._apply_gate(projected) if module.has_gate else module.act_fn(projected)


def _up_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if module.has_gate:
        return module.gate_up_proj, (module.gate_up_proj_bias if module.has_bias else None)
    return module.up_proj, (module.up_proj_bias if module.has_bias else None)


def _eager(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
           hook: RowHook) -> torch.Tensor:
    """The eager loop over the experts that received tokens, with the hook on each expert's rows."""
    output = torch.zeros_like(hidden)
    up, up_bias = _up_weights(module)
    with torch.no_grad():
        mask = nn.functional.one_hot(index, num_classes=module.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit[:, 0].tolist():
        if expert == module.num_experts:
            continue
        slot, token = torch.where(mask[expert])
        h = _gate(module, _project(module, hidden[token], up[expert], None if up_bias is None else up_bias[expert]))
        routing = weights[token, slot]
        hook(h, torch.full_like(token, expert), token, routing)
        out = _project(module, h, module.down_proj[expert], module.down_proj_bias[expert] if module.has_bias else None)
        if module.has_post_expert_norm:
            out = module.post_expert_norm(out)
        output.index_add_(0, token, (out * routing[:, None]).to(output.dtype))
    return output


def _batched(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
             hook: RowHook) -> torch.Tensor:
    """transformers' batched_mm: one row per (token, slot), token-major, weights gathered per row."""
    from transformers.integrations.moe import _batched_linear

    top_k, tokens = index.size(-1), hidden.size(0)
    routing, expert_ids = weights.reshape(-1), index.reshape(-1)
    up, up_bias = _up_weights(module)
    h = _gate(module, _batched_linear(hidden.repeat_interleave(top_k, dim=0), up[expert_ids],
                                      bias=None if up_bias is None else up_bias[expert_ids],
                                      is_transposed=module.is_transposed))
    token_ids = torch.arange(tokens, device=hidden.device).repeat_interleave(top_k)
    hook(h, expert_ids, token_ids, routing)
    out = _batched_linear(h, module.down_proj[expert_ids],
                          bias=module.down_proj_bias[expert_ids] if module.has_bias else None,
                          is_transposed=module.is_transposed)
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    return (out * routing.unsqueeze(-1)).view(tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def _grouped(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
             hook: RowHook) -> torch.Tensor:
    """transformers' grouped_mm: rows sorted by expert, one grouped matrix product per projection."""
    from transformers.integrations.moe import _grouped_linear

    top_k, tokens = index.size(-1), hidden.size(0)
    expert_ids, perm = torch.sort(index.reshape(-1))
    token_ids = perm // top_k
    routing = weights.reshape(-1)[perm]
    histc_input = expert_ids.float() if hidden.device.type in ("cpu", "mps") else expert_ids.int()
    per_expert = torch.histc(histc_input, bins=module.num_experts, min=0, max=module.num_experts - 1)
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    up, up_bias = _up_weights(module)
    h = _gate(module, _grouped_linear(hidden[token_ids], up, offsets,
                                      bias=None if up_bias is None else up_bias[expert_ids],
                                      is_transposed=module.is_transposed))
    hook(h, expert_ids, token_ids, routing)
    out = _grouped_linear(h, module.down_proj, offsets,
                          bias=module.down_proj_bias[expert_ids] if module.has_bias else None,
                          is_transposed=module.is_transposed)
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    out = out * routing.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return out[inverse].view(tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


_STRATEGIES = {"eager": _eager, "batched_mm": _batched, "grouped_mm": _grouped}


def _hooked_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """A forward for `module` that mirrors its configured implementation and runs its row hooks on every row.

    Implementations other than eager, batched_mm and grouped_mm (deepgemm, sonicmoe, kernels from
    the hub) run as grouped_mm while hooked, with a warning: the hooks need the per-row activations.
    """
    if getattr(module, "_is_expert_parallel", False):
        raise UnsupportedArchitectureError("expert-parallel experts are not supported: load the model without "
                                           "expert parallelism (device_map sharding by layer works)")
    selected = getattr(module.config, "_experts_implementation", None) or "eager"
    if selected not in _STRATEGIES:
        warnings.warn(f"experts implementation {selected!r} has no per-row hook: cna_fast runs these experts as "
                      "grouped_mm while capturing or steering", stacklevel=4)
    strategy = _STRATEGIES.get(selected, _grouped)
    hooks: dict[int, RowHook] = module.__dict__[_HOOKS]

    def run_hooks(h: torch.Tensor, expert_ids: torch.Tensor, token_ids: torch.Tensor, routing: torch.Tensor) -> None:
        for hook in list(hooks.values()):
            hook(h, expert_ids, token_ids, routing)

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        return strategy(module, hidden_states, top_k_index, top_k_weights, run_hooks)

    return forward


class RowHookHandle:
    """Removes one row hook; the experts' own forward comes back when the last one is removed."""

    def __init__(self, experts: nn.Module, key: int) -> None:
        self.experts, self.key = experts, key

    def remove(self) -> None:
        hooks = self.experts.__dict__.get(_HOOKS)
        if hooks is None or self.key not in hooks:
            return
        del hooks[self.key]
        if not hooks:
            del self.experts.__dict__[_HOOKS]
            del self.experts.forward


_next_key = iter(range(1 << 62))


@contextmanager
def row_hook(experts: nn.Module, hook: RowHook) -> Iterator[RowHookHandle]:
    """`register_row_hook` for the duration of a block (e.g. inside a HookSet)."""
    handle = register_row_hook(experts, hook)
    try:
        yield handle
    finally:
        handle.remove()


def register_row_hook(experts: nn.Module, hook: RowHook) -> RowHookHandle:
    """Call `hook` on every (token, expert) row of `experts` until the handle is removed; hooks run in order."""
    if not is_experts_module(experts):
        raise CNAError(f"{type(experts).__name__} is not a transformers experts module")
    hooks = experts.__dict__.get(_HOOKS)
    if hooks is None:
        if "forward" in experts.__dict__:
            raise CNAError("these experts already run a patched forward; remove that patch first")
        hooks = experts.__dict__[_HOOKS] = {}
        try:
            experts.forward = _hooked_forward(experts)
        except BaseException:
            del experts.__dict__[_HOOKS]
            raise
    key = next(_next_key)
    hooks[key] = hook
    return RowHookHandle(experts, key)


# ------------------------------------------------------------------------------------------- the adapter


class MoEAdapter:
    """The neuron sites of a mixture-of-experts causal LM, with the ModelAdapter interface for ordinary neurons.

    widths[l] is layer l's ordinary neurons (dense MLP or shared expert; 0 when the layer has only
    routed experts); the routed neurons of layer l are num_experts x expert_width more.
    """

    spec = None  # no fused-kernel description: MoE layers take the hook path

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        self.model = model
        self.model_type: str = getattr(config, "model_type", "unknown")
        self.blocks = next((module for module in model.modules() if isinstance(module, nn.ModuleList)
                            and len(module) and find_layer(module[0]) is not None), None)
        if self.blocks is None:
            raise UnsupportedArchitectureError(f"cannot find the decoder layers of this {self.model_type} model")
        self.layers = [find_layer(block) for block in self.blocks]
        if any(layer is None for layer in self.layers):
            raise UnsupportedArchitectureError(f"some decoder layers of this {self.model_type} model have no MLP")
        self.routed_layers = [index for index, layer in enumerate(self.layers) if layer.experts is not None]
        shapes = {(self.layers[index].num_experts, self.layers[index].expert_width) for index in self.routed_layers}
        if len(shapes) != 1:
            raise UnsupportedArchitectureError(f"MoE layers with different expert counts or widths: {sorted(shapes)}")
        self.num_experts, self.expert_width = shapes.pop()
        self.widths = [layer.ordinary_width for layer in self.layers]
        self.activation = "moe"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_routed(self) -> int:
        return len(self.routed_layers) * self.num_experts * self.expert_width

    @property
    def num_neurons(self) -> int:
        """All neurons of all layers: dense, shared and routed."""
        return sum(self.widths) + self.num_routed

    def neurons_in(self, layers) -> int:
        """How many neurons (ordinary and routed) the given layers hold together."""
        return sum(self.widths[layer] + (self.num_experts * self.expert_width if layer in self.routed_layers else 0)
                   for layer in layers)

    @property
    def d_ff(self) -> int:
        raise UnsupportedArchitectureError("an MoE model has no single MLP width: use widths, num_experts and "
                                           "expert_width")

    @property
    def body(self) -> nn.Module:
        return self.model.base_model

    def ordinary_layers(self) -> list[int]:
        return [index for index, width in enumerate(self.widths) if width]

    def neuron_site(self, layer: int) -> nn.Module:
        """The down projection holding layer `layer`'s ordinary neurons (dense MLP or shared expert)."""
        site = self.layers[layer].ordinary
        if site is None:
            raise CNAError(f"layer {layer} has only routed experts: its neurons are (layer, expert, neuron)")
        return site

    def experts(self, layer: int) -> nn.Module:
        experts = self.layers[layer].experts
        if experts is None:
            raise CNAError(f"layer {layer} is a dense layer: it has no routed experts")
        return experts

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].block

    def layer_device(self, layer: int) -> torch.device:
        return next(self.layers[layer].block.parameters()).device

    def mlp_output_weights(self, layer: int) -> list[torch.Tensor]:
        """The weights of layer `layer`'s MLP that write into the residual stream: the ordinary down projection's
        (dense MLP or shared expert) and the routed experts' 3-D down projection, biases included."""
        ordinary, experts = self.layers[layer].ordinary, self.layers[layer].experts
        weights = list(ordinary.parameters()) if ordinary is not None else []
        if experts is not None:
            weights.append(experts.down_proj)
            if experts.has_bias:
                weights.append(experts.down_proj_bias)
        return weights

    def architecture(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "num_layers": self.num_layers, "d_ff": list(self.widths),
                "experts": {"layers": list(self.routed_layers), "num_experts": self.num_experts,
                            "width": self.expert_width}}
