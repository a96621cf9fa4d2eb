"""Apply circuits at inference: scale the circuit neurons' activations by a multiplier.

A forward pre-hook on each affected down projection multiplies the selected coordinates of its
input in place (only the circuit's columns are touched; no weight changes), so removing the hooks
restores the model exactly. Multipliers are per circuit, or per row and circuit, so one batch can
carry a whole multiplier sweep or requests with different steering.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import numbers
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from .batching import encode_prompts, pad_batch, pad_token_id
from .circuit import Circuit
from .errors import CNAError
from .hooks import HookSet
from .models import find_cache, get_adapter
from .models.fused import fused_backend, patched_scale
from .models.moe import MoEAdapter
from .moe_steering import install_moe_steering

POSITION_MODES = ("all", "prompt", "generated")


def _as_circuits(circuits: Circuit | Sequence[Circuit]) -> list[Circuit]:
    listed = [circuits] if isinstance(circuits, Circuit) else list(circuits)
    if not listed or not all(isinstance(circuit, Circuit) for circuit in listed):
        raise CNAError("steer() needs a Circuit or a non-empty list of Circuits")
    return listed


def as_multiplier(value: object) -> float:
    """One finite multiplier as a float (ints, floats, numpy scalars and 0-dim tensors accepted)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CNAError(f"multiplier must be a number, got {value!r}; for several values use multipliers=") from None
    if not math.isfinite(number):
        raise CNAError(f"multiplier must be a finite number, got {value!r}")
    return number


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


def _check_multipliers(multipliers: torch.Tensor, n_circuits: int) -> torch.Tensor:
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
    experts = circuit.experts if circuit.experts is not None else torch.full_like(circuit.layers, -1)
    return tuple(sorted(zip(circuit.layers.tolist(), experts.tolist(), circuit.neurons.tolist())))


class _LayerScale:
    """The neurons of one layer touched by any circuit, and their scale per row (or for all rows)."""

    def __init__(self, neurons: torch.Tensor, scale: torch.Tensor) -> None:
        self.neurons = neurons  # [k] sorted unique neuron indices
        self.scale = scale  # [k] or [rows, k]
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Index and scale tensors on `device` in `dtype`, built once per device."""
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = (self.neurons.to(device), self.scale.to(device=device, dtype=dtype))
        return self._on_device[key]


def _check_rows(rows: int, args, kwargs) -> None:
    """Refuse a forward whose batch does not have one row per row of the multiplier table."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    inputs = inputs if inputs is not None else kwargs.get("inputs_embeds")
    if inputs is not None and inputs.shape[0] != rows:
        raise CNAError(f"per-row multipliers have {rows} rows but the batch has {inputs.shape[0]}: pass "
                       "multipliers of shape [batch, n_circuits]")


