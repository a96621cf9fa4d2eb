"""Which settings a circuit search may skip, and why: the KL order, bisection and dominance.

Within one score (and one round of iterative discovery), the circuits are prefixes of one ranking,
so a larger circuit holds every neuron of a smaller one; and a multiplier further from 1 on the
same side (0 -> -0.5 -> -1 to remove, 1.5 -> 2 -> 3 to induce) changes those neurons more. Two
monotone assumptions follow, and the search relies on both:

- KL on neutral text rises along that order: when a setting is over the budget, every larger or
  stronger one is too ("pruned by KL (implied)"); when one is within it, every smaller or milder
  one is too. Bisection along the order decides the whole grid from a few measurements.
- The behavior changes at least as much along that order: a setting within the budget with a
  larger or stronger setting also within the budget is "dominated", and is generated only if that
  stronger one fails the quality floor.

`tests/test_tune.py` checks both on a real model: every setting the bisection skips is on the side
of the budget a full measurement puts it, and the frontier search chooses what the full grid chooses.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .result import Candidate

OVER, WITHIN = "over", "within"


def strength(multiplier: float) -> float:
    """How far a multiplier moves the neurons from the unsteered model: |1 - m|."""
    return abs(1.0 - multiplier)


def precedes(first: Candidate, second: Candidate) -> bool:
    """True if `second` is at least as large and as strong as `first`, on the same ranking and side of 1.

    Such a `second` costs at least the KL of `first` and changes the behavior at least as much.
    """
    return (first.score == second.score and first.round == second.round
            and (first.multiplier < 1.0) == (second.multiplier < 1.0)
            and first.size <= second.size and strength(first.multiplier) <= strength(second.multiplier))


def decide_budget(candidates: Sequence[Candidate], measure: Callable[[Candidate], str],
                  stop: Callable[[], bool] = lambda: False) -> dict[int, str]:
    """Whether each candidate is over or within the KL budget, measuring as few as possible.

    `measure(candidate)` returns OVER or WITHIN. Each round measures the undecided candidate that
    splits the undecided ones most evenly (the most undecided settings above it and below it), then
    decides by the order: OVER decides everything larger and stronger, WITHIN everything smaller and
    milder. Returns {id(candidate): OVER | WITHIN} for the decided ones; `stop()` ends early (a time
    budget), leaving the rest undecided.
    """
    decided: dict[int, str] = {}
    pending = list(candidates)
    while pending and not stop():
        probe = balanced_probe(pending)
        verdict = measure(probe)
        decided[id(probe)] = verdict
        for other in pending:
            if verdict == OVER and precedes(probe, other) or verdict == WITHIN and precedes(other, probe):
                decided.setdefault(id(other), verdict)
        pending = [candidate for candidate in pending if id(candidate) not in decided]
    return decided


def balanced_probe(pending: Sequence[Candidate]) -> Candidate:
    """The setting with the most of `pending` both above and below it in the order: what bisection measures next."""
    def balance(candidate: Candidate) -> tuple[int, int]:
        above = sum(precedes(candidate, other) for other in pending)
        below = sum(precedes(other, candidate) for other in pending)
        return min(above, below), -candidate.size  # ties: the smaller circuit, cheaper to get right
    return max(pending, key=balance)


def shrink(best: Candidate, within: Sequence[Candidate], as_good: Callable[[Candidate], bool],
           stop: Callable[[], bool] = lambda: False) -> Candidate:
    """The smallest, mildest setting below `best` that is `as_good`, by bisection (the behavior is monotone
    along the order, so a setting that is not as good rules out everything below it)."""
    pool = [candidate for candidate in within if candidate is not best and precedes(candidate, best)]
    while pool and not stop():
        probe = balanced_probe(pool)
        if as_good(probe):
            best = probe
            pool = [candidate for candidate in pool if candidate is not probe and precedes(candidate, probe)]
        else:
            pool = [candidate for candidate in pool if candidate is not probe and not precedes(candidate, probe)]
    return best


def frontier(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other candidate of the list dominates (is larger or stronger on the same ranking)."""
    return [candidate for candidate in candidates
            if not any(other is not candidate and precedes(candidate, other)
                       and (other.size, strength(other.multiplier)) != (candidate.size, strength(candidate.multiplier))
                       for other in candidates)]


def next_milder(failed: Candidate, within: Sequence[Candidate], tried: set[int]) -> list[Candidate]:
    """The settings just below `failed` in the order (not yet tried): where to look when it fails the quality floor."""
    below = [candidate for candidate in within if candidate is not failed and id(candidate) not in tried
             and precedes(candidate, failed)]
    return frontier(below)
