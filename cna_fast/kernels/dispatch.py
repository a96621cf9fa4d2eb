"""Pick the Triton kernel or its torch reference for each call.

Triton runs on CUDA tensors when it is installed; everything else takes the torch path. The
environment variable CNA_FAST_BACKEND=torch|triton forces a choice; forcing Triton for CPU tensors
works only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""
from __future__ import annotations

import os

import torch

from . import capture as _capture
from . import scale as _scale
from ._triton import INTERPRETER, TRITON_AVAILABLE

BACKEND_ENV = "CNA_FAST_BACKEND"
BACKENDS = ("torch", "triton")


def forced_backend() -> str | None:
    """The backend CNA_FAST_BACKEND forces ("torch" or "triton"), or None when it is unset or empty."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)} (or unset), got {forced!r}")
    return forced or None


def backend_for(tensor: torch.Tensor) -> str:
    """"triton" or "torch" for kernels whose inputs live where `tensor` does."""
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError(f"{BACKEND_ENV}=triton but the `triton` package is not installed")
        if not tensor.is_cuda and not INTERPRETER:
            raise RuntimeError(f"{BACKEND_ENV}=triton needs CUDA tensors (got {tensor.device}); to run the kernels "
                               "on CPU set TRITON_INTERPRET=1 before triton is imported")
        return "triton"
    return "triton" if tensor.is_cuda and TRITON_AVAILABLE else "torch"


def act_and_capture(gate: torch.Tensor, up: torch.Tensor | None, activation: str, labels: torch.Tensor,
                    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """h = act(gate) * up, with rows labeled 0 / 1 folded into side 0 / 1 of count, mean, m2 (in place).

    See `act_and_capture_torch` for the argument shapes.
    """
    if backend_for(gate) == "triton":
        return _capture.act_and_capture_triton(gate, up, activation, labels, count, mean, m2)
    return _capture.act_and_capture_torch(gate, up, activation, labels, count, mean, m2)


def act_and_scale(gate: torch.Tensor, up: torch.Tensor | None, activation: str, scale: torch.Tensor | None,
                  table_index: torch.Tensor | None = None) -> torch.Tensor:
    """h = act(gate) * up * scale; scale [d_ff], or [n_tables, d_ff] with table_index [rows]."""
    if backend_for(gate) == "triton":
        return _scale.act_and_scale_triton(gate, up, activation, scale, table_index)
    return _scale.act_and_scale_torch(gate, up, activation, scale, table_index)


def act_and_scale_sparse(gate: torch.Tensor, up: torch.Tensor | None, activation: str, neurons: torch.Tensor,
                         multipliers: torch.Tensor, table_index: torch.Tensor | None = None) -> torch.Tensor:
    """h = act(gate) * up with columns `neurons` [k] scaled by multipliers [k] (or [n_tables, k] per row)."""
    if backend_for(gate) == "triton":
        return _scale.act_and_scale_sparse_triton(gate, up, activation, neurons, multipliers, table_index)
    return _scale.act_and_scale_sparse_torch(gate, up, activation, neurons, multipliers, table_index)
