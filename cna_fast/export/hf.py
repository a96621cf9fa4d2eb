"""Hugging Face exports: a circuit at a fixed multiplier as a folded checkpoint or a PEFT LoRA adapter.

Scaling neuron j of layer l by m is the same as scaling column j of that layer's down projection
by m (the bias is untouched), so a fixed-multiplier circuit can be folded into the weights, or
added as a low-rank update: A = one-hot rows of the circuit neurons, B = (m - 1) * W_down[:, neurons],
so that W + B A scales exactly those columns.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..circuit import Circuit, as_multiplier
from ..errors import CNAError
from ..models import get_adapter, model_name
from ..models.moe import expert_columns, scale_expert_columns
from ..paths import EXPORT_MARKER as _STEERING_FILE
from ..paths import OutputFolder
from ..steering import check_multiplier_fits
from .serving import check_lora_rank_for_vllm, check_vllm_adapter


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module.weight, "quant_state") or type(module).__name__ in ("Linear8bitLt", "Linear4bit")


def weight_columns(module: nn.Module, neurons: torch.Tensor) -> torch.Tensor:
    """Columns `neurons` of the down projection's [out, in] weight, as float32 on the CPU.

    Quantized (bitsandbytes) weights are read back through the module itself: its outputs for
    one-hot inputs, minus its output for zero, are exactly the columns it multiplies with. This
    holds for any storage format (bitsandbytes re-packs 4-bit weights for its CPU kernel, which
    generic dequantization helpers do not read correctly).
    """
    if _is_quantized(module):
        in_features = int(module.in_features)
        device = module.weight.device
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        if hasattr(module.weight, "quant_state") and module.weight.quant_state is not None:
            dtype = module.weight.quant_state.dtype
        probes = torch.zeros(neurons.numel() + 1, in_features, dtype=dtype, device=device)
        probes[torch.arange(neurons.numel()), neurons.to(device)] = 1.0
        with torch.no_grad():
            outputs = module(probes).float()
        return (outputs[:-1] - outputs[-1]).T.cpu()
    weight = module.weight.detach()
    weight = weight.T if _is_conv1d(module) else weight
    return weight[:, neurons.to(weight.device)].float().cpu()


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a (possibly quantized) layer computes in; float32 if none is found."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The down projection's whole weight as a float32 [out, in] matrix (read back if quantized)."""
    in_features = getattr(module, "in_features", None) or module.nx
    return weight_columns(module, torch.arange(int(in_features)))


def _model_folder(model: nn.Module) -> str | None:
    """The local folder the model was loaded from, if any: an export must never replace it."""
    path = getattr(model.config, "_name_or_path", "") or ""
    return path if path and os.path.isdir(path) else None


def _check_finite(values: torch.Tensor, dtype: torch.dtype, multiplier: float, layer: int) -> None:
    """Scaled weights must stay finite in the dtype they are stored and computed in."""
    limit = torch.finfo(dtype).max
    if not torch.isfinite(values).all() or values.abs().max() > limit:
        raise CNAError(f"multiplier {multiplier:g} makes layer {layer}'s weights overflow {str(dtype)[6:]} "
                       f"(largest finite value {limit:.3g}): use a smaller multiplier")


def _provenance(model, circuit: Circuit, multiplier: float, kind: str) -> dict:
    return {"format": kind, "multiplier": multiplier, "base_model": model_name(model), "neurons": len(circuit),
            "circuit_meta": circuit.meta}


def export_folded(model: nn.Module, circuit: Circuit, multiplier: float, out_dir: str | os.PathLike, *,
                  tokenizer=None, force: bool = False) -> Path:
    """Write a Hugging Face checkpoint whose down-projection columns are scaled by `multiplier`.

    The model in memory is not modified: scaled copies replace the affected weights in the saved
    state dict only.
    """
    multiplier = as_multiplier(multiplier)
    output = OutputFolder(out_dir, force, inputs=[_model_folder(model)])
    circuit.validate(model)
    adapter = get_adapter(model)
    state = model.state_dict()
    names = {id(module): name for name, module in model.named_modules()}
    copied: set[str] = set()
    for (layer, expert), neurons in circuit.by_expert().items():
        experts = adapter.experts(layer)
        key = f"{names[id(experts)]}.down_proj"
        if key not in state or not state[key].is_floating_point():
            raise CNAError("a folded export needs full-precision expert weights; load the model unquantized")
        if key not in copied:  # scaled copies only: the model in memory keeps its weights
            state[key] = state[key].clone()
            copied.add(key)
        scale_expert_columns(state[key], experts.is_transposed, expert, neurons, multiplier)
    for layer, neurons in circuit.by_layer().items():
        down = adapter.neuron_site(layer)
        if _is_quantized(down):
            raise CNAError("a folded export needs full-precision weights; this model is quantized: use the LoRA "
                           "export, or load the model unquantized")
        key = f"{names[id(down)]}.weight"
        weight = state[key].clone()
        check_multiplier_fits(multiplier, weight.dtype)
        if _is_conv1d(down):
            weight[neurons.to(weight.device), :] *= multiplier
        else:
            weight[:, neurons.to(weight.device)] *= multiplier
        _check_finite(weight, weight.dtype, multiplier, layer)
        state[key] = weight
    with output as staging:
        model.save_pretrained(staging, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / _STEERING_FILE).write_text(json.dumps(_provenance(model, circuit, multiplier, "folded"), indent=2))
    return Path(out_dir)


