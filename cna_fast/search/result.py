"""What a circuit search measured: one Candidate per setting, the choice, the Pareto front, and the
table as CSV and JSON."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .._io import csv_text, write_text_atomic
from ..circuit import Circuit
from ..errors import CNAError

COLUMNS = ("round", "score", "size", "fraction", "multiplier", "behavior_rate", "kl", "kl_texts", "quality",
           "screen_rate", "prompts", "new_tokens", "tokens_spent", "stage", "within_budget", "pareto", "chosen")


@dataclass(eq=False)
class Candidate:
    """One setting of the search (score, circuit size, multiplier) and what was measured of it.

    score None is the unsteered baseline. `stage` is the last stage the setting reached; its
    behavior rate and quality were measured on `prompts` eval prompts with `new_tokens` tokens
    (`screen_rate` and `screen_quality`: on the screen's fewer prompts and tokens, when it was
    screened). `kl` was measured on `kl_texts` neutral texts; None when the search decided its side
    of the budget from other settings (see `pruning`).
    """

    score: str | None
    size: int
    multiplier: float
    circuit: Circuit | None
    round: int = 0
    stage: str = "grid"
    kl: float | None = None
    kl_texts: int = 0
    over_budget: bool | None = None
    screen_rate: float | None = None
    screen_quality: float | None = None
    behavior_rate: float | None = None
    quality: float | None = None
    prompts: int = 0
    new_tokens: int = 0
    tokens_spent: int = 0
    final: bool = False
    outputs: list[str] = field(default_factory=list, repr=False)

    def row(self, total_neurons: int) -> dict:
        """The table row; a non-finite KL (a setting that breaks the model) is written as None."""
        kl = self.kl if self.kl is not None and math.isfinite(self.kl) else None
        return {"round": self.round, "score": self.score or "baseline", "size": self.size,
                "fraction": self.size / total_neurons, "multiplier": self.multiplier,
                "behavior_rate": self.behavior_rate, "kl": kl, "kl_texts": self.kl_texts, "quality": self.quality,
                "screen_rate": self.screen_rate, "prompts": self.prompts,
                "new_tokens": self.new_tokens, "tokens_spent": self.tokens_spent, "stage": self.stage}


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with fewer than 3 pairs or a constant side."""
    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                result[order[position]] = (start + end) / 2
            start = end + 1
        return result

    if len(first) < 3:
        return math.nan
    a, b = ranks(first), ranks(second)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    spread = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return covariance / spread if spread else math.nan


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'inf':>{width}}"


def better_key(goal: str) -> Callable[[Candidate], tuple]:
    """Sort key, best first: the behavior rate in the goal's direction, then the smaller circuit, then lower KL."""
    sign = 1.0 if goal == "remove" else -1.0
    return lambda candidate: (sign * candidate.behavior_rate, candidate.size, candidate.kl, abs(candidate.multiplier))


def choose(candidates: Sequence[Candidate], kl_budget: float, quality_floor: float, goal: str) -> Candidate | None:
    """The best fully measured setting within the KL budget and quality floor; the smallest circuit among ties."""
    eligible = [candidate for candidate in candidates if candidate.final and candidate.circuit is not None
                and candidate.kl <= kl_budget and candidate.quality >= quality_floor]
    return min(eligible, key=better_key(goal)) if eligible else None


def pareto_front(candidates: Sequence[Candidate], goal: str) -> list[Candidate]:
    """Fully measured settings that no other beats on both behavior rate (in the goal's direction) and KL."""
    sign = 1.0 if goal == "remove" else -1.0
    front, best = [], math.inf
    for candidate in sorted((c for c in candidates if c.final), key=lambda c: (c.kl, sign * c.behavior_rate, c.size)):
        if sign * candidate.behavior_rate < best:
            front.append(candidate)
            best = sign * candidate.behavior_rate
    return front


