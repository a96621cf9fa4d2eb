"""Circuit search: which size, multiplier and score remove (or induce) a behavior within a KL budget.

grid: what is searched (`SearchSpace`) and how settings become rows of batched passes; tuning:
`tune`, what the search may cost (`SearchBudget`) and how answers are judged (`Judging`);
result: every setting measured, the choice, the Pareto front, as CSV and JSON; measure: KL on neutral
text and the search's clock; pruning: the order that lets bisection and dominance skip settings.
"""
from .grid import (GOALS, SearchSpace, candidate_rows, disjoint_shells, multiplier_grid, shell_multipliers,
                   size_grid)
from .result import Candidate, TuneResult
from .measure import NeutralKL, SearchClock, batched_kl
from .pruning import decide_budget, frontier, precedes
from .result import spearman
from .tuning import DEFAULT_KL_BUDGET, DEFAULT_QUALITY_FLOOR, STRATEGIES, Judging, SearchBudget, rediscover, tune

__all__ = ["DEFAULT_KL_BUDGET", "DEFAULT_QUALITY_FLOOR", "GOALS", "Candidate", "Judging", "SearchBudget",
           "NeutralKL", "STRATEGIES", "SearchClock", "SearchSpace", "TuneResult", "batched_kl", "candidate_rows",
           "decide_budget", "disjoint_shells", "frontier", "multiplier_grid", "precedes", "rediscover",
           "shell_multipliers", "size_grid", "spearman", "tune"]
