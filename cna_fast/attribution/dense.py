"""Attribution, the pure step from statistics to a circuit: score every neuron, rank, select.

Statistics in, circuit out; no model is needed. The pipeline that runs the model first is
`cna_fast.pipeline.discover`.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Iterable

import torch

from .circuit import Circuit
from .errors import CNAError
from .stats import NEGATIVE, POSITIVE, NeuronStats, check_contrast

SCORES = ("diff", "t", "d")
DEFAULT_TOP_FRAC = 0.001
_TINY = 1e-12


def validate_score(score: str) -> str:
    if score not in SCORES:
        raise CNAError(f"unknown score {score!r}: choose one of {', '.join(SCORES)} (diff = mean difference, "
                       "t = Welch t, d = Cohen's d)")
    return score


def score_neurons(stats: NeuronStats, score: str = "diff") -> torch.Tensor:
    """Signed score per neuron [layers, width], positive where the positive group is higher.

    diff: mean(positive) - mean(negative), the paper's score.
    t: Welch's t, the difference over its standard error.
    d: Cohen's d, the difference over the pooled standard deviation.
    """
    validate_score(score)
    diff = stats.mean[:, POSITIVE] - stats.mean[:, NEGATIVE]
    if score == "diff":
        return diff
    n_pos, n_neg = float(stats.count[POSITIVE]), float(stats.count[NEGATIVE])
    if min(n_pos, n_neg) < 2:
        raise CNAError(f"score {score!r} needs at least 2 prompts per side (got {int(n_pos)} positive, "
                       f"{int(n_neg)} negative); use score='diff' or add prompts")
    variance = stats.variance(ddof=1)
    var_pos, var_neg = variance[:, POSITIVE], variance[:, NEGATIVE]
    if score == "t":
        spread = (var_pos / n_pos + var_neg / n_neg).sqrt()
    else:
        spread = (((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2)).sqrt()
    return diff / spread.clamp_min(_TINY)


def resolve_top_k(top_k: int | None, top_frac: float | None, total_neurons: int, eligible: int) -> int:
    """How many neurons to select: `top_k`, or `top_frac` of all the model's neurons (at least 1)."""
    if top_k is None:
        frac = DEFAULT_TOP_FRAC if top_frac is None else float(top_frac)
        if not 0.0 < frac <= 1.0:
            raise CNAError(f"top_frac must be in (0, 1], got {top_frac}: 0.001 selects the top 0.1%")
        top_k = max(1, round(frac * total_neurons))
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise CNAError(f"top_k must be a positive integer, got {top_k!r}")
    top_k = int(top_k)
    if top_k > eligible:
        raise CNAError(f"top_k={top_k} is more than the {eligible} neurons that can be selected "
                       f"(the model has {total_neurons} MLP neurons); choose a smaller top_k")
    return top_k


def select_neurons(scores: torch.Tensor, top_k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the `top_k` largest |scores| over all layers; ties go to the lower index.

    eligible: optional bool mask like `scores`; False entries are never selected.
    """
    magnitude = scores.abs().flatten().nan_to_num(nan=-1.0)
    if eligible is not None:
        magnitude = torch.where(eligible.flatten(), magnitude, torch.full_like(magnitude, -torch.inf))
    order = torch.sort(magnitude, descending=True, stable=True).indices
    return order[:top_k]


def attribute(stats: NeuronStats, *, top_k: int | None = None, top_frac: float | None = DEFAULT_TOP_FRAC,
              score: str = "diff", exclude_layers: Iterable[int] = (), universal: torch.Tensor | None = None,
              total_neurons: int | None = None, meta: dict | None = None) -> Circuit:
    """Build a circuit from contrast statistics: score, rank globally by |score|, take the top.

    universal: optional bool mask [len(stats.layers), width] of neurons never to select.
    total_neurons: the model's neuron count for `top_frac` (default: the captured neurons).
    """
    check_contrast(stats)
    scores = score_neurons(stats, score)
    excluded = set(int(layer) for layer in exclude_layers)
    eligible = torch.tensor([layer not in excluded for layer in stats.layers], device=scores.device)[:, None]
    eligible = eligible.expand_as(scores)
    if universal is not None:
        eligible = eligible & ~universal.to(scores.device)
    total = total_neurons if total_neurons is not None else scores.numel()
    k = resolve_top_k(top_k, top_frac, total, int(eligible.sum()))
    flat = select_neurons(scores, k, eligible)
    rows, neurons = flat // stats.width, flat % stats.width
    std = stats.std(ddof=1)
    layer_ids = torch.tensor(stats.layers, device=rows.device)[rows]
    info = dict(meta or {})
    info.update(score=score, top_k=k, top_frac=top_frac if top_k is None else None, exclude_layers=sorted(excluded),
                n_positive=int(stats.count[POSITIVE]), n_negative=int(stats.count[NEGATIVE]),
                universal_removed=int(universal.sum()) if universal is not None else 0)
    return Circuit(
        layers=layer_ids, neurons=neurons, scores=scores[rows, neurons],
        deltas=stats.mean[rows, POSITIVE, neurons] - stats.mean[rows, NEGATIVE, neurons],
        mean_positive=stats.mean[rows, POSITIVE, neurons], mean_negative=stats.mean[rows, NEGATIVE, neurons],
        std_positive=std[rows, POSITIVE, neurons], std_negative=std[rows, NEGATIVE, neurons], meta=info,
    )


_MOVED_TO_PIPELINE = {"discover", "UniversalFilter", "mlp_output_directions", "run_identity",
                      "bundled_diverse_prompts"}


def __getattr__(name: str):
    """Deprecated names: the pipeline moved to `cna_fast.pipeline` (kept here for one release)."""
    if name in _MOVED_TO_PIPELINE:
        warnings.warn(f"cna_fast.attribution.{name} moved to cna_fast.pipeline.{name}", DeprecationWarning,
                      stacklevel=2)
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

