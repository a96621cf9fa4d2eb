"""Steer with circuits: scale the circuit neurons' activations by a multiplier in every forward pass.

A forward pre-hook on each affected down projection multiplies the selected coordinates of its
input in place (only the circuit's columns are touched; no weight changes), so removing the hooks
restores the model exactly. Multipliers are per circuit, or per row and circuit, so one batch can
carry a whole multiplier sweep or requests with different steering. This module steers ordinary
neurons (dense MLPs, shared experts); `steering.moe.MoESteering` adds the routed ones.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from ..circuit import Circuit, as_multiplier
from ..errors import CNAError, one_of
from ..hooks import HookSet
from ..models import find_cache, get_adapter, is_moe
from ..models.fused import fused_backend, patched_scale

POSITION_MODES = ("all", "prompt", "generated")


def validate_positions(positions: str) -> str:
    """`positions` if it names which tokens to steer: all, prompt or generated."""
    return one_of(positions, POSITION_MODES, "positions")


def as_circuits(circuits: Circuit | Sequence[Circuit]) -> list[Circuit]:
    """One circuit or a list of them, as a non-empty list."""
    listed = [circuits] if isinstance(circuits, Circuit) else list(circuits)
    if not listed or not all(isinstance(circuit, Circuit) for circuit in listed):
        raise CNAError("steer() needs a Circuit or a non-empty list of Circuits")
    return listed


def check_multiplier_fits(multipliers: float | torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse multipliers that are not finite in `dtype`, the dtype they are applied in."""
    values = torch.as_tensor(multipliers, dtype=torch.float64)
    if not dtype.is_floating_point or values.numel() == 0:
        return
    limit = torch.finfo(dtype).max
    largest = float(values.abs().max())
    if largest > limit:
        raise CNAError(f"multiplier {largest:g} is not finite in {str(dtype).removeprefix('torch.')} (its largest "
                       f"value is {limit:.4g}): use a multiplier of at most {limit:.3g} in magnitude")


def check_multipliers(multipliers: torch.Tensor, n_circuits: int) -> torch.Tensor:
    """Multipliers [n_circuits] or [rows, n_circuits], finite, as float32."""
    multipliers = torch.as_tensor(multipliers, dtype=torch.float64).detach().cpu()
    if multipliers.dim() == 1:
        if multipliers.shape[0] != n_circuits:
            raise CNAError(f"multipliers must have one value per circuit ({n_circuits}), got shape "
                           f"{list(multipliers.shape)}; for per-row steering pass [batch, {n_circuits}]")
    elif multipliers.dim() != 2 or multipliers.shape[1] != n_circuits or multipliers.shape[0] < 1:
        raise CNAError(f"multipliers must be [{n_circuits}] or [batch, {n_circuits}] (one column per circuit), "
                       f"got shape {list(multipliers.shape)}")
    if not torch.isfinite(multipliers).all():
        raise CNAError("multipliers must be finite numbers: got NaN or infinity")
    check_multiplier_fits(multipliers, torch.float32)
    return multipliers.float()


def circuit_key(circuit: Circuit) -> tuple:
    """Identity of a circuit's neuron set, to detect the same circuit applied twice."""
    return tuple(sorted(circuit.keys()))


class ScaleTable:
    """Steered coordinates of one site (index tensors, e.g. neurons) and their scale [k] or [rows, k]."""

    def __init__(self, index: tuple[torch.Tensor, ...], scale: torch.Tensor) -> None:
        self.index, self.scale = index, scale
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The index tensors and the scale on `device` (the scale in `dtype`), built once per device."""
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = (*(part.to(device) for part in self.index),
                                    self.scale.to(device=device, dtype=dtype))
        return self._on_device[key]

    @classmethod
    def merged(cls, members: Sequence[torch.Tensor], multipliers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of the circuits' keys at one site and its scale: a key in several circuits gets the product
        of their multipliers. members: one key tensor per circuit; multipliers [n_circuits] or [rows, n_circuits]."""
        union = torch.cat(list(members)).unique()
        per_row = multipliers.dim() == 2
        scale = torch.ones((multipliers.shape[0], union.numel()) if per_row else (union.numel(),))
        for column, keys in enumerate(members):
            factor = multipliers[..., column]
            scale[..., torch.isin(union, keys)] *= factor[:, None] if per_row else factor
        return union, scale


