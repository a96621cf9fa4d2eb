"""What attribution shares between dense and MoE statistics: the scores, the selection settings, the ranking.

A neuron's score is the difference of its means, or that difference over its standard error
(Welch's t) or over the pooled standard deviation (Cohen's d); all neurons are ranked together by
|score| and the top ones become the circuit.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import CNAError, one_of, positive_int

SCORES = ("diff", "t", "d")
DEFAULT_TOP_FRAC = 0.001
_TINY = 1e-12


def validate_score(score: str) -> str:
    return one_of(score, SCORES, "score", "diff = mean difference, t = Welch t, d = Cohen's d")


def validate_top_frac(top_frac: float) -> float:
    if not 0.0 < float(top_frac) <= 1.0:
        raise CNAError(f"top_frac must be in (0, 1], got {top_frac}: 0.001 selects the top 0.1%")
    return float(top_frac)


@dataclass(frozen=True)
class Selection:
    """Which neurons become the circuit: the top `top_k`, or `top_frac` of all the model's MLP neurons (0.1% by
    default), by |score| ("diff", "t" Welch, "d" Cohen), over every layer but `exclude_layers`."""

    top_k: int | None = None
    top_frac: float | None = DEFAULT_TOP_FRAC
    score: str = "diff"
    exclude_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        validate_score(self.score)
        if self.top_k is not None:
            positive_int(self.top_k, "top_k")
        if self.top_frac is not None:
            validate_top_frac(self.top_frac)
        layers = self.exclude_layers
        if isinstance(layers, (numbers.Number, str, bytes)) or not isinstance(layers, Iterable):
            raise CNAError(f"exclude_layers must be a list of layer numbers like [0, 1], got {layers!r}")
        object.__setattr__(self, "exclude_layers", tuple(sorted({int(layer) for layer in layers})))

    def size(self, total_neurons: int, eligible: int) -> int:
        """How many neurons to select among `eligible` of a model with `total_neurons`."""
        return resolve_top_k(self.top_k, self.top_frac, total_neurons, eligible)


def standardized(diff: torch.Tensor, var_pos: torch.Tensor, var_neg: torch.Tensor, n_pos, n_neg,
                 score: str) -> torch.Tensor:
    """The mean difference as a score: itself ("diff"), Welch's t ("t") or Cohen's d ("d")."""
    if validate_score(score) == "diff":
        return diff
    if score == "t":
        spread = (var_pos / n_pos + var_neg / n_neg).sqrt()
    else:
        spread = (((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2)).sqrt()
    return diff / spread.clamp_min(_TINY)


def resolve_top_k(top_k: int | None, top_frac: float | None, total_neurons: int, eligible: int) -> int:
    """How many neurons to select: `top_k`, or `top_frac` of all the model's neurons (at least 1)."""
    if top_k is None:
        frac = validate_top_frac(DEFAULT_TOP_FRAC if top_frac is None else top_frac)
        top_k = max(1, round(frac * total_neurons))
    top_k = positive_int(top_k, "top_k")
    if eligible < 1:
        raise CNAError("no neuron can be selected: every layer is excluded (exclude_layers / --exclude-layers); leave "
                       "at least one layer")
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


def neuron_keys(layers: torch.Tensor, experts: torch.Tensor | None, neurons: torch.Tensor) -> torch.Tensor:
    """One int64 per (layer, expert, neuron) (expert -1 or None for ordinary neurons), to compare neuron sets."""
    experts = experts if experts is not None else torch.full_like(layers, -1)
    return (layers.to(torch.int64) << 40) | ((experts.to(torch.int64) + 1) << 24) | neurons.to(torch.int64)
