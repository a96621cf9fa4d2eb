"""Run a model's MLPs with the fused elementwise kernels in the middle.

The gate and up projections run as the model has them (nn.Linear, GPT-2's Conv1D, bitsandbytes
quantized linears), so only the elementwise part is fused: act(gate) * up plus capture or scaling,
then the model's own down projection. The context managers swap MLP forwards for fused ones and
put the originals back exactly on exit, exceptions included.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Union

import torch
from torch import nn

from ..errors import CNAError, UnsupportedArchitectureError
from ..kernels import (LayerMoments, act_and_capture, act_and_scale, act_and_scale_sparse, activation_kind,
                       apply_activation, backend_for, forced_backend)
from ..hooks import HookSet
from . import get_adapter
from .adapters import ModelAdapter

Elementwise = Callable[[torch.Tensor, Union[torch.Tensor, None]], torch.Tensor]
LayerScale = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
_ACTIVATION_ATTRIBUTES = ("act_fn", "act", "activation_fn")  # Llama-likes, GPT-2 / NeoX, Phi / Phi-3
_PATCH_MARK = "_cna_fast_fused"


def _backend_error(error: Exception) -> CNAError:
    return CNAError(f"{error}; unset CNA_FAST_BACKEND (or set it to torch) to use the plain torch path")


def check_backend_setting() -> None:
    """Fail early, before a model loads, when CNA_FAST_BACKEND asks for something this machine cannot do."""
    try:
        if forced_backend() == "triton":
            backend_for(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, RuntimeError) as error:
        raise _backend_error(error) from None


def fused_backend(adapter: ModelAdapter, layer: int) -> str:
    """"triton" when `layer`'s MLP should run the fused kernels, else "torch" (hooks)."""
    try:
        return backend_for(next(adapter.mlp(layer).parameters()))
    except (ValueError, RuntimeError) as error:
        raise _backend_error(error) from None


@dataclass(frozen=True)
class FusedMLP:
    """One MLP's projections with a fused elementwise step between them.

    gate: gate projection of gated MLPs with separate gate and up; None otherwise.
    up: up projection, fused gate+up projection (Phi-3), or the plain MLP's input projection.
    down: the down projection (the neuron site). dropout: applied after it (GPT-2), or None.
    activation: the activation kind ("silu", "gelu", "gelu_tanh", "relu").
    """

    gate: nn.Module | None
    up: nn.Module
    down: nn.Module
    fused_gate_up: bool
    dropout: nn.Module | None
    activation: str

    @classmethod
    def from_adapter(cls, adapter: ModelAdapter, layer: int) -> "FusedMLP":
        spec, mlp = adapter.spec, adapter.mlp(layer)
        prefix = spec.down.rsplit(".", 1)[0] + "."  # spec paths start at the block; the MLP is at `prefix`

        def projection(path: str) -> nn.Module:
            return mlp.get_submodule(path.removeprefix(prefix))

        try:
            kind = activation_kind(adapter.activation)
        except ValueError as error:
            raise UnsupportedArchitectureError(f"{error}; use the torch backend (CNA_FAST_BACKEND=torch)") from None
        _check_activation_module(mlp, kind)
        dropout = getattr(mlp, "dropout", None)
        return cls(gate=projection(spec.gate) if spec.gate else None, up=projection(spec.up),
                   down=adapter.neuron_site(layer), fused_gate_up=spec.fused_gate_up,
                   dropout=dropout if isinstance(dropout, nn.Module) else None, activation=kind)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gate and up ([..., d_ff]; up is None for plain MLPs), from the model's own projections."""
        if self.fused_gate_up:
            gate, up = self.up(x).chunk(2, dim=-1)
            return gate, up
        if self.gate is not None:
            return self.gate(x), self.up(x)
        return self.up(x), None

    def forward(self, x: torch.Tensor, elementwise: Elementwise) -> torch.Tensor:
        """The MLP's output with `elementwise(gate, up)` ([rows, d_ff] each) producing the neurons."""
        gate, up = self.gate_up(x)
        width = gate.shape[-1]
        neurons = elementwise(gate.reshape(-1, width), None if up is None else up.reshape(-1, width))
        out = self.down(neurons.view(gate.shape))
        return out if self.dropout is None else self.dropout(out)


def _check_activation_module(mlp: nn.Module, kind: str) -> None:
    """Refuse a config activation name that disagrees with what the MLP actually computes."""
    module = next((getattr(mlp, name) for name in _ACTIVATION_ATTRIBUTES if hasattr(mlp, name)), None)
    if module is None:
        return
    probe = torch.linspace(-8.0, 8.0, 161)
    if not torch.allclose(module(probe), apply_activation(probe, kind), rtol=1e-4, atol=1e-4):
        raise UnsupportedArchitectureError(f"the MLP's activation {type(module).__name__} does not compute {kind!r}, "
                                           "the kind named by the model config")


