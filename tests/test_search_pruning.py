"""The cheaper circuit search: bisection on KL, dominance, shrinking, the time budget and the clock.

The pruning rests on two monotone assumptions (KL and the behavior change rise with circuit size and
with |1 - m| within a ranking). The synthetic tests check the algorithms given those assumptions; the
planted-model tests check that on a real model every setting the search skipped was over the budget
or dominated, and that the frontier search chooses what the full grid chooses.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from cna_fast import capture_contrast, tune
from cna_fast.errors import CNAError
from cna_fast.search import (Candidate, NeutralKL, SearchBudget, SearchClock, batched_kl, candidate_rows,
                             decide_budget, frontier, precedes, spearman)
from cna_fast.search.pruning import OVER, WITHIN, shrink
from tests.planted_templates import EVAL, NEGATIVE, NEUTRAL, POSITIVE, build_planted_model, shows_template

SEARCH = {"behavior": shows_template, "neutral": NEUTRAL, "max_new_tokens": 4, "chat_template": False,
          "progress": False}
SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
MULTIPLIERS = (0.0, 0.5, -0.5, -1.0)


def synthetic_grid() -> list[Candidate]:
    return [Candidate(score, size, m, None) for score in ("diff", "t") for size in SIZES for m in MULTIPLIERS]


def synthetic_kl(candidate: Candidate) -> float:
    """Monotone in size and |1 - m|; the t ranking costs a tenth of the diff ranking."""
    return candidate.size * abs(1.0 - candidate.multiplier) ** 2 / 200 * (1.0 if candidate.score == "diff" else 0.1)


@pytest.fixture(scope="module")
def planted(plain_tokenizer):
    model = build_planted_model(len(plain_tokenizer))
    stats = capture_contrast(model, plain_tokenizer, POSITIVE, NEGATIVE, chat_template=False, progress=False)
    return model, stats


# ------------------------------------------------------------------------------ the order, synthetically


def test_precedes_is_the_order_of_size_and_strength_on_one_ranking_and_side():
    small, large = Candidate("t", 4, 0.0, None), Candidate("t", 8, -1.0, None)
    assert precedes(small, large) and not precedes(large, small) and precedes(small, small)
    assert not precedes(small, Candidate("diff", 8, -1.0, None))  # another ranking
    assert not precedes(Candidate("t", 4, 0.5, None), Candidate("t", 8, 3.0, None))  # the other side of 1
    assert not precedes(Candidate("t", 4, -1.0, None), Candidate("t", 8, 0.0, None))  # larger but milder
    assert not precedes(small, Candidate("t", 8, -1.0, None, round=1))  # another round of discovery


@pytest.mark.parametrize("budget", [0.001, 0.05, 0.1, 0.3, 100.0])
def test_bisection_decides_every_setting_as_measuring_it_would(budget):
    candidates = synthetic_grid()
    measured = []

    def measure(candidate: Candidate) -> str:
        measured.append(candidate)
        return OVER if synthetic_kl(candidate) > budget else WITHIN

    verdicts = decide_budget(candidates, measure)
    assert len(verdicts) == len(candidates)
    for candidate in candidates:
        assert verdicts[id(candidate)] == (OVER if synthetic_kl(candidate) > budget else WITHIN), candidate
    assert len(measured) <= len(candidates) // 3  # 64 settings, at most 21 measured
    assert len({id(c) for c in measured}) == len(measured)  # none measured twice


def test_bisection_stops_when_told_and_leaves_the_rest_undecided():
    candidates, calls = synthetic_grid(), []
    verdicts = decide_budget(candidates, lambda c: calls.append(c) or WITHIN, stop=lambda: len(calls) >= 2)
    assert len(calls) == 2 and len(verdicts) < len(candidates)


def test_frontier_holds_exactly_the_undominated_settings():
    within = [c for c in synthetic_grid() if synthetic_kl(c) <= 0.1]
    front = frontier(within)
    assert front and len(front) < len(within) / 3
    for candidate in within:
        dominated = any(other is not candidate and precedes(candidate, other) for other in within)
        assert (candidate in front) != dominated, candidate
    # one per (score, multiplier): the largest size within the budget
    for score, m in itertools.product(("diff", "t"), MULTIPLIERS):
        sizes = [c.size for c in within if (c.score, c.multiplier) == (score, m)]
        largest = [c for c in front if (c.score, c.multiplier) == (score, m)]
        assert [c.size for c in largest] in ([max(sizes)], []) if sizes else not largest


def test_shrink_finds_the_smallest_mildest_setting_as_good_as_the_best():
    within = [c for c in synthetic_grid() if c.score == "t"]
    best = next(c for c in within if (c.size, c.multiplier) == (128, -1.0))
    probed = []

    def as_good(candidate: Candidate) -> bool:  # monotone: at least 16 neurons at |1 - m| >= 1 do it
        probed.append(candidate)
        return candidate.size >= 16 and abs(1 - candidate.multiplier) >= 1.0

    found = shrink(best, within, as_good)
    assert (found.size, found.multiplier) == (16, 0.0)
    assert len(probed) <= 8 < len(within)


def test_spearman_matches_a_hand_computed_value():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0.1, 0.2, 0.2, 0.5], [0.0, 0.5, 0.5, 1.0]) == pytest.approx(1.0)  # ties share a rank
    assert spearman([1, 2, 3], [2, 1, 3]) == pytest.approx(0.5)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# -------------------------------------------------------------------------------- KL and the clock


def test_neutral_kl_on_the_first_texts_equals_a_separate_measurement(planted, plain_tokenizer):
    model, stats = planted
    from cna_fast import attribute

    candidates = [Candidate("diff", size, m, attribute(stats, top_k=size)) for size in (2, 4) for m in (0.0, -1.0)]
    shells, table = candidate_rows(candidates)
    kl = NeutralKL(model, plain_tokenizer, NEUTRAL, chunk_texts=2)
    assert kl.texts_used(1) == 2 and kl.texts_used(3) == 4 and kl.texts_used(None) == 4
    first = kl.measure(shells, table, texts=2)
    expected = batched_kl(model, plain_tokenizer, shells, table, NEUTRAL[:2])
    assert torch.allclose(first, expected, atol=1e-6)
    assert torch.allclose(kl.measure(shells, table), batched_kl(model, plain_tokenizer, shells, table, NEUTRAL),
                          atol=1e-6)
    assert len(kl._reference) == 2  # the unsteered pass was kept, not redone


def test_clock_turns_tokens_into_seconds_and_counts_down_the_budget():
    clock = SearchClock(minutes=1.0)
    with clock.timing("forward", 1000):
        pass
    clock.spent["forward"] = [2.0, 1000]  # 2 ms a token, as if measured
    assert clock.cost("forward", 500) == pytest.approx(1.0)
    assert clock.cost("generate", 100) == pytest.approx(0.2 * SearchClock.GENERATE_OVER_FORWARD)
    clock.spent["generate"] = [3.0, 100]
    assert clock.cost("generate", 10) == pytest.approx(0.3)
    assert 59.0 < clock.left() <= 60.0
    assert SearchClock().left() == math.inf


# ----------------------------------------------------------------------------- on the planted model


def test_every_setting_the_search_skipped_was_over_the_budget_or_dominated(planted, plain_tokenizer):
    model, stats = planted
    result = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, kl_budget=0.02, first_texts=2, **SEARCH)
    candidates = result.candidates
    shells, table = candidate_rows(candidates)
    truth = batched_kl(model, plain_tokenizer, shells, table, NEUTRAL).tolist()
    assert any(c.kl is None for c in candidates) and any(c.kl_texts == 2 for c in candidates)  # both cuts used
    assert sum(c.kl is not None for c in candidates) < len(candidates) / 2
    for candidate, kl in zip(candidates, truth):
        assert candidate.over_budget == (kl > 0.02), (candidate.score, candidate.size, candidate.multiplier, kl)
    generated = [c for c in candidates if c.screen_rate is not None or c.final]
    for candidate in candidates:
        if candidate.stage == "dominated":
            assert any(precedes(candidate, other) and other is not candidate for other in generated)
    for candidate in candidates:
        if candidate.final:
            assert candidate.kl_texts == len(NEUTRAL)  # a finalist's KL is measured on every text


def test_the_frontier_search_chooses_what_the_full_grid_chooses(planted, plain_tokenizer):
    model, stats = planted
    for budget in (0.005, 0.1):
        fast = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, kl_budget=budget, **SEARCH)
        full = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, kl_budget=budget, strategy="full",
                    **SEARCH)
        assert all(c.kl_texts == len(NEUTRAL) for c in full.candidates)
        assert (fast.chosen.score, fast.chosen.size, fast.chosen.multiplier) == (
            full.chosen.score, full.chosen.size, full.chosen.multiplier)
        assert fast.tokens_spent < full.tokens_spent
        agreement = full.screen_agreement
        assert agreement["n"] == sum(c.final for c in full.candidates) >= 3
        assert "screen against full runs" in full.summary() or agreement["spearman"] is None


def test_a_time_budget_cuts_the_search_and_says_what_it_skipped(planted, plain_tokenizer):
    model, stats = planted
    result = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, minutes=1e-6, **SEARCH)
    assert result.skipped and all(c.kl is None and c.behavior_rate is None for c in result.skipped)
    assert result.baseline.final  # the unsteered baseline is always measured
    assert "time budget" in result.summary() and result.summary_meta()["skipped"] == len(result.skipped)
    assert result.seconds > 0 and result.full_grid_seconds > 0
    with pytest.raises(CNAError, match="minutes"):
        SearchBudget(minutes=0)
    with pytest.raises(CNAError, match="strategy"):
        SearchBudget(strategy="exhaustive")


def test_cli_strategy_and_time_budget(model_dir, prompt_files, tmp_path, capsys):
    from cna_fast.cli import main

    positive, negative = prompt_files
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("the zebra runs\nzebra stripes\n")
    common = ["tune", "--model", model_dir, "--positive", positive, "--negative", negative, "--eval-prompts",
              eval_prompts, "--behavior", "english", "--sizes", "2,8", "--scores", "diff", "--max-new-tokens", "4",
              "--kl-budget", "5", "--quiet"]
    table = tmp_path / "full.csv"
    assert main([str(arg) for arg in common + ["--strategy", "full", "--out", tmp_path / "a.safetensors",
                                                "--csv", table]]) == 0
    from cna_fast.evaluation import bundled_neutral_texts

    rows = table.read_text().splitlines()[1:]
    texts = str(len(bundled_neutral_texts()))
    assert len(rows) == 1 + 2 * 4 and all(row.split(",")[7] == texts for row in rows[1:])  # KL on every text
    capsys.readouterr()
    assert main([str(arg) for arg in common + ["--time-budget", "0.0001", "--out", tmp_path / "b.safetensors"]]) == 2
    printed = capsys.readouterr()
    assert "left unmeasured" in printed.out and "raise the time budget" in printed.err
    assert not (tmp_path / "b.safetensors").exists()
    for bad in (["--time-budget", "0"], ["--strategy", "exhaustive"]):
        with pytest.raises(SystemExit) as exit_:
            main([str(arg) for arg in common + bad + ["--out", tmp_path / "c.safetensors"]])
        assert exit_.value.code == 2
