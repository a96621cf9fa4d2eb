"""The residual-stream baseline (CAA): add `alpha` times a direction to each listed layer's MLP output.

A circuit made by `discover` stores the directions (mean(positive) - mean(negative) of each
captured layer's MLP output); `caa(model, circuit, alpha)` applies them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..circuit import Circuit
from ..errors import CNAError
from ..hooks import HookedSteering, HookSet
from ..models import get_adapter


class AddDirections(HookedSteering):
    """CAA baseline: add `alpha * direction[layer]` to the MLP output of each listed layer, at every position.

    alpha: one factor, or [batch] factors (one per row). alpha 0 is the identity.
    """

    def __init__(self, model: nn.Module, layers: torch.Tensor, directions: torch.Tensor,
                 alpha: float | torch.Tensor) -> None:
        alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().cpu()
        if alpha.dim() > 1 or not torch.isfinite(alpha).all():
            raise CNAError("alpha must be a finite number or a [batch] vector of finite numbers")
        adapter = get_adapter(model)
        layers = [int(layer) for layer in torch.as_tensor(layers).reshape(-1).tolist()]
        if len(layers) != len(directions):
            raise CNAError(f"{len(layers)} CAA layers for {len(directions)} directions: give one direction per layer")
        for layer, direction in zip(layers, directions):  # every check before the first hook
            if not 0 <= layer < adapter.num_layers:
                raise CNAError(f"CAA direction for layer {layer}, but the model has {adapter.num_layers} layers")
            site = adapter.neuron_site(layer)
            width = getattr(site, "out_features", None) or getattr(site, "nf", None)
            if width is not None and direction.shape[-1] != width:
                raise CNAError(f"CAA direction for layer {layer} is {direction.shape[-1]} wide but the model's hidden "
                               f"size is {width}: rediscover the circuit on this model")
        with HookSet.building() as hooks:
            for layer, direction in zip(layers, directions):
                hooks.post_hook(adapter.neuron_site(layer), self._make_hook(direction, alpha))
        self._hooks = hooks

    @staticmethod
    def _make_hook(direction: torch.Tensor, alpha: torch.Tensor):
        cache: dict[tuple, torch.Tensor] = {}

        def hook(module, args, output):
            key = (output.device, output.dtype)
            if key not in cache:
                scaled = direction.to(output.device, torch.float32)
                cache[key] = (alpha.to(output.device)[:, None] * scaled if alpha.dim() else alpha * scaled)
            shift = cache[key]
            if shift.dim() == 2:
                if shift.shape[0] != output.shape[0]:
                    raise CNAError(f"per-row alphas have {shift.shape[0]} rows but the batch has {output.shape[0]}")
                shift = shift.view(shift.shape[0], *([1] * (output.dim() - 2)), shift.shape[1])
            return output + shift.to(output.dtype)

        return hook


def caa(model: nn.Module, circuit: Circuit, alpha: float | torch.Tensor) -> AddDirections:
    """Residual-stream CAA baseline from a circuit's stored MLP-output directions (see discover())."""
    if circuit.caa_directions is None:
        raise CNAError("this circuit has no CAA directions (made by an older cna_fast?): rediscover it")
    circuit.validate(model)
    return AddDirections(model, circuit.caa_layers, circuit.caa_directions, alpha)
