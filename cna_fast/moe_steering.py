"""Steer routed-expert neurons: scale h_ej wherever expert e runs, through row hooks in the experts' forward.

The router is untouched (routing is decided before the hook), nothing is written to any weight,
and removing the hooks restores the experts' own forward. Multipliers are per circuit, or per
batch row and circuit, as for dense neurons; a neuron in several circuits gets the product.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .circuit import Circuit
from .errors import CNAError
from .models.moe import MoEAdapter, register_row_hook


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


class RoutedSteering:
    """Row hooks that scale the routed circuit neurons; `positions` and the prompt length come from `phase`.

    phase: returns (positions mode, how many leading positions of the current forward are prompt).
    """

    def __init__(self, adapter: MoEAdapter, scales: dict[int, _ExpertScale],
                 phase: Callable[[], tuple[str, int]]) -> None:
        self.phase = phase
        self.handles = []
        self.batch_shape: dict[int, tuple[int, int]] = {}
        try:
            for layer, entry in scales.items():
                self.handles.append(adapter.mlp(layer).register_forward_pre_hook(self._shape_recorder(layer)))
                self.handles.append(register_row_hook(adapter.experts(layer), self._make_hook(layer, entry)))
        except BaseException:
            self.remove()
            raise

    def _shape_recorder(self, layer: int):
        def hook(module, args):
            hidden = args[0]
            self.batch_shape[layer] = tuple(hidden.shape[:2]) if hidden.dim() == 3 else (1, hidden.shape[0])

        return hook

    def _make_hook(self, layer: int, entry: _ExpertScale):
        def hook(h: torch.Tensor, experts: torch.Tensor, tokens: torch.Tensor, routing: torch.Tensor) -> None:
            entry_experts, neurons, scale = entry.tensors(h.device, h.dtype)
            rows, which = (experts[:, None] == entry_experts[None, :]).nonzero(as_tuple=True)
            positions, prompt_part = self.phase()
            if positions != "all" or scale.dim() == 2:
                batch, length = self.batch_shape[layer]
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

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