class Phase:
    """Which leading positions of the current forward belong to the prompt (for positions="prompt"/"generated").

    The cache is found by its type, not by its keyword (transformers 5.25 renamed `past_key_values` to
    `cache`). A forward with an empty (or no) KV cache starts a new prompt, unless, without a cache, its
    input_ids extend the previous forward's exactly (generate with use_cache=False re-feeds the prompt
    plus the tokens generated so far). With a filled cache every position is new.
    """

    def __init__(self) -> None:
        self.prompt_length = 0  # tokens of the current prompt
        self.prompt_part = 0  # how many leading positions of the current forward belong to the prompt
        self._previous_ids: torch.Tensor | None = None

    def track(self, module, args, kwargs) -> None:
        """A forward pre-hook (with kwargs) on the model body."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        length = (ids if ids is not None else embeds).shape[1]
        cache = find_cache(args, kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            previous = self._previous_ids
            continues = (cache is None and ids is not None and previous is not None
                         and ids.shape[0] == previous.shape[0] and ids.shape[1] > previous.shape[1]
                         and torch.equal(ids[:, :previous.shape[1]], previous))
            if not continues:
                self.prompt_length = length
            self._previous_ids = ids if cache is None else None
        self.prompt_part = max(0, min(length, self.prompt_length - past))


def check_rows(rows: int, args, kwargs) -> None:
    """Refuse a forward whose batch does not have one row per row of the multiplier table."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    inputs = inputs if inputs is not None else kwargs.get("inputs_embeds")
    if inputs is not None and inputs.shape[0] != rows:
        raise CNAError(f"per-row multipliers have {rows} rows but the batch has {inputs.shape[0]}: pass "
                       "multipliers of shape [batch, n_circuits]")


