"""Scores of mixture-of-experts statistics: ordinary (dense layers, shared experts) and routed
(layer, expert, j) neurons as one set of flat candidate columns, ranked together by |score|."""
from __future__ import annotations

import torch

from ..stats import NEGATIVE, POSITIVE, ExpertStats, MoEStats
from . import dense
from .select import standardized

_COLUMNS = ("layers", "experts", "neurons", "scores", "mean_positive", "mean_negative", "std_positive", "std_negative")


def routed_scores(stats: ExpertStats, score: str = "diff") -> torch.Tensor:
    """Signed score per routed neuron [layers, experts, width]; NaN where a side has too few samples.

    Counts are per (layer, expert, side): in conditional mode an expert routed for no sample of a
    side has no mean there, and t or d need two samples per side.
    """
    n_pos, n_neg = stats.count[..., POSITIVE, None], stats.count[..., NEGATIVE, None]
    diff = stats.mean[..., POSITIVE, :] - stats.mean[..., NEGATIVE, :]
    if score == "diff":
        diff = torch.where((n_pos > 0) & (n_neg > 0), diff, torch.nan)
    variance = stats.variance(ddof=1)
    return standardized(diff, variance[..., POSITIVE, :], variance[..., NEGATIVE, :], n_pos, n_neg, score)


def _routed_columns(stats: ExpertStats, score: str) -> dict[str, torch.Tensor]:
    layers, experts, width = len(stats.layers), stats.num_experts, stats.width
    std = stats.variance(ddof=1).sqrt()
    grid = torch.meshgrid(torch.tensor(stats.layers, dtype=torch.int64), torch.arange(experts), torch.arange(width),
                          indexing="ij")
    columns = {"layers": grid[0], "experts": grid[1], "neurons": grid[2], "scores": routed_scores(stats, score),
               "mean_positive": stats.mean[..., POSITIVE, :], "mean_negative": stats.mean[..., NEGATIVE, :],
               "std_positive": std[..., POSITIVE, :], "std_negative": std[..., NEGATIVE, :]}
    return {name: value.reshape(layers * experts * width).cpu() for name, value in columns.items()}


def columns(stats: MoEStats, score: str) -> dict[str, torch.Tensor]:
    """Every captured neuron as flat columns (layers, experts (-1: ordinary), neurons, scores, means, stds)."""
    parts = [_routed_columns(stats.routed, score)] + [dense.columns(part, score, expert=-1) for part in stats.ordinary]
    return {name: torch.cat([part[name] for part in parts]) for name in _COLUMNS}


def routing_summary(stats: ExpertStats, reduction: str | None = None) -> dict:
    """Routing frequency per MoE layer, expert and side, for the circuit's metadata (and `cna inspect`)."""
    frequency = stats.routing_frequency()
    return {"layers": list(stats.layers), "unit": "token" if reduction == "all" else "prompt",
            "positive": frequency[..., POSITIVE].tolist(), "negative": frequency[..., NEGATIVE].tolist()}
