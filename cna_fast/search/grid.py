"""What a circuit search searches (`SearchSpace`: circuit size x multiplier x score), and how every
setting becomes a row of the same batched passes.

The circuits of one score are prefixes of one ranking, so one discovery serves every size. The
candidate circuits are split into disjoint shells (rank bands k_{i-1}..k_i of a ranking; across
scores, the groups of neurons that belong to the same circuits), and a row's per-row multipliers
put its multiplier on the shells its circuit covers and 1 elsewhere.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..attribution import SCORES, attribute, validate_score
from ..circuit import Circuit
from ..errors import CNAError, number_list, one_of, text_list
from ..stats import Stats
from .result import Candidate

ABLATE = (0.0, 0.5, -0.5, -1.0)
AMPLIFY = (1.5, 2.0, 3.0)
GOALS = ("remove", "induce")
# Circuit sizes as fractions of all MLP neurons, roughly log-spaced from 0.03% to 2%, with the
# paper's 0.1% among them so that its recipe is always one of the rows.
DEFAULT_FRACTIONS = (0.0003, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02)
PAPER_FRACTION = 0.001


@dataclass(frozen=True)
class SearchSpace:
    """What is searched.

    sizes: circuit sizes, fractions of all neurons (< 1) or neuron counts; default 0.03% to 2%, log-spaced.
    multipliers: default by `goal`: "remove" ablates (0, 0.5, -0.5, -1), "induce" amplifies (1.5, 2, 3).
    scores: the rankings tried (diff, Welch t, Cohen's d). exclude_layers: layers never selected.
    iterative: rounds of re-discovery with the chosen circuit applied (its union with the new neurons).
    """

    sizes: tuple[float, ...] | None = None
    multipliers: tuple[float, ...] | None = None
    scores: tuple[str, ...] = SCORES
    goal: str = "remove"
    exclude_layers: tuple[int, ...] = ()
    iterative: int = 0

    def __post_init__(self) -> None:
        if self.multipliers is not None:
            object.__setattr__(self, "multipliers", tuple(number_list(self.multipliers, "multipliers")))
        multiplier_grid(self.goal, self.multipliers)
        scores = tuple(dict.fromkeys(validate_score(score) for score in text_list(self.scores, "scores")))
        if not scores:
            raise CNAError(f"give at least one score to search: {', '.join(SCORES)}")
        object.__setattr__(self, "scores", scores)
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(number_list(self.sizes, "sizes")))
        layers = self.exclude_layers
        if isinstance(layers, (numbers.Number, str, bytes)) or not isinstance(layers, Iterable):
            raise CNAError(f"exclude_layers must be a list of layer numbers like [0, 1], got {layers!r}")
        object.__setattr__(self, "exclude_layers", tuple(layers))
        if isinstance(self.iterative, bool) or not isinstance(self.iterative, int) or self.iterative < 0:
            raise CNAError(f"iterative must be a number of rounds (0 or more), got {self.iterative!r}")

    def multiplier_list(self) -> list[float]:
        return multiplier_grid(self.goal, self.multipliers)


def size_grid(total_neurons: int, eligible: int, sizes: Sequence[float] | None = None) -> list[int]:
    """Circuit sizes in neurons, sorted and unique: values below 1 are fractions of all neurons, others counts."""
    if eligible < 1:
        raise CNAError("no neuron can be selected: every layer is excluded (exclude_layers); leave at least one layer")
    counts = set()
    for value in DEFAULT_FRACTIONS if sizes is None else sizes:
        value = float(value)
        if not math.isfinite(value) or value <= 0 or (value >= 1 and value != int(value)):
            raise CNAError(f"circuit size {value!r} is neither a fraction in (0, 1) nor a whole number of neurons: "
                           "give e.g. 0.001 (0.1% of all neurons) or 50")
        counts.add(min(eligible, max(1, round(value * total_neurons)) if value < 1 else int(value)))
    if not counts:
        raise CNAError("no circuit sizes to search: give at least one size")
    return sorted(counts)


def multiplier_grid(goal: str, multipliers: Sequence[float] | None = None) -> list[float]:
    """The multipliers to search: ablations to remove a behavior, amplifications to induce it."""
    one_of(goal, GOALS, "goal", "remove: ablate the circuit; induce: amplify it")
    values = list(ABLATE if goal == "remove" else AMPLIFY) if multipliers is None else [float(m) for m in multipliers]
    if not values or not all(math.isfinite(value) for value in values):
        raise CNAError("multipliers must be finite numbers, e.g. 0,0.5,-0.5,-1")
    if 1.0 in values:
        raise CNAError("multiplier 1 is the unsteered model (always measured as the baseline): leave it out")
    return list(dict.fromkeys(values))


def grid(stats: Stats, space: SearchSpace, sizes: list[int], total_neurons: int, meta: dict) -> list[Candidate]:
    """One candidate per (score, size, multiplier): the circuits of a score are prefixes of its ranking.

    A circuit that an earlier score already gave (t and d rank alike when both prompt sets have the
    same size) is measured once, under the earlier score.
    """
    candidates, seen = [], set()
    for score in space.scores:
        for size in sizes:
            circuit = attribute(stats, top_k=size, score=score, exclude_layers=space.exclude_layers,
                                total_neurons=total_neurons, meta=meta)
            members = frozenset(circuit.keys())
            if members not in seen:
                seen.add(members)
                candidates += [Candidate(score, size, multiplier, circuit) for multiplier in space.multiplier_list()]
    return candidates


def paper_default(candidates: Sequence[Candidate], total_neurons: int, goal: str) -> Candidate | None:
    """The paper's recipe (diff score, top 0.1%, multiplier 0) when it is in the grid: always measured in full."""
    size = max(1, round(PAPER_FRACTION * total_neurons))
    return next((candidate for candidate in candidates if goal == "remove" and candidate.score == "diff"
                 and candidate.size == size and candidate.multiplier == 0.0), None)


def disjoint_shells(circuits: Sequence[Circuit | None]) -> tuple[list[Circuit], torch.Tensor]:
    """Split circuits into disjoint shells; returns the shells and membership [len(circuits), len(shells)].

    Circuit i is the union of the shells j with membership[i, j] (None is the empty circuit). For
    the prefixes of one ranking the shells are its rank bands; several rankings or unions split
    further, into the groups of neurons that belong to the same circuits.
    """
    owners: dict[tuple[int, int, int], list[int]] = {}
    source: dict[tuple[int, int, int], tuple[int, int]] = {}
    for index, circuit in enumerate(circuits):
        if circuit is None:
            continue
        for position, key in enumerate(circuit.keys()):
            owners.setdefault(key, []).append(index)
            source.setdefault(key, (index, position))
    groups: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
    for key, members in owners.items():
        groups.setdefault(tuple(members), []).append(key)
    membership = torch.zeros(len(circuits), len(groups), dtype=torch.bool)
    shells = []
    for column, (members, keys) in enumerate(groups.items()):
        by_source: dict[int, list[int]] = {}
        for index, position in (source[key] for key in keys):
            by_source.setdefault(index, []).append(position)
        meta = dict(circuits[next(iter(by_source))].meta)
        shells.append(Circuit.join([circuits[index].select(positions) for index, positions in by_source.items()],
                                   meta))
        membership[list(members), column] = True
    return shells, membership


def shell_multipliers(membership: torch.Tensor, multipliers: Sequence[float]) -> torch.Tensor:
    """Per-row multipliers [settings, shells]: each setting's multiplier on its circuit's shells, 1 elsewhere."""
    values = torch.tensor([float(m) for m in multipliers], dtype=torch.float32)[:, None]
    return torch.where(membership, values, torch.ones((), dtype=torch.float32))


def candidate_rows(candidates: Sequence[Candidate]) -> tuple[list[Circuit], torch.Tensor]:
    """Shells and per-row multipliers [len(candidates), shells] for a list of settings."""
    shells, membership = disjoint_shells([candidate.circuit for candidate in candidates])
    return shells, shell_multipliers(membership, [candidate.multiplier for candidate in candidates])