def _expert_lora(adapter, by_expert: dict[tuple[int, int], torch.Tensor], multiplier: float, rank: int,
                 names: dict[int, str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """PEFT ParamWrapper tensors for the routed neurons, added to `tensors`; returns the target parameters.

    Per expert e the update is the dense one (A_e one-hot rows, B_e = (m - 1) D_e[:, neurons]). PEFT
    stores A as [r * E, width] with rows e * r + k, and B as [out, r * E] with columns k * E + e.
    """
    targets = []
    for layer in sorted({layer for layer, _ in by_expert}):
        experts = adapter.experts(layer)
        count, width = adapter.num_experts, adapter.expert_width
        out = experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1]
        lora_a = torch.zeros(rank * count, width, dtype=torch.float32)
        lora_b = torch.zeros(out, rank * count, dtype=torch.float32)
        for (owner, expert), neurons in by_expert.items():
            if owner != layer:
                continue
            slots = torch.arange(neurons.numel())
            lora_a[expert * rank + slots, neurons] = 1.0
            columns = expert_columns(experts, expert, neurons).float().cpu()  # [out, k]
            lora_b[:, slots * count + expert] = (multiplier - 1.0) * columns
        name = names[id(experts)]
        targets.append(f"{name}.down_proj")
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
    return targets


def export_lora(model: nn.Module, circuit: Circuit, multiplier: float, out_dir: str | os.PathLike, *,
                force: bool = False, check_vllm: bool = True) -> Path:
    """Write a PEFT LoRA adapter on the down projections that applies the circuit at `multiplier`.

    Rank r is the largest number of circuit neurons in one layer (layers with fewer get zero
    padding), lora_alpha = r so the scaling is 1. Quantized bases use the dequantized weight.
    Routed-expert neurons go into PEFT's LoRA on the 3-D expert down projections
    (`target_parameters`, one rank-r update per expert; r also covers the most neurons of one expert).
    check_vllm: refuse a rank above vLLM's maximum (512) and check the written adapter the way
        vLLM's loader does (`cna_fast.serving.check_vllm_adapter`); False allows any rank (PEFT only).
    """
    multiplier = as_multiplier(multiplier)
    output = OutputFolder(out_dir, force, inputs=[_model_folder(model)])
    circuit.validate(model)
    if len(circuit) == 0:
        raise CNAError("the circuit has no neurons: there is nothing to export")
    adapter = get_adapter(model)
    by_layer, by_expert = circuit.by_layer(), circuit.by_expert()
    rank = max(neurons.numel() for neurons in [*by_layer.values(), *by_expert.values()])
    if by_expert and check_vllm:
        raise CNAError("vLLM does not load LoRA on expert parameters: export routed-expert neurons with "
                       "check_vllm=False (a PEFT adapter for PeftModel) or use the folded export")
    if check_vllm:
        check_lora_rank_for_vllm(rank)
    names = {id(module): name for name, module in model.named_modules()}
    tensors, targets = {}, []
    conv1d = False
    for layer, neurons in by_layer.items():
        down = adapter.neuron_site(layer)
        conv1d = conv1d or _is_conv1d(down)
        columns = weight_columns(down, neurons)  # [out, k]
        lora_a = torch.zeros(rank, adapter.widths[layer], dtype=torch.float32)
        lora_a[torch.arange(neurons.numel()), neurons] = 1.0
        lora_b = torch.zeros(columns.shape[0], rank, dtype=torch.float32)
        lora_b[:, :neurons.numel()] = (multiplier - 1.0) * columns
        _check_finite(lora_b, _compute_dtype(down), multiplier, layer)
        name = names[id(down)]
        targets.append(name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model_name(model),
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "target_modules": targets,
        "target_parameters": _expert_lora(adapter, by_expert, multiplier, rank, names, tensors) or None,
        "fan_in_fan_out": conv1d, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None,
    }
    with output as staging:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (staging / _STEERING_FILE).write_text(json.dumps(_provenance(model, circuit, multiplier, "lora"), indent=2))
        if check_vllm:
            problems = check_vllm_adapter(staging, model=model).problems
            if problems:
                raise CNAError("the adapter would not load in vLLM: " + "; ".join(problems))
    return Path(out_dir)