@dataclass
class TuneResult:
    """Every setting measured by `cna_fast.tune`, the chosen one and its circuit.

    circuit: the chosen circuit (its multiplier in `circuit.meta["multiplier"]`), or None when no
    setting fits the KL budget and quality floor. tokens_spent: new tokens generated by the search;
    full_grid_tokens: what generating every setting in full would have cost. seconds: the search's
    wall time (discovery excluded); full_grid_seconds: an estimate, at the rates this search
    measured, of the full grid (KL of every setting on every neutral text, every setting generated
    in full). time_budget: the minutes it was given (None: no limit).
    """

    candidates: list[Candidate]
    baseline: Candidate
    chosen: Candidate | None
    behavior: str
    goal: str
    kl_budget: float
    quality_floor: float
    total_neurons: int
    tokens_spent: int
    full_grid_tokens: int
    circuit: Circuit | None = None
    seconds: float = 0.0
    full_grid_seconds: float | None = None
    time_budget: float | None = None

    @property
    def multiplier(self) -> float | None:
        return None if self.chosen is None else self.chosen.multiplier

    @property
    def table(self) -> list[dict]:
        """One row per setting, the baseline first (see COLUMNS)."""
        front = {id(candidate) for candidate in pareto_front([self.baseline, *self.candidates], self.goal)}
        rows = []
        for candidate in [self.baseline, *self.candidates]:
            row = candidate.row(self.total_neurons)
            row.update(within_budget=candidate.over_budget is False,
                       pareto=id(candidate) in front, chosen=candidate is self.chosen)
            rows.append(row)
        return rows

    @property
    def pareto(self) -> list[dict]:
        """The Pareto front of behavior rate against KL (fully measured settings), by increasing KL."""
        return [candidate.row(self.total_neurons) for candidate in
                pareto_front([self.baseline, *self.candidates], self.goal)]

    @property
    def skipped(self) -> list[Candidate]:
        """Settings the time budget left unmeasured."""
        return [candidate for candidate in self.candidates if candidate.stage.startswith("skipped")]

    @property
    def screen_agreement(self) -> dict:
        """How well the screen ranks settings: Spearman's rank correlation of the screen's behavior rate with
        the full run's, over the settings measured both ways (n); None with fewer than 3 or no variation."""
        pairs = [(c.screen_rate, c.behavior_rate) for c in self.candidates
                 if c.final and c.screen_rate is not None and c.behavior_rate is not None]
        value = spearman([a for a, _ in pairs], [b for _, b in pairs])
        return {"spearman": value if math.isfinite(value) else None, "n": len(pairs)}

    def summary_meta(self) -> dict:
        """What the chosen circuit's metadata records about the search."""
        chosen = self.chosen
        return {"behavior": self.behavior, "goal": self.goal, "kl_budget": self.kl_budget,
                "quality_floor": self.quality_floor, "baseline_rate": self.baseline.behavior_rate,
                "behavior_rate": chosen.behavior_rate if chosen else None, "kl": chosen.kl if chosen else None,
                "quality": chosen.quality if chosen else None, "tokens_spent": self.tokens_spent,
                "full_grid_tokens": self.full_grid_tokens, "settings": len(self.candidates),
                "seconds": round(self.seconds, 1), "full_grid_seconds": self.full_grid_seconds,
                "time_budget_minutes": self.time_budget, "skipped": len(self.skipped),
                "screen_agreement": self.screen_agreement}

    def summary(self) -> str:
        """A readable report: the fully measured settings, the choice and the tokens spent."""
        lines = [(f"{'round':>5} {'score':>8} {'size':>6} {'frac%':>6} {'mult':>5} {'behavior':>8} {'kl':>7} "
                 f"{'quality':>7}  stage")]
        for row in self.table:
            if row["stage"] in ("baseline",) or row["stage"].endswith("final"):
                mark = " <- chosen" if row["chosen"] else (" (pareto)" if row["pareto"] else "")
                lines.append(f"{row['round']:>5} {row['score']:>8} {row['size']:>6} {100 * row['fraction']:>6.3f} "
                             f"{row['multiplier']:>5g} {row['behavior_rate']:>8.3f} {_number(row['kl'], 7, 4)} "
                             f"{row['quality']:>7.3f}  {row['stage']}{mark}")
        stages = [candidate.stage for candidate in self.candidates]
        measured = sum(candidate.kl is not None for candidate in self.candidates)
        lines.append(f"{len(self.candidates)} settings: KL measured for {measured}, the rest decided by order; "
                     f"{sum(stage.startswith('pruned by KL') for stage in stages)} over the KL budget of "
                     f"{self.kl_budget:g} nats, {sum(stage == 'dominated' for stage in stages)} dominated, "
                     f"{sum(c.screen_rate is not None for c in self.candidates)} screened, "
                     f"{sum(c.final for c in self.candidates)} generated in full; generated {self.tokens_spent:,} "
                     f"tokens, {self.tokens_spent / self.full_grid_tokens:.1%} of the {self.full_grid_tokens:,} of "
                     "the full grid")
        timing = f"search took {self.seconds / 60:.1f} min"
        if self.full_grid_seconds is not None:
            timing += f"; the full grid would take about {self.full_grid_seconds / 60:.0f} min at the same rates"
        lines.append(timing)
        if self.skipped:
            lines.append(f"time budget of {self.time_budget:g} min: {len(self.skipped)} settings left unmeasured "
                         f"({', '.join(sorted(set(c.stage for c in self.skipped)))})")
        agreement = self.screen_agreement
        if agreement["spearman"] is not None:
            lines.append(f"screen against full runs: Spearman {agreement['spearman']:.2f} over {agreement['n']} "
                         "settings")
        if self.chosen is None:
            lines.append("no setting fits the KL budget and the quality floor")
        else:
            c = self.chosen
            lines.append(f"chosen: {c.score} score, top {c.size} neurons ({100 * c.size / self.total_neurons:.3g}%), "
                         f"multiplier {c.multiplier:g}: {self.behavior} {self.baseline.behavior_rate:.1%} -> "
                         f"{c.behavior_rate:.1%}, KL {c.kl:.4f}, quality {c.quality:.3f}")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The table as CSV text; also written to `path` (atomically) if given."""
        text = csv_text(self.table, COLUMNS)
        if path is not None:
            write_text_atomic(path, text)
        return text

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Table, Pareto front, choice, token counts and the chosen and baseline answers as JSON."""
        chosen = self.chosen
        document = {"search": self.summary_meta(), "table": self.table, "pareto": self.pareto,
                    "chosen": None if chosen is None else chosen.row(self.total_neurons),
                    "answers": {"baseline": self.baseline.outputs, "chosen": chosen.outputs if chosen else []}}
        text = json.dumps(document, indent=2, allow_nan=False)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    def require_circuit(self) -> Circuit:
        """The chosen circuit, or a CNAError saying how to loosen the search."""
        if self.circuit is None and self.skipped and not any(c.final for c in self.candidates):
            raise CNAError(f"the time budget of {self.time_budget:g} min ran out before any setting was generated "
                           f"in full ({len(self.skipped)} left unmeasured): raise the time budget (the summary "
                           "estimates the search's time), or search a smaller grid")
        if self.circuit is None:
            smallest = min((c.kl for c in self.candidates if c.kl is not None), default=float("nan"))
            raise CNAError(f"no setting fits the KL budget of {self.kl_budget:g} nats and the quality floor of "
                           f"{self.quality_floor:g} (the smallest KL measured was {smallest:.4f}): raise the budget, "
                           "lower the floor, or add smaller sizes or milder multipliers")
        return self.circuit
