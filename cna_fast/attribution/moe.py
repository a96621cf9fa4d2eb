"""Score and select neurons of mixture-of-experts models: ordinary (dense layers, shared experts) and
routed (layer, expert, j) neurons are ranked together by |score|."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .attribution import DEFAULT_TOP_FRAC, resolve_top_k, score_neurons, select_neurons, validate_score
from .circuit import Circuit
from .moe_stats import ExpertStats, MoEStats
from .stats import NEGATIVE, POSITIVE

_TINY = 1e-12
_COLUMNS = ("layers", "experts", "neurons", "scores", "mean_positive", "mean_negative", "std_positive", "std_negative")


def routed_scores(stats: ExpertStats, score: str = "diff") -> torch.Tensor:
    """Signed score per routed neuron [layers, experts, width]; NaN where a side has too few samples.

    Counts are per (layer, expert, side): in conditional mode an expert routed for no sample of a
    side has no mean there, and t or d need two samples per side.
    """
    validate_score(score)
    n_pos, n_neg = stats.count[..., POSITIVE, None], stats.count[..., NEGATIVE, None]
    diff = stats.mean[..., POSITIVE, :] - stats.mean[..., NEGATIVE, :]
    if score == "diff":
        return torch.where((n_pos > 0) & (n_neg > 0), diff, torch.nan)
    variance = stats.variance(ddof=1)
    var_pos, var_neg = variance[..., POSITIVE, :], variance[..., NEGATIVE, :]
    if score == "t":
        spread = (var_pos / n_pos + var_neg / n_neg).sqrt()
    else:
        spread = (((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2)).sqrt()
    return diff / spread.clamp_min(_TINY)


def _routed_columns(stats: ExpertStats, score: str) -> dict[str, torch.Tensor]:
    layers, experts, width = len(stats.layers), stats.num_experts, stats.width
    std = stats.variance(ddof=1).sqrt()
    grid = torch.meshgrid(torch.tensor(stats.layers, dtype=torch.int64), torch.arange(experts), torch.arange(width),
                          indexing="ij")
    columns = {"layers": grid[0], "experts": grid[1], "neurons": grid[2], "scores": routed_scores(stats, score),
               "mean_positive": stats.mean[..., POSITIVE, :], "mean_negative": stats.mean[..., NEGATIVE, :],
               "std_positive": std[..., POSITIVE, :], "std_negative": std[..., NEGATIVE, :]}
    return {name: value.reshape(layers * experts * width) for name, value in columns.items()}


def candidate_columns(stats: MoEStats, score: str) -> dict[str, torch.Tensor]:
    """Every captured neuron as flat columns (layers, experts (-1: ordinary), neurons, scores, means, stds)."""
    parts = [_routed_columns(stats.routed, score)]
    for part in stats.ordinary:
        std = part.std(ddof=1)
        layer_ids = torch.tensor(part.layers, dtype=torch.int64)[:, None].expand(-1, part.width)
        columns = {"layers": layer_ids, "experts": torch.full_like(layer_ids, -1),
                   "neurons": torch.arange(part.width).expand_as(layer_ids), "scores": score_neurons(part, score),
                   "mean_positive": part.mean[:, POSITIVE], "mean_negative": part.mean[:, NEGATIVE],
                   "std_positive": std[:, POSITIVE], "std_negative": std[:, NEGATIVE]}
        parts.append({name: value.reshape(-1) for name, value in columns.items()})
    return {name: torch.cat([part[name].cpu() for part in parts]) for name in _COLUMNS}


def routing_summary(stats: ExpertStats, position: str | None = None) -> dict:
    """Routing frequency per MoE layer, expert and side, for the circuit's metadata (and `cna inspect`)."""
    frequency = stats.routing_frequency()
    return {"layers": list(stats.layers), "unit": "token" if position == "all" else "prompt",
            "positive": frequency[..., POSITIVE].tolist(), "negative": frequency[..., NEGATIVE].tolist()}


def attribute_moe(stats: MoEStats, *, top_k: int | None = None, top_frac: float | None = DEFAULT_TOP_FRAC,
                  score: str = "diff", exclude_layers: Iterable[int] = (), total_neurons: int | None = None,
                  meta: dict | None = None) -> Circuit:
    """The circuit of an MoE model: the top neurons by |score| over dense, shared and routed neurons together."""
    columns = candidate_columns(stats, score)
    excluded = sorted({int(layer) for layer in exclude_layers})
    eligible = ~torch.isin(columns["layers"], torch.tensor(excluded, dtype=torch.int64))
    total = total_neurons if total_neurons is not None else columns["scores"].numel()
    k = resolve_top_k(top_k, top_frac, total, int(eligible.sum()))
    chosen = select_neurons(columns["scores"], k, eligible)
    info = dict(meta or {})
    info.update(score=score, top_k=k, top_frac=top_frac if top_k is None else None, exclude_layers=excluded,
                n_positive=int(stats.count[POSITIVE]), n_negative=int(stats.count[NEGATIVE]), universal_removed=0,
                moe_mode=stats.routed.mode, routing=routing_summary(stats.routed, info.get("position")))
    picked = {name: value[chosen] for name, value in columns.items()}
    return Circuit(deltas=picked["mean_positive"] - picked["mean_negative"], meta=info, **picked)
