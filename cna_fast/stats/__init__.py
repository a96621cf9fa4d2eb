"""Streaming statistics per neuron: count, mean and M2 in float64, merged exactly (Chan).

`NeuronStats` holds ordinary neurons (dense MLPs, shared experts); `MoEStats` adds the routed
neurons of mixture-of-experts layers. `load_stats` makes the dense / MoE choice once, by the file.
"""
from __future__ import annotations

import os

from safetensors import safe_open

from ..errors import CNAError
from ..paths import require_file
from .dense import NEGATIVE, POSITIVE, SKIP, NeuronStats, check_contrast
from .moe import ExpertMoments, ExpertStats, MoEStats
from .moe import FORMAT as _MOE_FORMAT
from .moments import batch_moments, chan_merge

Stats = NeuronStats | MoEStats

__all__ = ["NEGATIVE", "POSITIVE", "SKIP", "ExpertMoments", "ExpertStats", "MoEStats", "NeuronStats", "Stats",
           "batch_moments", "chan_merge", "check_contrast", "load_stats"]


def load_stats(path: str | os.PathLike) -> Stats:
    """Dense or MoE statistics, whichever the file holds; a damaged file is a CNAError."""
    require_file(path, "statistics file")  # a folder or a device is named as such, not as an OS error
    try:
        with safe_open(str(path), framework="pt") as handle:
            kind = (handle.metadata() or {}).get("format")
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise CNAError(f"cannot read statistics file {str(path)!r}: {error}") from error
    return MoEStats.load(path) if kind == _MOE_FORMAT else NeuronStats.load(path)