class Steering:
    """Active steering on a model; a context manager, or call `remove()` when done."""

    def __init__(self, model: nn.Module, circuits: Circuit | Sequence[Circuit],
                 multipliers: float | Sequence[float] | torch.Tensor = 0.0, *, positions: str = "all",
                 allow_stacking: bool = False) -> None:
        self.model = model
        self.circuits = _as_circuits(circuits)
        if positions not in POSITION_MODES:
            raise CNAError(f"unknown positions {positions!r}: choose one of {', '.join(POSITION_MODES)}")
        self.positions = positions
        adapter = get_adapter(model)
        for circuit in self.circuits:
            circuit.validate(model)
        if isinstance(multipliers, numbers.Real):
            multipliers = [as_multiplier(multipliers)] * len(self.circuits)
        self.multipliers = _check_multipliers(multipliers, len(self.circuits))
        self.keys = [circuit_key(circuit) for circuit in self.circuits]
        if len(set(self.keys)) != len(self.keys) and not allow_stacking:
            raise CNAError("the same circuit is listed twice; pass allow_stacking=True to multiply its multipliers")
        active = _active(model)
        if not allow_stacking and any(key in other.keys for other in active for key in self.keys):
            raise CNAError("this circuit is already being applied to the model (nested steer); its multipliers would "
                           "multiply. Exit the outer steer first, or pass allow_stacking=True to mean it")
        if any(len(circuit) == 0 for circuit in self.circuits):
            raise CNAError("a circuit has no neurons: there is nothing to steer")
        self.layer_scales = self._layer_scales()
        self._prompt_length = 0  # tokens of the current forward's prompt (positions="prompt"/"generated")
        self._prompt_part = 0  # how many leading positions of the current forward belong to the prompt
        self._previous_ids: torch.Tensor | None = None
        self._moe_rows = None  # MoE models: rows of the current forward (shared experts see tokens flattened)
        check_multiplier_fits(self.multipliers, next(adapter.mlp(int(self.circuits[0].layers[0])).parameters()).dtype)
        # The fused MLP kernel scales on CUDA (CNA_FAST_BACKEND=triton) unless positions, fused already, or MoE.
        moe = isinstance(adapter, MoEAdapter)
        backend = fused_backend(adapter, int(self.circuits[0].layers[0]))
        self.fused = positions == "all" and backend == "triton" and not any(other.fused for other in active) and not moe
        with HookSet.building() as hooks:
            if moe:
                self._moe_rows = install_moe_steering(adapter, self.circuits, self.multipliers, hooks, backend,
                                                      lambda: (self.positions, self._prompt_part))
            if self.fused:
                self._enter_fused(model, hooks)
            else:
                for layer in self.layer_scales:
                    hooks.pre_hook(adapter.neuron_site(layer), self._make_hook(layer))
            if positions != "all":
                hooks.pre_hook(adapter.body, self._track_phase, with_kwargs=True)
        self._hooks = hooks
        active.append(self)

    @property
    def layers(self) -> dict[int, "_LayerScale"]:
        """Deprecated name of `layer_scales`."""
        warnings.warn("Steering.layers is deprecated: use Steering.layer_scales", DeprecationWarning, stacklevel=2)
        return self.layer_scales

    def _enter_fused(self, model: nn.Module, hooks: HookSet) -> None:
        """Patch the circuit layers' MLPs with act_and_scale_sparse; per-row tables index by batch row."""
        scales = {layer: (entry.neurons, entry.scale) for layer, entry in self.layer_scales.items()}
        if self.multipliers.dim() == 2:
            rows = self.multipliers.shape[0]
            hooks.pre_hook(get_adapter(model).body, lambda module, args, kwargs: _check_rows(rows, args, kwargs),
                           with_kwargs=True)
            table = torch.arange(rows)
            hooks.enter(patched_scale(model, scales, table_index=lambda: table))
        else:
            hooks.enter(patched_scale(model, scales))

    def _layer_scales(self) -> dict[int, _LayerScale]:
        """Merge all circuits per layer: a neuron in several circuits gets the product of their multipliers."""
        per_row = self.multipliers.dim() == 2
        layers: dict[int, _LayerScale] = {}
        all_layers = torch.cat([circuit.layers[~circuit.routed] for circuit in self.circuits]).unique().tolist()
        for layer in all_layers:
            neurons = torch.cat([circuit.neurons[~circuit.routed & (circuit.layers == layer)]
                                 for circuit in self.circuits]).unique()
            shape = (self.multipliers.shape[0], neurons.numel()) if per_row else (neurons.numel(),)
            scale = torch.ones(shape, dtype=torch.float32)
            for column, circuit in enumerate(self.circuits):
                members = torch.isin(neurons, circuit.neurons[~circuit.routed & (circuit.layers == layer)])
                factor = self.multipliers[..., column]
                scale[..., members] *= factor[:, None] if per_row else factor
            layers[layer] = _LayerScale(neurons, scale)
        return layers

    def _track_phase(self, module, args, kwargs):
        """Split the current forward's positions into prompt and generated tokens.

        The cache is found by its type, not by its keyword (transformers 5.25 renamed `past_key_values` to
        `cache`). A forward with an empty (or no) KV cache starts a new prompt, unless, without a cache, its
        input_ids extend the previous forward's exactly (generate with use_cache=False re-feeds
        the prompt plus the tokens generated so far). With a filled cache every position is new.
        """
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
                self._prompt_length = length
            self._previous_ids = ids if cache is None else None
        self._prompt_part = max(0, min(length, self._prompt_length - past))

    def _make_hook(self, layer: int):
        entry = self.layer_scales[layer]

        def hook(module, args):
            hidden = args[0]
            hidden = self._moe_rows.unflatten(hidden) if self._moe_rows is not None else hidden
            if self.positions == "prompt":
                hidden = hidden[:, :self._prompt_part]
            elif self.positions == "generated":
                hidden = hidden[:, self._prompt_part:]
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


def _active(model: nn.Module) -> list[Steering]:
    active = model.__dict__.get("_cna_fast_steering")
    if active is None:
        active = []
        model.__dict__["_cna_fast_steering"] = active
    return active


def steer(model: nn.Module, circuits: Circuit | Sequence[Circuit], multiplier: float = 0.0, *,
          multipliers: Sequence[float] | torch.Tensor | None = None, positions: str = "all",
          allow_stacking: bool = False) -> Steering:
    """Scale the circuit neurons' activations in every forward pass until removed.

    multiplier: one factor for every circuit (0 ablates, 1 is the identity, > 1 amplifies).
    multipliers: instead, [n_circuits] factors, or [batch, n_circuits] for a different factor per row.
    positions: "all" tokens, "prompt" tokens only, or "generated" tokens only (decode steps of generate).
    allow_stacking: permit applying a circuit that is already applied (the factors then multiply).

    Use as `with steer(model, circuit, 0.0): ...`, or keep the handle and call `remove()`.
    """
    if multipliers is None:
        multipliers = as_multiplier(multiplier)
    return Steering(model, circuits, multipliers, positions=positions, allow_stacking=allow_stacking)


