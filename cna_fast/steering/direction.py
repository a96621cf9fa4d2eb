"""Directional ablation (Arditi et al., "Refusal in LLMs is mediated by a single direction"; what abliteration tools
optimize): the rival of a CNA circuit. One residual-stream direction is taken out of everything that writes into the
residual stream, at every position.

Strength `m` removes (1 - m) times the component along the unit direction r from each write, x <- x - (1 - m)(r.x) r:
from the input of the first decoder layer (the embeddings) and from the output of every attention and MLP block (or
of the norm after it, where a block normalizes its writes: Gemma 2/3, OLMo 2). m = 0 ablates the direction, m = 1 is
the unsteered model, m = -1 reflects it: strength 1 is the identity, as for every method of `compare_methods`.
Since each write is projected, every residual state (each layer's input, the input of every MLP) carries m times its
component along r, and in blocks without post-norms this equals editing the weights that write into the stream,
W <- W - (1 - m) r r^T W (embeddings, attention output projections, MLP down projections);
`ablation_changed_parameters` counts them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..circuit import Circuit
from ..errors import CNAError
from ..hooks import HookedSteering, HookSet
from ..models import attention_output_projection, get_adapter, residual_writers


def residual_width(model: nn.Module) -> int:
    """The residual stream's width: the input embeddings' dimension."""
    return int(get_adapter(model).body.get_input_embeddings().embedding_dim)


def _unit_direction(model: nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """`direction` as a float32 unit vector, checked against the model's residual width."""
    direction = torch.as_tensor(direction).detach()
    width = residual_width(model)
    if direction.dim() != 1 or direction.shape[0] != width:
        raise CNAError(f"the ablation direction has shape {tuple(direction.shape)}, but this model's residual stream "
                       f"is {width} wide: compute the direction on this model (residual_directions)")
    direction = direction.to(torch.float64).cpu()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise CNAError("the ablation direction is zero or not finite: compute it from two different prompt sets")
    return (direction / norm).float()


class AblateDirection(HookedSteering):
    """Directional ablation: remove (1 - strength) times the component along `direction` from every write into the
    residual stream, at every position, until removed.

    direction: [hidden], normalized here. strength: one number, or [batch] numbers (one per row, so one batch can
    carry several strengths and unsteered rows). Removing the hooks restores the model exactly (no weight changes).
    """

    def __init__(self, model: nn.Module, direction: torch.Tensor, strength: float | torch.Tensor = 0.0) -> None:
        strength = torch.as_tensor(strength, dtype=torch.float32).detach().cpu()
        if strength.dim() > 1 or not torch.isfinite(strength).all():
            raise CNAError("the ablation strength must be a finite number or a [batch] vector of finite numbers")
        unit = _unit_direction(model, direction)
        removal = 1.0 - strength
        adapter = get_adapter(model)
        with HookSet.building() as hooks:
            hooks.pre_hook(adapter.blocks[0], self._make_input_hook(unit, removal), with_kwargs=True)
            for block in adapter.blocks:
                for writer in residual_writers(block):
                    hooks.post_hook(writer, self._make_output_hook(unit, removal))
        self._hooks = hooks

    @staticmethod
    def _projector(unit: torch.Tensor, removal: torch.Tensor):
        """x -> x - removal * (unit . x) unit, with the component taken in float32; `removal` per row if a vector."""
        cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def project(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.device not in cache:
                cache[hidden.device] = (unit.to(hidden.device), removal.to(hidden.device))
            on_device, factor = cache[hidden.device]
            along = hidden.float() @ on_device
            if factor.dim():
                if factor.shape[0] != hidden.shape[0]:
                    raise CNAError(f"per-row ablation strengths have {factor.shape[0]} rows but the batch has "
                                   f"{hidden.shape[0]}")
                factor = factor.view(-1, *([1] * (along.dim() - 1)))
            return hidden - ((factor * along)[..., None] * on_device).to(hidden.dtype)

        return project

    @classmethod
    def _make_input_hook(cls, unit: torch.Tensor, removal: torch.Tensor):
        project = cls._projector(unit, removal)

        def hook(module, args, kwargs):
            if args:
                return (project(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": project(kwargs["hidden_states"])}

        return hook

    @classmethod
    def _make_output_hook(cls, unit: torch.Tensor, removal: torch.Tensor):
        project = cls._projector(unit, removal)

        def hook(module, args, output):
            if isinstance(output, tuple):  # attention modules return (output, weights, ...)
                return (project(output[0]), *output[1:])
            return project(output)

        return hook


def ablation_changed_parameters(model: nn.Module) -> int:
    """How many weights the weight-edit form of directional ablation changes: every entry of the token (and
    position) embeddings, of each attention output projection and of each MLP's down projection(s), biases included
    (W - r r^T W changes them all). A tied LM head is not counted (the edit unties it)."""
    adapter = get_adapter(model)
    tensors = [parameter for module in adapter.body.children() if isinstance(module, nn.Embedding)
               for parameter in module.parameters()]
    for layer, block in enumerate(adapter.blocks):
        tensors += list(attention_output_projection(block).parameters())
        tensors += adapter.mlp_output_weights(layer)
    return sum(tensor.numel() for tensor in {id(tensor): tensor for tensor in tensors}.values())


def circuit_changed_parameters(model: nn.Module, circuit: Circuit) -> int:
    """How many weights a circuit's folded form changes: one down-projection column (hidden entries) per neuron."""
    return len(circuit) * residual_width(model)