class Steering:
    """Active steering of ordinary neurons on a dense model; a context manager, or call `remove()` when done.

    Build it with `steer()` (or `steering_class(model)`), which picks MoESteering for mixture-of-experts models.
    """

    handles_moe = False

    def __init__(self, model: nn.Module, circuits: Circuit | Sequence[Circuit],
                 multipliers: float | Sequence[float] | torch.Tensor = 0.0, *, positions: str = "all",
                 allow_stacking: bool = False) -> None:
        self.model = model
        self.circuits = as_circuits(circuits)
        self.positions = validate_positions(positions)
        adapter = get_adapter(model)
        if is_moe(adapter) != self.handles_moe:
            raise CNAError(f"{type(self).__name__} does not steer this {adapter.model_type} model: use "
                           "cna_fast.steer(model, ...)")
        for circuit in self.circuits:
            circuit.validate(model)
        if isinstance(multipliers, numbers.Real):
            multipliers = [as_multiplier(multipliers)] * len(self.circuits)
        self.multipliers = check_multipliers(multipliers, len(self.circuits))
        active = _active(model)
        self.keys = [circuit_key(circuit) for circuit in self.circuits]
        _check_stacking(self.keys, active, allow_stacking)
        if any(len(circuit) == 0 for circuit in self.circuits):
            raise CNAError("a circuit has no neurons: there is nothing to steer")
        self.layer_scales = self._layer_scales()
        self.phase = Phase()
        check_multiplier_fits(self.multipliers, next(adapter.mlp(int(self.circuits[0].layers[0])).parameters()).dtype)
        backend = fused_backend(adapter, int(self.circuits[0].layers[0]))
        # The fused MLP kernel scales on CUDA (CNA_FAST_BACKEND=triton) unless positions or fused already.
        self.fused = self._fusable(backend) and not any(other.fused for other in active)
        with HookSet.building() as hooks:
            self._install(hooks, adapter)
            if positions != "all":
                hooks.pre_hook(adapter.body, self.phase.track, with_kwargs=True)
        self._hooks = hooks
        active.append(self)

    def _fusable(self, backend: str) -> bool:
        return self.positions == "all" and backend == "triton"

    def _install(self, hooks: HookSet, adapter) -> None:
        """The hooks (or fused MLP patches) that scale the ordinary circuit neurons."""
        if self.fused:
            self._enter_fused(hooks)
            return
        for layer in self.layer_scales:
            hooks.pre_hook(adapter.neuron_site(layer), self._make_hook(layer))

    def _enter_fused(self, hooks: HookSet) -> None:
        """Patch the circuit layers' MLPs with act_and_scale_sparse; per-row tables index by batch row."""
        scales = {layer: (entry.index[0], entry.scale) for layer, entry in self.layer_scales.items()}
        if self.multipliers.dim() == 2:
            rows = self.multipliers.shape[0]
            hooks.pre_hook(get_adapter(self.model).body, lambda module, args, kwargs: check_rows(rows, args, kwargs),
                           with_kwargs=True)
            table = torch.arange(rows)
            hooks.enter(patched_scale(self.model, scales, table_index=lambda: table))
        else:
            hooks.enter(patched_scale(self.model, scales))

    def _layer_scales(self) -> dict[int, ScaleTable]:
        """Merge all circuits per layer: a neuron in several circuits gets the product of their multipliers."""
        layers = torch.cat([circuit.layers[~circuit.routed] for circuit in self.circuits]).unique().tolist()
        scales = {}
        for layer in layers:
            members = [circuit.neurons[~circuit.routed & (circuit.layers == layer)] for circuit in self.circuits]
            neurons, scale = ScaleTable.merged(members, self.multipliers)
            scales[layer] = ScaleTable((neurons,), scale)
        return scales

    def _rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """A down projection's input as [rows, positions, width] (MoE shared experts see it flattened)."""
        return hidden

    def _make_hook(self, layer: int):
        entry = self.layer_scales[layer]

        def hook(module, args):
            hidden = self._rows(args[0])
            if self.positions == "prompt":
                hidden = hidden[:, :self.phase.prompt_part]
            elif self.positions == "generated":
                hidden = hidden[:, self.phase.prompt_part:]
            if hidden.numel() == 0:
                return None
            neurons, scale = entry.tensors(hidden.device, hidden.dtype)
            if scale.dim() == 2:
                if scale.shape[0] != hidden.shape[0]:
                    raise CNAError(f"per-row multipliers have {scale.shape[0]} rows but the batch has "
                                   f"{hidden.shape[0]}: pass multipliers of shape [batch, n_circuits]")
                scale = scale.view(scale.shape[0], *([1] * (hidden.dim() - 2)), scale.shape[1])
            hidden[..., neurons] *= scale  # in place on the view: only the circuit's columns are touched
            return None

        return hook

    def remove(self) -> None:
        """Remove the hooks (and fused MLP patches); the model is exactly as before."""
        self._hooks.close()
        active = _active(self.model)
        if self in active:
            active.remove(self)

    def __enter__(self) -> "Steering":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_stacking(keys: list[tuple], active: list[Steering], allow_stacking: bool) -> None:
    """The same circuit twice (in one call, or nested) multiplies its multipliers: only when asked for."""
    if allow_stacking:
        return
    if len(set(keys)) != len(keys):
        raise CNAError("the same circuit is listed twice; pass allow_stacking=True to multiply its multipliers")
    if any(key in other.keys for other in active for key in keys):
        raise CNAError("this circuit is already being applied to the model (nested steer); its multipliers would "
                       "multiply. Exit the outer steer first, or pass allow_stacking=True to mean it")


def _active(model: nn.Module) -> list[Steering]:
    active = model.__dict__.get("_cna_fast_steering")
    if active is None:
        active = []
        model.__dict__["_cna_fast_steering"] = active
    return active
