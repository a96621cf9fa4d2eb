"""Steer routed-expert neurons: scale h_ej wherever expert e runs, through row hooks in the experts' forward.

The router is untouched (routing is decided before the hook), nothing is written to any weight,
and removing the hooks restores the experts' own forward. Multipliers are per circuit, or per
batch row and circuit, as for dense neurons; a neuron in several circuits gets the product.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .circuit import Circuit
from .errors import CNAError
from .hooks import HookSet
from .models.moe import MoEAdapter, row_hook


class _ExpertScale:
    """One layer's routed circuit neurons (expert, neuron) pairs and their scale [k] or [rows, k]."""

    def __init__(self, experts: torch.Tensor, neurons: torch.Tensor, scale: torch.Tensor) -> None:
        self.experts, self.neurons, self.scale = experts, neurons, scale
        self._on_device: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = (self.experts.to(device), self.neurons.to(device),
                                    self.scale.to(device=device, dtype=dtype))
        return self._on_device[key]


def expert_scales(circuits: Sequence[Circuit], multipliers: torch.Tensor) -> dict[int, _ExpertScale]:
    """Per MoE layer, the union of the circuits' routed neurons and the product of their multipliers."""
    per_row = multipliers.dim() == 2
    scales: dict[int, _ExpertScale] = {}
    routed = [circuit.routed for circuit in circuits]
    layers = torch.cat([circuit.layers[mask] for circuit, mask in zip(circuits, routed)]).unique().tolist()
    for layer in layers:
        keys = [(circuit.experts * (1 << 32) + circuit.neurons)[mask & (circuit.layers == layer)]
                for circuit, mask in zip(circuits, routed)]
        union = torch.cat(keys).unique()
        scale = torch.ones((multipliers.shape[0], union.numel()) if per_row else (union.numel(),))
        for column, members in enumerate(keys):
            inside = torch.isin(union, members)
            factor = multipliers[..., column]
            scale[..., inside] *= factor[:, None] if per_row else factor
        scales[layer] = _ExpertScale(union >> 32, union & ((1 << 32) - 1), scale)
    return scales


class BatchRows:
    """The batch size of the current forward, for shared experts that see its tokens as [rows * seq, width]."""

    rows = 0

    def unflatten(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows * seq, width] -> a [rows, seq, width] view (other shapes unchanged)."""
        return hidden.view(self.rows, -1, hidden.shape[-1]) if hidden.dim() == 2 and self.rows else hidden

    def pre_hook(self, module, args, kwargs) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        self.rows = (inputs if inputs is not None else kwargs.get("inputs_embeds")).shape[0]


def install_moe_steering(adapter: MoEAdapter, circuits: Sequence[Circuit], multipliers: torch.Tensor,
                         hooks: HookSet, backend: str, phase: Callable[[], tuple[str, int]]) -> BatchRows:
    """Everything steering adds on an MoE model besides the ordinary neurons' pre-hooks; returns the row tracker."""
    if backend == "triton":
        warnings.warn("the fused Triton kernels do not cover mixture-of-experts layers: steering takes the hook path",
                      stacklevel=4)
    rows = BatchRows()
    hooks.pre_hook(adapter.body, rows.pre_hook, with_kwargs=True)
    install_routed_steering(adapter, expert_scales(circuits, multipliers), hooks, phase)
    return rows


def install_routed_steering(adapter: MoEAdapter, scales: dict[int, _ExpertScale], hooks: HookSet,
                            phase: Callable[[], tuple[str, int]]) -> None:
    """Row hooks (removed with `hooks`) that scale the routed circuit neurons of each layer in `scales`.

    phase: returns (positions mode, how many leading positions of the current forward are prompt).
    """
    for layer, entry in scales.items():
        batch_shape: dict[str, tuple[int, int]] = {}
        hooks.pre_hook(adapter.mlp(layer), _shape_recorder(batch_shape))
        hooks.enter(row_hook(adapter.experts(layer), _scaling_hook(entry, batch_shape, phase)))


def _shape_recorder(batch_shape: dict[str, tuple[int, int]]):
    """Pre-hook on the MoE block: (rows, tokens per row) of the current forward (the experts see them flattened)."""
    def hook(module, args):
        hidden = args[0]
        batch_shape["current"] = tuple(hidden.shape[:2]) if hidden.dim() == 3 else (1, hidden.shape[0])

    return hook


def _scaling_hook(entry: _ExpertScale, batch_shape: dict[str, tuple[int, int]], phase: Callable[[], tuple[str, int]]):
    def hook(h: torch.Tensor, experts: torch.Tensor, tokens: torch.Tensor, routing: torch.Tensor) -> None:
        entry_experts, neurons, scale = entry.tensors(h.device, h.dtype)
        rows, which = (experts[:, None] == entry_experts[None, :]).nonzero(as_tuple=True)
        positions, prompt_part = phase()
        if positions != "all" or scale.dim() == 2:
            batch, length = batch_shape["current"]
            token = tokens[rows]
            if positions != "all":
                keep = (token % length < prompt_part) if positions == "prompt" else (token % length >= prompt_part)
                rows, which, token = rows[keep], which[keep], token[keep]
            if scale.dim() == 2:
                if batch != scale.shape[0]:
                    raise CNAError(f"per-row multipliers have {scale.shape[0]} rows but the batch has {batch}: "
                                   "pass multipliers of shape [batch, n_circuits]")
                factor = scale[token // length, which]
            else:
                factor = scale[which]
        else:
            factor = scale[which]
        columns = neurons[which]
        h[rows, columns] = h[rows, columns] * factor  # (row, column) pairs are distinct: one expert per row

    return hook
