"""Evaluation: does steering change the behavior, and what else does it change?

judges: whether an answer shows the behavior (refusal rules, language, a model judge, agreement
with human labels); metrics: quality, answer perplexity, KL, perplexity, multiple choice;
compare: the circuit against the CAA, random-circuit and directional-ablation baselines.
"""
from .compare import (DEFAULT_METHODS, DEFAULT_STRENGTHS, METHODS, MethodComparison, compare_methods,
                      default_strengths, score_answers)
from .judges import (BEHAVIORS, REFUSAL_PHRASES, RUBRIC, ModelJudge, agreement_line, behavior_rate, detect_language,
                     is_refusal, judge_agreement, judge_answers, language_rate, read_labeled_answers, refusal_rate,
                     resolve_behavior)
from .metrics import (answer_perplexity, bundled_multiple_choice, bundled_neutral_texts, capability_metrics,
                      multiple_choice_accuracy, next_token_logprobs, next_token_mask, quality, token_kl)

__all__ = ["BEHAVIORS", "DEFAULT_METHODS", "DEFAULT_STRENGTHS", "METHODS", "REFUSAL_PHRASES", "RUBRIC",
           "MethodComparison", "ModelJudge", "agreement_line", "answer_perplexity", "behavior_rate",
           "bundled_multiple_choice", "bundled_neutral_texts", "capability_metrics", "compare_methods",
           "default_strengths", "detect_language", "is_refusal", "judge_agreement", "judge_answers", "language_rate",
           "multiple_choice_accuracy", "next_token_logprobs", "next_token_mask", "quality", "read_labeled_answers",
           "refusal_rate", "resolve_behavior", "score_answers", "token_kl"]
