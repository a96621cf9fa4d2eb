"""Measures of what steering changes, besides the behavior itself: output quality (repeated 4-grams,
answer perplexity), next-token log-probabilities, KL and perplexity on neutral text, multiple choice."""
from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Callable, ContextManager, Iterable, Sequence

import torch

from ..batching import encode_prompts, pad_batch
from ..errors import CNAError, positive_int
from ..models import input_device
from ..prompts import bundled_text


_TOKEN = re.compile(r"\w+|[^\w\s]+")


def quality(text: str, n: int = 4) -> float:
    """1 - fraction of repeated n-grams of words and punctuation runs (the paper's repetition measure; 1.0 = no
    repetition). Punctuation counts as tokens so that markup loops such as "1. **1. **1." score low."""
    tokens = _TOKEN.findall(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 1.0
    return len(set(grams)) / len(grams)


def bundled_neutral_texts() -> list[str]:
    """Neutral English paragraphs (bundled) for perplexity and next-token KL."""
    return [line for line in bundled_text("neutral.txt").splitlines() if line.strip()]


def bundled_multiple_choice() -> list[dict]:
    """Easy general-knowledge multiple-choice questions (bundled): question, 4 choices, answer index."""
    return [json.loads(line) for line in bundled_text("multiple_choice.jsonl").splitlines() if line.strip()]


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits [B, T, V] for a batch, in float32 on the CPU (no gradients)."""
    device = input_device(model)
    with torch.inference_mode():
        return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float().cpu()


def right_padded_logits(model, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits [B, T, V] of token-id rows, right-padded (so every real position sees exactly its own row)."""
    batch = pad_batch(rows, [0] * len(rows), pad_id, "right")
    return model_logits(model, batch.input_ids, batch.attention_mask)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (less padding), longest first."""
    positive_int(batch_size, "batch_size")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [B, T-1, V] of every next token of a batch (float32, CPU)."""
    return torch.log_softmax(model_logits(model, input_ids, attention_mask)[:, :-1], dim=-1)


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T-1]: the next-token positions whose input and target are both real tokens."""
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()


def token_kl(reference: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || logprobs) per position [..., T-1], from log-probabilities over the vocabulary."""
    return (reference.exp() * (reference - logprobs)).sum(-1)


def answer_perplexity(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                      chat_template: bool | str | None = None, batch_size: int = 16) -> list[float]:
    """Perplexity of each answer given its prompt, under `model` as it is now (call it unsteered).

    The prompt goes in as generation saw it (chat template, generation prompt), then the answer's tokens;
    only the answer's tokens are scored. Fluent on-topic answers score low, word salad and off-topic text
    high; a pure loop ("1. **1. **1.") scores low, since copying is easy: `quality` catches that one.
    nan for an empty answer.
    """
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
            encoded = tokenizer(list(chunk), return_tensors="pt", padding=True)
            logprobs = next_token_logprobs(model, encoded.input_ids, encoded.attention_mask)
            targets, mask = encoded.input_ids[:, 1:], next_token_mask(encoded.attention_mask)
            nll_sum += float(-logprobs.gather(-1, targets[..., None])[..., 0][mask].sum())
            count += int(mask.sum())
            if reference is not None:
                kl_sum += float(token_kl(reference[index], logprobs)[mask].sum())
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


def finite_mean(values: Iterable[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else float("nan")
