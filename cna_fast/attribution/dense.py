"""Scores of ordinary neurons (dense MLPs, shared experts) from `NeuronStats`, as flat candidate columns."""
from __future__ import annotations

import torch

from ..errors import CNAError
from ..stats import NEGATIVE, POSITIVE, NeuronStats
from .select import standardized, validate_score


def score_neurons(stats: NeuronStats, score: str = "diff") -> torch.Tensor:
    """Signed score per neuron [layers, width], positive where the positive group is higher.

    diff: mean(positive) - mean(negative), the paper's score.
    t: Welch's t, the difference over its standard error.
    d: Cohen's d, the difference over the pooled standard deviation.
    """
    validate_score(score)
    diff = stats.mean[:, POSITIVE] - stats.mean[:, NEGATIVE]
    n_pos, n_neg = float(stats.count[POSITIVE]), float(stats.count[NEGATIVE])
    if score != "diff" and min(n_pos, n_neg) < 2:
        raise CNAError(f"score {score!r} needs at least 2 prompts per side (got {int(n_pos)} positive, "
                       f"{int(n_neg)} negative); use score='diff' or add prompts")
    variance = stats.variance(ddof=1)
    return standardized(diff, variance[:, POSITIVE], variance[:, NEGATIVE], n_pos, n_neg, score)


def columns(stats: NeuronStats, score: str, expert: int | None = None) -> dict[str, torch.Tensor]:
    """Every neuron of `stats`, layer by layer, as flat columns: layers, neurons, scores, means and stds.

    expert: also an `experts` column holding this value (-1 marks ordinary neurons of MoE models).
    """
    std = stats.std(ddof=1)
    layer_ids = torch.tensor(stats.layers, dtype=torch.int64, device=stats.mean.device)[:, None].expand(-1, stats.width)
    flat = {"layers": layer_ids, "neurons": torch.arange(stats.width, device=layer_ids.device).expand_as(layer_ids),
            "scores": score_neurons(stats, score), "mean_positive": stats.mean[:, POSITIVE],
            "mean_negative": stats.mean[:, NEGATIVE], "std_positive": std[:, POSITIVE],
            "std_negative": std[:, NEGATIVE]}
    if expert is not None:
        flat["experts"] = torch.full_like(layer_ids, expert)
    return {name: value.reshape(-1).cpu() for name, value in flat.items()}
