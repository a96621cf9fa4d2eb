"""Models: loading (embedded default, folders, hub ids, GGUF, quantization, device maps), where each
architecture keeps its MLP neurons, and the hooked experts forward of mixture-of-experts models.

`get_adapter` makes the dense / mixture-of-experts choice, once, for every stage after this one.
"""
import torch
from torch import nn

from .adapters import (ARCHITECTURES, ArchSpec, ModelAdapter, attention_output_projection, cache_keyword, find_cache,
                       residual_writers)
from .gguf_files import cache_dir, gguf_source
from .loading import DEFAULT_MODEL_NAME, default_gguf_path, default_model_dir, load_model, model_name
from .moe import MoEAdapter, is_moe_model

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "DEFAULT_MODEL_NAME",
    "MoEAdapter",
    "ModelAdapter",
    "attention_output_projection",
    "cache_dir",
    "cache_keyword",
    "default_gguf_path",
    "default_model_dir",
    "find_cache",
    "get_adapter",
    "input_device",
    "gguf_source",
    "is_moe",
    "load_model",
    "model_name",
    "residual_writers",
]


def get_adapter(model: nn.Module) -> ModelAdapter | MoEAdapter:
    """The adapter of `model` (an MoEAdapter for mixture-of-experts models), built once and kept on the model."""
    adapter = getattr(model, "_cna_fast_adapter", None)
    if adapter is None:
        adapter = MoEAdapter(model) if is_moe_model(model) else ModelAdapter(model)
        object.__setattr__(model, "_cna_fast_adapter", adapter)
    return adapter


def is_moe(model_or_adapter) -> bool:
    """Whether a model (or its adapter) is a mixture of experts."""
    adapter = model_or_adapter if isinstance(model_or_adapter, (ModelAdapter, MoEAdapter)) else get_adapter(
        model_or_adapter)
    return isinstance(adapter, MoEAdapter)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the device of its input embeddings (the first shard under a device_map)."""
    return get_adapter(model).body.get_input_embeddings().weight.device