@contextmanager
def _patched_forwards(model: nn.Module,
                      forwards: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace each layer's MLP forward for the duration of the block; restore the exact previous state."""
    adapter = get_adapter(model)
    with HookSet() as hooks:
        for layer, forward in forwards.items():
            mlp = adapter.mlp(layer)
            if getattr(mlp.__dict__.get("forward"), _PATCH_MARK, False):
                raise CNAError(f"layer {layer}'s MLP already runs a fused forward; exit that patch first")
            setattr(forward, _PATCH_MARK, True)
            hooks.replace_forward(mlp, forward)
        yield


def _check_layer(adapter: ModelAdapter, layer: int) -> None:
    if not 0 <= layer < adapter.num_layers:
        raise CNAError(f"layer {layer} is out of range: the model has {adapter.num_layers} layers")


@contextmanager
def patched_capture(model: nn.Module, stats_per_layer: Mapping[int, LayerMoments],
                    labels: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block, the listed layers' MLPs run `act_and_capture`: same outputs, and statistics.

    stats_per_layer: layer -> its LayerMoments (on that layer's device, width d_ff), updated in place.
    labels: called at every patched MLP forward; returns one label per token of the current batch
    ([batch, seq] or [batch * seq]): 0 negative, 1 positive, -1 skip (e.g. all but the last token).
    """
    adapter = get_adapter(model)
    for layer, moments in stats_per_layer.items():
        _check_layer(adapter, layer)
        if moments.mean.shape != (2, adapter.widths[layer]):
            raise CNAError(f"layer {layer} has {adapter.widths[layer]} neurons; its statistics have shape "
                           f"{list(moments.mean.shape)}")
        if moments.mean.device != adapter.layer_device(layer):
            raise CNAError(f"layer {layer}'s statistics must be on its device {adapter.layer_device(layer)}, "
                           f"not {moments.mean.device}")

    def capture_forward(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        fused, moments = FusedMLP.from_adapter(adapter, layer), stats_per_layer[layer]

        def elementwise(gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
            row_labels = labels().reshape(-1).to(gate.device)
            if row_labels.numel() != gate.shape[0]:
                raise CNAError(f"labels() gave {row_labels.numel()} labels for {gate.shape[0]} tokens; "
                               "give one label per token")
            return act_and_capture(gate, up, fused.activation, row_labels, moments.count, moments.mean, moments.m2)

        return lambda x: fused.forward(x, elementwise)

    with _patched_forwards(model, {layer: capture_forward(layer) for layer in stats_per_layer}):
        yield


def _row_tables(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Table index per token: [batch * seq] as given, or [batch] repeated over each row's tokens."""
    index = index.to(x.device)
    if x.dim() == 3 and index.shape == (x.shape[0],):
        index = index[:, None].expand(x.shape[:2])
    return index.reshape(-1)


@contextmanager
def patched_scale(model: nn.Module, layer_scales: Mapping[int, LayerScale],
                  table_index: Callable[[], torch.Tensor] | None = None) -> Iterator[None]:
    """Inside the block, the listed layers' MLPs scale their neurons in the fused kernel (steering).

    layer_scales: layer -> a dense scale [d_ff] or table [n_tables, d_ff], or a sparse pair
    (neurons [k] distinct indices, multipliers [k] or [n_tables, k]).
    table_index: needed when any scale is a table; called at every patched forward, returns each
    row's table as [batch] (one per sequence) or [batch * seq] (one per token).
    """
    adapter = get_adapter(model)

    def scale_forward(layer: int, scale: LayerScale) -> Callable[[torch.Tensor], torch.Tensor]:
        _check_layer(adapter, layer)
        fused, width, device = FusedMLP.from_adapter(adapter, layer), adapter.widths[layer], adapter.layer_device(layer)
        if isinstance(scale, torch.Tensor):
            neurons, factors = None, scale.to(device, torch.float32)
            if factors.dim() not in (1, 2) or factors.shape[-1] != width:
                raise CNAError(f"layer {layer}'s scale must be [{width}] or [n_tables, {width}], "
                               f"got {list(factors.shape)}")
        else:
            neurons, factors = scale[0].to(device, torch.int64), scale[1].to(device, torch.float32)
            if neurons.dim() != 1 or factors.dim() not in (1, 2) or factors.shape[-1] != neurons.numel():
                raise CNAError(f"layer {layer}: neurons must be [k] and multipliers [k] or [n_tables, k], got "
                               f"{list(neurons.shape)} and {list(factors.shape)}")
            if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= width
                                    or neurons.unique().numel() != neurons.numel()):
                raise CNAError(f"layer {layer}: neurons must be distinct indices in 0..{width - 1}")
        if factors.dim() == 2 and table_index is None:
            raise CNAError(f"layer {layer} has a scale table: pass table_index")

        def elementwise(gate: torch.Tensor, up: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
            rows = _row_tables(table_index(), x) if factors.dim() == 2 else None
            if neurons is None:
                return act_and_scale(gate, up, fused.activation, factors, rows)
            return act_and_scale_sparse(gate, up, fused.activation, neurons, factors, rows)

        return lambda x: fused.forward(x, lambda gate, up: elementwise(gate, up, x))

    with _patched_forwards(model, {layer: scale_forward(layer, scale) for layer, scale in layer_scales.items()}):
        yield
