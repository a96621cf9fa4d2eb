"""Circuit search: which size, multiplier and score remove (or induce) a behavior within a KL budget.

grid: what is searched (`SearchSpace`) and how settings become rows of batched passes; tuning:
`tune`, what the search may cost (`SearchBudget`) and how answers are judged (`Judging`);
result: every setting measured, the choice, the Pareto front, as CSV and JSON.
"""
from .grid import (GOALS, SearchSpace, candidate_rows, disjoint_shells, multiplier_grid, shell_multipliers,
                   size_grid)
from .result import Candidate, TuneResult
from .tuning import (DEFAULT_KL_BUDGET, DEFAULT_QUALITY_FLOOR, Judging, SearchBudget, batched_kl, halving_rungs,
                     rediscover, tune)

__all__ = ["DEFAULT_KL_BUDGET", "DEFAULT_QUALITY_FLOOR", "GOALS", "Candidate", "Judging", "SearchBudget",
           "SearchSpace", "TuneResult", "batched_kl", "candidate_rows", "disjoint_shells", "halving_rungs",
           "multiplier_grid", "rediscover", "shell_multipliers", "size_grid", "tune"]
