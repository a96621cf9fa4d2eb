"""Fused Triton kernels for capture and steering, each beside its torch reference, and the dispatch.

Public functions pick the backend per call (`backend_for`): Triton on CUDA, torch elsewhere.
Triton is optional: without it every call takes the torch path. This package depends on torch and
Triton only; patching a model's MLPs with these kernels lives in `cna_fast.models.fused`.
"""
from .activations import ACTIVATION_KINDS, activation_kind, apply_activation
from .capture import LayerMoments, act_and_capture_torch, act_and_capture_triton
from .dispatch import BACKEND_ENV, act_and_capture, act_and_scale, act_and_scale_sparse, backend_for, forced_backend
from .scale import (act_and_scale_sparse_torch, act_and_scale_sparse_triton, act_and_scale_torch,
                    act_and_scale_triton)

__all__ = [
    "ACTIVATION_KINDS",
    "BACKEND_ENV",
    "LayerMoments",
    "act_and_capture",
    "act_and_capture_torch",
    "act_and_capture_triton",
    "act_and_scale",
    "act_and_scale_sparse",
    "act_and_scale_sparse_torch",
    "act_and_scale_sparse_triton",
    "act_and_scale_torch",
    "act_and_scale_triton",
    "activation_kind",
    "apply_activation",
    "backend_for",
    "forced_backend",
]
