"""Measure what steering changes: the target behavior, output quality and general capability,
for the circuit and for two baselines (CAA and a random circuit of the same shape)."""
from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Callable, ContextManager, Iterable, Sequence

import torch

from .errors import CNAError
from .judges import (REFUSAL_PHRASES, ModelJudge, is_refusal, judge_agreement, judge_answers,  # noqa: F401 (re-exported)
                     length_sorted_batches, right_padded_logits)
from .models import get_adapter

# Frequent function words that are unambiguous between French and English (no "a", "on", "as", ...).
FRENCH_WORDS = frozenset("""
le la les un une des du de et est sont pour que qui dans pas vous je il elle nous ils elles avec sur au aux
ce cette ces mais ou très plus faut peut être avoir fait comme leur leurs mon ma mes ton ta tes son sa ses
notre votre voici voilà aussi donc car parce quand où comment pourquoi oui non bien tout tous toutes
""".split())
ENGLISH_WORDS = frozenset("""
the is are and of to that it for you with this be can was were not have has will would they we he she
what which there their your from but or by how why when where yes no also because so all very here
""".split())
_WORD = re.compile(r"[a-zàâäçéèêëîïôöùûüÿœæ']+", re.IGNORECASE)
_FRENCH_LETTERS = re.compile(r"[àâçéèêëîïôùûœ]", re.IGNORECASE)


def detect_language(text: str) -> str:
    """'fr', 'en' or 'unknown', by counting unambiguous function words (French accents count for French)."""
    words = [word.strip("'").lower() for word in _WORD.findall(text)]
    french = sum(word in FRENCH_WORDS for word in words) + len(_FRENCH_LETTERS.findall(text)) / 2
    english = sum(word in ENGLISH_WORDS for word in words)
    if french == english:
        return "unknown"
    return "fr" if french > english else "en"


def language_rate(texts: Iterable[str], language: str) -> float:
    """Fraction of `texts` detected as `language` ('fr' or 'en')."""
    texts = list(texts)
    return sum(detect_language(text) == language for text in texts) / len(texts) if texts else 0.0


_TOKEN = re.compile(r"\w+|[^\w\s]+")


