"""A weight sample of a model: a few fixed entries of every down projection.

Architecture, depth and width do not tell a base model from its instruct fine-tune; a handful of
weight values does. The sample is compared with a tolerance of the coarser of the two dtypes'
rounding, so the same weights loaded in float32, bfloat16 or float16 still match. Quantized
layers are not sampled (their dequantized values differ from the original ones by design).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

SAMPLES_PER_LAYER = 4
_ABSOLUTE_TOLERANCE = 1e-7  # float16 subnormals
_RELATIVE_TOLERANCE = {"float64": 1e-12, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def _positions(layer: int, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed pseudo-random (row, column) positions of one layer's weight matrix."""
    k = torch.arange(SAMPLES_PER_LAYER, dtype=torch.int64)
    return (k * 7919 + layer * 104729 + 13) % rows, (k * 15485863 + layer * 31 + 7) % columns


def weight_sample(down_projs: list[nn.Module]) -> dict[str, Any] | None:
    """A few entries of every layer's down-projection weight ([out, in] view) and their dtype; None if quantized."""
    weights = [getattr(down, "weight", None) for down in down_projs]
    if not down_projs or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        return None  # e.g. experts stored as one 3-D parameter: not sampled
    key = tuple((id(weight), weight._version) for weight in weights)
    cached = getattr(down_projs[0], "_cna_fast_weight_sample", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    values, dtype = [], None
    for layer, (down, weight) in enumerate(zip(down_projs, weights)):
        if not weight.is_floating_point() or hasattr(weight, "quant_state") or type(down).__name__.startswith(
                ("Linear8bit", "Linear4bit")):
            return None
        matrix = weight.detach().T if type(down).__name__ == "Conv1D" else weight.detach()
        rows, columns = _positions(layer, matrix.shape[0], matrix.shape[1])
        values.append(matrix[rows.to(matrix.device), columns.to(matrix.device)].float().cpu())
        dtype = weight.dtype
    sample = {"dtype": str(dtype).removeprefix("torch."), "sample": torch.cat(values).tolist()}
    object.__setattr__(down_projs[0], "_cna_fast_weight_sample", (key, sample))
    return sample


def weights_differ(recorded: Any, current: Any) -> bool:
    """True when two weight samples show different weights beyond the rounding of their dtypes."""
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return False
    a, b = recorded.get("sample"), current.get("sample")
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b) or not a:
        return False
    try:
        first, second = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    except (TypeError, ValueError):
        return True  # not numbers: a damaged record cannot vouch for the weights
    tolerance = max(_RELATIVE_TOLERANCE.get(str(recorded.get("dtype")), 2.0 ** -7),
                    _RELATIVE_TOLERANCE.get(str(current.get("dtype")), 2.0 ** -7))
    bound = tolerance * torch.maximum(first.abs(), second.abs()) + _ABSOLUTE_TOLERANCE
    return bool(((first - second).abs() > bound).any())
