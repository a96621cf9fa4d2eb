"""Steer routed-expert neurons: scale h_ej wherever expert e runs, through row hooks in the experts' forward.

The router is untouched (routing is decided before the hook), nothing is written to any weight,
and removing the hooks restores the experts' own forward. Multipliers are per circuit, or per
batch row and circuit, as for dense neurons; a neuron in several circuits gets the product.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from ..circuit import Circuit
from ..errors import CNAError
from ..hooks import HookSet
from ..models import MoEAdapter
from ..models.moe import row_hook
from .scale import ScaleTable, Steering


class MoESteering(Steering):
    """Steering on a mixture-of-experts model: ordinary neurons as in `Steering`, routed neurons scaled inside
    the experts' forward. The fused kernels do not cover experts: steering takes the hook path."""

    handles_moe = True

    def _fusable(self, backend: str) -> bool:
        if backend == "triton":
            warnings.warn("the fused Triton kernels do not cover mixture-of-experts layers: steering takes the hook "
                          "path", stacklevel=4)
        return False

    def _install(self, hooks: HookSet, adapter: MoEAdapter) -> None:
        self._batch_rows = BatchRows()
        hooks.pre_hook(adapter.body, self._batch_rows.pre_hook, with_kwargs=True)
        install_routed_steering(adapter, expert_scales(self.circuits, self.multipliers), hooks,
                                lambda: (self.positions, self.phase.prompt_part))
        super()._install(hooks, adapter)

    def _rows(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._batch_rows.unflatten(hidden)


def expert_scales(circuits: Sequence[Circuit], multipliers: torch.Tensor) -> dict[int, ScaleTable]:
    """Per MoE layer, the union of the circuits' routed (expert, neuron) pairs and the product of their multipliers."""
    scales: dict[int, ScaleTable] = {}
    routed = [circuit.routed for circuit in circuits]
    layers = torch.cat([circuit.layers[mask] for circuit, mask in zip(circuits, routed)]).unique().tolist()
    for layer in layers:
        keys = [(circuit.experts * (1 << 32) + circuit.neurons)[mask & (circuit.layers == layer)]
                for circuit, mask in zip(circuits, routed)]
        union, scale = ScaleTable.merged(keys, multipliers)
        scales[layer] = ScaleTable((union >> 32, union & ((1 << 32) - 1)), scale)
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


def install_routed_steering(adapter: MoEAdapter, scales: dict[int, ScaleTable], hooks: HookSet,
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


def _scaling_hook(entry: ScaleTable, batch_shape: dict[str, tuple[int, int]], phase: Callable[[], tuple[str, int]]):
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