def quality(text: str, n: int = 4) -> float:
    """1 - fraction of repeated n-grams of words and punctuation runs (the paper's repetition measure; 1.0 = no
    repetition). Punctuation counts as tokens so that markup loops such as "1. **1. **1." score low."""
    tokens = _TOKEN.findall(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def refusal_rate(texts: Iterable[str], phrases: Sequence[str] = REFUSAL_PHRASES) -> float:
    """Fraction of texts that refuse."""
    return behavior_rate(texts, lambda text: is_refusal(text, phrases))


def behavior_rate(texts: Iterable[str], classifier: Callable[[str], bool | float]) -> float:
    """Mean of a pluggable behavior classifier (text -> bool or score) over the texts."""
    values = [float(classifier(text)) for text in texts]
    return sum(values) / len(values) if values else 0.0


BEHAVIORS: dict[str, Callable[[str], bool]] = {
    "refusal": is_refusal,
    "french": lambda text: detect_language(text) == "fr",
    "english": lambda text: detect_language(text) == "en",
}


def bundled_neutral_texts() -> list[str]:
    """Neutral English paragraphs (bundled) for perplexity and next-token KL."""
    text = resources.files("cna_fast").joinpath("data/neutral.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def bundled_multiple_choice() -> list[dict]:
    """Easy general-knowledge multiple-choice questions (bundled): question, 4 choices, answer index."""
    text = resources.files("cna_fast").joinpath("data/multiple_choice.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def answer_perplexity(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                      chat_template: bool | str | None = None, batch_size: int = 16) -> list[float]:
    """Perplexity of each answer given its prompt, under `model` as it is now (call it unsteered).

    The prompt goes in as generation saw it (chat template, generation prompt), then the answer's tokens;
    only the answer's tokens are scored. Fluent on-topic answers score low, word salad and off-topic text
    high; a pure loop ("1. **1. **1.") scores low, since copying is easy: `quality` catches that one.
    nan for an empty answer.
    """
    from .batching import encode_prompts

    if len(prompts) != len(answers):
        raise CNAError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_rows = encode_prompts(tokenizer, prompts, chat_template)
    answer_rows = tokenizer(list(answers), add_special_tokens=False)["input_ids"] if answers else []
    rows = [prompt + answer for prompt, answer in zip(prompt_rows, answer_rows)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = [float("nan")] * len(rows)
    for batch in length_sorted_batches([len(row) for row in rows], batch_size):
        logprobs = torch.log_softmax(right_padded_logits(model, [rows[i] for i in batch], pad_id), dim=-1)
        for slot, index in enumerate(batch):
            start, end = max(len(prompt_rows[index]), 1), len(rows[index])
            if end > start:
                targets = torch.tensor(rows[index][start:end])
                nll = -logprobs[slot, start - 1:end - 1].gather(-1, targets[:, None]).mean()
                result[index] = math.exp(float(nll))
    return result


def _finite_mean(values: Iterable[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else float("nan")


def resolve_behavior(behavior: str | Callable) -> Callable:
    """A behavior name in BEHAVIORS, a text -> bool/score callable, or a judge that reads prompts too."""
    classifier = BEHAVIORS.get(behavior) if isinstance(behavior, str) else behavior
    if not callable(classifier):
        raise CNAError(f"unknown behavior {behavior!r}: choose one of {', '.join(BEHAVIORS)} or pass a callable")
    return classifier


def score_answers(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], behavior: str | Callable, *,
                  chat_template: bool | str | None = None, batch_size: int = 16) -> list[dict]:
    """Per answer: the behavior (bool or score), the 4-gram quality and the answer perplexity under the
    unsteered model. Shared by `compare_methods` and `cna sweep`; call it with no steering active."""
    judge = resolve_behavior(behavior)
    if getattr(judge, "wants_prompts", False):
        verdicts = judge_answers(judge, prompts, answers)
    else:
        verdicts = [judge(answer) for answer in answers]
    perplexities = answer_perplexity(model, tokenizer, prompts, answers, chat_template=chat_template,
                                     batch_size=batch_size)
    return [{"behavior": float(verdict), "quality": quality(answer), "answer_ppl": perplexity}
            for verdict, answer, perplexity in zip(verdicts, answers, perplexities)]


def _token_logprobs(model, tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities [B, T-1, V], the targets [B, T-1] and the mask of real targets."""
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    device = get_adapter(model).body.get_input_embeddings().weight.device
    with torch.inference_mode():
        logits = model(input_ids=encoded.input_ids.to(device), attention_mask=encoded.attention_mask.to(device)).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
    mask = (encoded.attention_mask[:, 1:] * encoded.attention_mask[:, :-1]).bool()
    return logprobs, encoded.input_ids[:, 1:], mask


def capability_metrics(model, tokenizer, texts: Sequence[str], reference: list[torch.Tensor] | None = None,
                       context: Callable[[], ContextManager] = contextlib.nullcontext,
                       batch_size: int = 16) -> dict:
    """Perplexity of `texts` and mean next-token KL(reference || model) under the steering `context`,
    in batches of `batch_size` texts.

    reference: the unsteered log-probabilities (the "_logprobs" of an unsteered call with the same texts and
    batch size); KL is 0 when omitted.
    """
    texts = list(texts)
    chunks = [texts[start:start + batch_size] for start in range(0, len(texts), batch_size)]
    nll_sum, kl_sum, count, logprobs_per_chunk = 0.0, 0.0, 0, []
    with context():
        for index, chunk in enumerate(chunks):
            logprobs, targets, mask = _token_logprobs(model, tokenizer, chunk)
            nll_sum += float(-logprobs.gather(-1, targets[..., None])[..., 0][mask].sum())
            count += int(mask.sum())
            if reference is not None:
                base = reference[index]
                kl_sum += float((base.exp() * (base - logprobs)).sum(-1)[mask].sum())
            logprobs_per_chunk.append(logprobs)
    return {"perplexity": math.exp(nll_sum / count), "kl": max(kl_sum / count, 0.0), "_logprobs": logprobs_per_chunk}


def multiple_choice_accuracy(model, tokenizer, questions: Sequence[dict] | None = None,
                             context: Callable[[], ContextManager] = contextlib.nullcontext,
                             batch_size: int = 16) -> float:
    """Accuracy on 4-way multiple choice: the answer letter with the highest next-token logit."""
    questions = list(questions) if questions is not None else bundled_multiple_choice()
    letters = "ABCD"
    prompts = [f"Question: {q['question']}\n" + "".join(f"{letters[i]}. {choice}\n" for i, choice in
                                                        enumerate(q["choices"])) + "Answer:" for q in questions]
    letter_ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in letters]
    rows = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    choices = [0] * len(rows)
    with context():
        for batch in length_sorted_batches([len(row) for row in rows], batch_size):
            logits = right_padded_logits(model, [rows[i] for i in batch], pad_id)
            last = logits[torch.arange(len(batch)), torch.tensor([len(rows[i]) - 1 for i in batch])]
            for index, choice in zip(batch, last[:, letter_ids].argmax(-1).tolist()):
                choices[index] = choice
    return sum(choice == q["answer"] for choice, q in zip(choices, questions)) / len(questions)


METHODS = ("cna", "caa", "random")
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 2.0)
_COLUMNS = (("behavior_rate", 8, ".3f"), ("quality", 7, ".3f"), ("answer_ppl", 10, ".2f"), ("kl", 7, ".4f"),
            ("perplexity", 8, ".2f"), ("mc_accuracy", 6, ".3f"))


@dataclass
class MethodComparison:
    """Metrics per (method, strength) and every generation, from `compare_methods`."""

    metrics: list[dict]
    generations: list[dict]

    def table(self) -> str:
        names = {"answer_ppl": "answer_ppl", "perplexity": "ppl", "mc_accuracy": "mc_acc", "behavior_rate": "behavior"}
        header = f"{'method':<7} {'strength':>8} " + " ".join(f"{names.get(key, key):>{width}}"
                                                               for key, width, _ in _COLUMNS)
        lines = [header, "-" * len(header)]
        for row in self.metrics:
            cells = [f"{'-':>{width}}" if row[key] is None else f"{row[key]:>{width}{form}}"
                     for key, width, form in _COLUMNS]
            lines.append(f"{row['method']:<7} {row['strength']:>8g} " + " ".join(cells))
        return "\n".join(lines)


SweepResult = MethodComparison  # the former name


def _strength_context(model, method: str, strength: float, circuit, control) -> Callable[[], ContextManager]:
    """The steering for one method at one strength: CNA/random scale neurons by `strength`; CAA adds
    (strength - 1) times the MLP-output difference, so strength 1 is the identity for every method."""
    from .steering import caa, steer

    if method == "cna":
        return lambda: steer(model, circuit, strength)
    if method == "random":
        return lambda: steer(model, control, strength)
    return lambda: caa(model, circuit, strength - 1.0)


def _check_comparison(circuit, prompts: Sequence[str], strengths: Sequence[float], methods: Sequence[str]) -> None:
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise CNAError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    if not prompts:
        raise CNAError("no prompts to evaluate")
    if not strengths or not all(math.isfinite(value) for value in strengths):
        raise CNAError("strengths must be finite numbers")
    if "caa" in methods and circuit.caa_directions is None:
        raise CNAError("the CAA baseline needs a circuit with CAA directions: rediscover it with this cna_fast")


IDENTITY = ("identity", 1.0)


def _generation_key(method: str, strength: float) -> tuple[str, float]:
    """Strength 1 is the unsteered model for every method: those rows are generated once and shared."""
    return IDENTITY if strength == 1.0 else (method, strength)


def _generate_settings(model, tokenizer, circuit, control, prompts: list[str], keys: list[tuple[str, float]],
                       generation: dict) -> dict[tuple[str, float], list[str]]:
    """One batched generation of every (method, strength) setting, with per-row steering."""
    from .steering import AddDirections, generate

    table, alphas = [], []
    for method, value in keys:
        table += [[value if method == "cna" else 1.0, value if method == "random" else 1.0]] * len(prompts)
        alphas += [value - 1.0 if method == "caa" else 0.0] * len(prompts)
    alphas = torch.tensor(alphas)

    def caa_rows(rows: list[int]) -> AddDirections:
        return AddDirections(model, circuit.caa_layers, circuit.caa_directions, alphas[rows])

    uses_caa = any(method == "caa" for method, _ in keys)
    texts = generate(model, tokenizer, prompts * len(keys), circuits=[circuit, control],
                     multipliers=torch.tensor(table), batch_context=caa_rows if uses_caa else None, **generation)
    return {key: texts[index * len(prompts):(index + 1) * len(prompts)] for index, key in enumerate(keys)}


def _capability_rows(model, tokenizer, circuit, control, configs, neutral, questions, batch_size: int,
                     progress: bool) -> list[dict]:
    """KL, perplexity and multiple-choice accuracy per (method, strength); strength 1 is measured once."""
    from tqdm.auto import tqdm

    neutral = list(neutral) if neutral is not None else bundled_neutral_texts()
    base = capability_metrics(model, tokenizer, neutral, batch_size=batch_size)
    base_row = {"kl": 0.0, "perplexity": base["perplexity"],
                "mc_accuracy": multiple_choice_accuracy(model, tokenizer, questions, batch_size=batch_size)}
    rows = []
    for method, value in tqdm(configs, desc="capability (KL, perplexity, multiple choice)", unit="setting",
                              disable=not progress):
        if _generation_key(method, value) == IDENTITY:
            rows.append(dict(base_row))
            continue
        context = _strength_context(model, method, value, circuit, control)
        measured = capability_metrics(model, tokenizer, neutral, base["_logprobs"], context, batch_size)
        rows.append({"kl": measured["kl"], "perplexity": measured["perplexity"],
                     "mc_accuracy": multiple_choice_accuracy(model, tokenizer, questions, context, batch_size)})
    return rows


def compare_methods(model, tokenizer, circuit, prompts: Sequence[str],
                    strengths: Sequence[float] = DEFAULT_STRENGTHS, *, methods: Sequence[str] = METHODS,
                    behavior: Callable | str = "refusal", neutral: Sequence[str] | None = None,
                    questions: Sequence[dict] | None = None, capability: bool = True, max_new_tokens: int = 48,
                    batch_size: int = 16, seed: int = 0, progress: bool = True, positions: str = "all",
                    chat_template: bool | str | None = None, do_sample: bool = False,
                    **generate_kwargs) -> MethodComparison:
    """Behavior rate, quality (4-gram and answer perplexity), KL, perplexity and multiple-choice accuracy per
    method and strength: the circuit against its baselines.

    All generations run as one batched generation with per-row steering; strength 1 (the unsteered model for
    every method) is generated and measured once. methods: "cna" (the circuit), "caa" (residual-stream
    baseline from the circuit's MLP-output directions, alpha = strength - 1), "random" (as many random neurons
    in the same layers). behavior: a name in BEHAVIORS, a callable text -> bool or score, or a judge that reads
    the prompts too (`ModelJudge`). capability=False skips the KL / perplexity / multiple-choice pass (None).
    positions, chat_template, do_sample and extra keyword arguments (temperature, ...) go to `generate`.
    """
    classifier = resolve_behavior(behavior)
    prompts, strengths = list(prompts), [float(value) for value in strengths]
    _check_comparison(circuit, prompts, strengths, methods)
    control = circuit.random_like(seed)
    configs = [(method, value) for method in methods for value in strengths]
    keys = list(dict.fromkeys(_generation_key(method, value) for method, value in configs))
    generation = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, positions=positions,
                      chat_template=chat_template, do_sample=do_sample, **generate_kwargs)
    outputs = _generate_settings(model, tokenizer, circuit, control, prompts, keys, generation)
    scored = {key: score_answers(model, tokenizer, prompts, texts, classifier, chat_template=chat_template,
                                 batch_size=batch_size) for key, texts in outputs.items()}
    capabilities = (_capability_rows(model, tokenizer, circuit, control, configs, neutral, questions, batch_size,
                                     progress) if capability else [{"kl": None, "perplexity": None, "mc_accuracy": None}
                                                                   for _ in configs])
    metrics, generations = [], []
    for (method, value), measured in zip(configs, capabilities):
        key = _generation_key(method, value)
        rows = scored[key]
        metrics.append({"method": method, "strength": value,
                        "behavior_rate": sum(row["behavior"] for row in rows) / len(rows),
                        "quality": sum(row["quality"] for row in rows) / len(rows),
                        "answer_ppl": _finite_mean(row["answer_ppl"] for row in rows), **measured,
                        "prompts": len(rows)})
        generations += [{"method": method, "strength": value, "prompt": prompt, "output": output, **row}
                        for prompt, output, row in zip(prompts, outputs[key], rows)]
    return MethodComparison(metrics, generations)


def sweep(*args, **kwargs) -> MethodComparison:
    """Deprecated name of `compare_methods` (not the `cna sweep` command, which sweeps one circuit's multiplier)."""
    warnings.warn("cna_fast.evaluate.sweep is renamed compare_methods", DeprecationWarning, stacklevel=2)
    return compare_methods(*args, **kwargs)