def _checked_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a non-empty list of strings; a single string is an error, not a list of characters."""
    if isinstance(prompts, (str, bytes)):
        raise CNAError("prompts must be a list of strings, got a single string: pass [prompt]")
    try:
        prompts = list(prompts)
    except TypeError:
        raise CNAError(f"prompts must be a list of strings, got {type(prompts).__name__}") from None
    if not prompts:
        raise CNAError("no prompts to generate from")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise CNAError(f"prompts[{index}] is {type(prompt).__name__}, not a string: give text prompts")
    return prompts


def __getattr__(name: str):
    """`steering.generate_to_file` is the batch job (cna_fast.batch_job), imported on first use (it needs steering)."""
    if name == "generate_to_file":
        from .batch_job import generate_to_file

        return generate_to_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rows_for(multipliers: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    return None if multipliers is None or multipliers.dim() == 1 else multipliers[rows]


def _multiplier_table(circuits: list[Circuit] | None, multiplier: float, multipliers, n_prompts: int):
    """The checked multipliers for `generate`: [n_circuits] or [n_prompts, n_circuits]; None unsteered."""
    if circuits is None:
        return None
    table = _check_multipliers(multipliers if multipliers is not None else [as_multiplier(multiplier)] * len(circuits),
                               len(circuits))
    if table.dim() == 2 and table.shape[0] != n_prompts:
        raise CNAError(f"per-prompt multipliers have {table.shape[0]} rows for {n_prompts} prompts")
    return table


def _check_generation_inputs(prompts: object, batch_size: object, max_new_tokens: object) -> list[str]:
    prompts = _checked_prompts(prompts)
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CNAError(f"{name} must be a positive integer, got {value!r}")
    return prompts


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *,
             circuits: Circuit | Sequence[Circuit] | None = None, multiplier: float = 0.0,
             multipliers: Sequence[float] | torch.Tensor | None = None, positions: str = "all",
             max_new_tokens: int = 64, batch_size: int = 16, chat_template: bool | str | None = None,
             do_sample: bool = False, progress: bool = True,
             batch_context: Callable[[list[int]], ContextManager] | None = None,
             circuit: Circuit | Sequence[Circuit] | None = None, **generate_kwargs) -> list[str]:
    """Generate a completion per prompt, optionally steered; returns the new text in input order.

    Prompts go through the chat template (when the tokenizer has one and chat_template is not
    False), are sorted by length and left-padded in batches of `batch_size`.
    circuits: a Circuit or a list of them (`circuit=` is the deprecated name).
    multipliers: [n_circuits], or [len(prompts), n_circuits] for a different steering per prompt.
    batch_context: called with each batch's prompt indices; the context it returns wraps that
    batch's generation (e.g. a per-row CAA baseline).
    Extra keyword arguments go to `model.generate` (temperature, top_p, ...).
    """
    from tqdm.auto import tqdm

    if circuit is not None:
        if circuits is not None:
            raise CNAError("pass circuits= only (circuit= is its deprecated name)")
        warnings.warn("generate(circuit=) is deprecated: use circuits=", DeprecationWarning, stacklevel=2)
        circuits = circuit
    prompts = _check_generation_inputs(prompts, batch_size, max_new_tokens)
    circuits = None if circuits is None else _as_circuits(circuits)
    table = _multiplier_table(circuits, multiplier, multipliers, len(prompts))
    encoded = encode_prompts(tokenizer, prompts, chat_template)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    with contextlib.ExitStack() as stack, tqdm(total=len(prompts), desc="generate", unit="prompt",
                                               disable=not progress) as bar:
        if table is not None and table.dim() == 1:
            stack.enter_context(steer(model, circuits, multipliers=table, positions=positions))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            per_row = _rows_for(table, rows)
            with contextlib.ExitStack() as batch_stack:
                if per_row is not None:
                    batch_stack.enter_context(steer(model, circuits, multipliers=per_row, positions=positions))
                if batch_context is not None:
                    batch_stack.enter_context(batch_context(rows))
                texts = _generate_batch(model, tokenizer, [encoded[i] for i in rows], settings)
            for row, text in zip(rows, texts):
                outputs[row] = text
            bar.update(len(rows))
    return outputs


def _generate_batch(model: nn.Module, tokenizer, sequences: list[list[int]], settings: dict) -> list[str]:
    """Left-padded generation of one batch; returns each row's new text, stripped."""
    pad_id = pad_token_id(tokenizer)
    batch = pad_batch(sequences, [0] * len(sequences), pad_id, "left")
    device = get_adapter(model).body.get_input_embeddings().weight.device
    with torch.inference_mode():
        generated = model.generate(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                   pad_token_id=pad_id, **settings)
    texts = tokenizer.batch_decode(generated[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in texts]


class AddDirections:
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

    def remove(self) -> None:
        """Remove the hooks; the model is exactly as before."""
        self._hooks.close()

    def __enter__(self) -> "AddDirections":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def caa(model: nn.Module, circuit: Circuit, alpha: float | torch.Tensor) -> AddDirections:
    """Residual-stream CAA baseline from a circuit's stored MLP-output directions (see discover())."""
    if circuit.caa_directions is None:
        raise CNAError("this circuit has no CAA directions (made by an older cna_fast?): rediscover it")
    circuit.validate(model)
    return AddDirections(model, circuit.caa_layers, circuit.caa_directions, alpha)
