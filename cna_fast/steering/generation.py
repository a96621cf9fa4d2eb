"""Batched generation: how answers are generated (`GenerationSettings`), and one left-padded batch at a time.

`steering.generate` sorts prompts by length, cuts them into batches and steers each batch with
its own rows of the multiplier table; the pieces that need no steering are here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..batching import pad_batch, pad_token_id
from ..circuit import Circuit, as_multiplier
from ..errors import CNAError, positive_int
from ..models import input_device
from .scale import check_multipliers, validate_positions


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated.

    max_new_tokens / batch_size: the answer length and how many prompts share a batch.
    positions: which tokens are steered: "all", "prompt" or "generated".
    chat_template: None wraps prompts in the tokenizer's template when it has one; False feeds raw
        text; a string is a template of its own.
    do_sample / temperature / top_p: greedy decoding, or sampling at `temperature` from the nucleus `top_p`.
    seed: None samples from torch's global generator as it stands (torch.manual_seed sets it); a
        number seeds it before the generation; a batch job seeds each record from (seed, record id).
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    positions: str = "all"
    chat_template: bool | str | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        positive_int(self.max_new_tokens, "max_new_tokens")
        positive_int(self.batch_size, "batch_size")
        validate_positions(self.positions)
        if not (self.chat_template is None or isinstance(self.chat_template, (bool, str))):
            raise CNAError(f"chat_template must be None, True, False or a template string, got {self.chat_template!r}")
        if self.do_sample and not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise CNAError(f"temperature must be a positive number when sampling, got {self.temperature!r}; for "
                           "greedy decoding do not sample")
        if not 0 < self.top_p <= 1:
            raise CNAError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise CNAError(f"seed must be an integer or None, got {self.seed!r}")

    def generate_kwargs(self) -> dict:
        """The options `model.generate` takes from these settings (temperature and top_p only when sampling)."""
        options = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            options.update(temperature=self.temperature, top_p=self.top_p)
        return options


def checked_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a non-empty list of strings; a single string is an error, not a list of characters."""
    if isinstance(prompts, (str, bytes)):
        raise CNAError("prompts must be a list of strings, got a single string: pass [prompt]")
    try:
        prompts = list(prompts)
    except TypeError:
        raise CNAError(f"prompts must be a list of strings, got {type(prompts).__name__}") from None
    if not prompts:
        raise CNAError("no prompts to generate from")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise CNAError(f"prompts[{index}] is {type(prompt).__name__}, not a string: give text prompts")
    return prompts


def multiplier_table(circuits: list[Circuit] | None, multiplier: float, multipliers, n_prompts: int):
    """The checked multipliers of a generation: [n_circuits] or [n_prompts, n_circuits]; None unsteered."""
    if circuits is None:
        return None
    table = check_multipliers(multipliers if multipliers is not None else [as_multiplier(multiplier)] * len(circuits),
                              len(circuits))
    if table.dim() == 2 and table.shape[0] != n_prompts:
        raise CNAError(f"per-prompt multipliers have {table.shape[0]} rows for {n_prompts} prompts")
    return table


def generate_batch(model: nn.Module, tokenizer, sequences: list[list[int]], options: dict) -> list[str]:
    """Left-padded generation of one batch of token-id rows; returns each row's new text, stripped."""
    pad_id = pad_token_id(tokenizer)
    batch = pad_batch(sequences, [0] * len(sequences), pad_id, "left")
    device = input_device(model)
    with torch.inference_mode():
        generated = model.generate(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                   pad_token_id=pad_id, **options)
    texts = tokenizer.batch_decode(generated[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in texts]
