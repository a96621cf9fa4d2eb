"""Attribution, the pure step from statistics to a circuit: score every neuron, rank globally, select.

Statistics in, circuit out; no model is needed (`cna_fast.pipeline.discover` runs the model first).
`attribute` makes the dense / mixture-of-experts choice once, by the statistics it is given.
"""
from __future__ import annotations

from typing import Any

import torch

from ..circuit import Circuit
from ..errors import CNAError
from ..settings import with_options
from ..stats import NEGATIVE, POSITIVE, MoEStats, NeuronStats, Stats, check_contrast
from . import dense, moe
from .dense import score_neurons
from .moe import routed_scores, routing_summary
from .select import (DEFAULT_TOP_FRAC, SCORES, Selection, neuron_keys, resolve_top_k, select_neurons, standardized,
                     validate_score)

__all__ = ["DEFAULT_TOP_FRAC", "SCORES", "Selection", "attribute", "candidates", "eligible_count", "neuron_keys",
           "resolve_top_k", "routed_scores", "routing_summary", "score_neurons", "select_neurons", "standardized",
           "validate_score"]


def candidates(stats: Stats, score: str = "diff") -> dict[str, torch.Tensor]:
    """Every neuron the statistics cover, as flat columns in ranking order of ties (see `select_neurons`).

    Dense statistics give layers, neurons, scores, means and stds; MoE statistics add `experts`
    (-1 for ordinary neurons).
    """
    if isinstance(stats, MoEStats):
        return moe.columns(stats, score)
    if not isinstance(stats, NeuronStats):
        raise CNAError(f"attribution needs NeuronStats or MoEStats, got {type(stats).__name__}")
    check_contrast(stats)
    return dense.columns(stats, score)


def eligible_count(stats: Stats, exclude_layers=()) -> int:
    """How many neurons of the statistics lie outside `exclude_layers`."""
    layers = candidates(stats)["layers"]
    return int((~torch.isin(layers, torch.tensor(sorted(exclude_layers), dtype=torch.int64))).sum())


def attribute(stats: Stats, selection: Selection | None = None, *, universal: torch.Tensor | None = None,
              exclude_neurons: Circuit | None = None, total_neurons: int | None = None, meta: dict | None = None,
              **options: Any) -> Circuit:
    """Build a circuit from contrast statistics: score, rank globally by |score|, take the top.

    selection / options: a Selection, or its fields as keywords (top_k, top_frac, score, exclude_layers).
    universal: dense statistics only: bool mask [len(stats.layers), width] of neurons never to select.
    exclude_neurons: a circuit whose neurons are never selected (iterative discovery).
    total_neurons: the model's neuron count for `top_frac` (default: the captured neurons).
    """
    selection, = with_options(options, selection if selection is not None else Selection())
    columns = candidates(stats, selection.score)
    eligible = ~torch.isin(columns["layers"], torch.tensor(selection.exclude_layers, dtype=torch.int64))
    if universal is not None:
        if isinstance(stats, MoEStats):
            raise CNAError("the universal-neuron filter does not cover mixture-of-experts models yet: run without it")
        eligible &= ~universal.flatten().cpu()
    if exclude_neurons is not None and len(exclude_neurons):
        taken = neuron_keys(exclude_neurons.layers, exclude_neurons.experts, exclude_neurons.neurons)
        eligible &= ~torch.isin(neuron_keys(columns["layers"], columns.get("experts"), columns["neurons"]), taken)
    total = total_neurons if total_neurons is not None else columns["scores"].numel()
    k = selection.size(total, int(eligible.sum()))
    chosen = select_neurons(columns["scores"], k, eligible)
    info = dict(meta or {})
    info.update(score=selection.score, top_k=k, top_frac=selection.top_frac if selection.top_k is None else None,
                exclude_layers=list(selection.exclude_layers), n_positive=int(stats.count[POSITIVE]),
                n_negative=int(stats.count[NEGATIVE]),
                universal_removed=int(universal.sum()) if universal is not None else 0)
    if isinstance(stats, MoEStats):
        info.update(moe_mode=stats.routed.mode, routing=routing_summary(stats.routed, info.get("reduction")))
    picked = {name: value[chosen] for name, value in columns.items()}
    return Circuit(deltas=picked["mean_positive"] - picked["mean_negative"], meta=info, **picked)
