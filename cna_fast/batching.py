"""Prompts to padded batches: chat template, shared prefix, length limits, length buckets, padding.

Used by capture (discovery) and by steering's batched generation alike. Everything here is
model-agnostic tokenizer and tensor work; nothing runs the model.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, TypeVar

import torch

from .errors import CNAError, one_of

PADDING_SIDES = ("left", "right")
LONG_PROMPT_POLICIES = ("truncate", "error")
WINDOW_BATCHES = 32  # a tokenization window holds this many batches, sorted by length
MIN_PREFIX_TOKENS = 2  # a shorter shared prefix is not worth a cached forward pass
BATCH_OVERHEAD_TOKENS = 32  # fixed cost of one forward pass, in tokens of compute (weights streamed once)
BATCH_MAX_TOKENS = 16384  # padded tokens per forward pass at most, to bound activation memory

Item = TypeVar("Item")


def _template_kwargs(tokenizer, chat_template: bool | str | None) -> dict | None:
    """Arguments for apply_chat_template, or None to feed raw text."""
    if chat_template is False:
        return None
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(chat_template, str):
        return {"chat_template": chat_template}
    if chat_template is True and not has_template:
        raise CNAError("chat_template=True but the tokenizer has no chat template: pass chat_template=False or "
                       "a template")
    return {} if has_template else None


def uses_chat_template(tokenizer, chat_template: bool | str | None) -> bool:
    """Whether prompts are wrapped in the chat template (None: when the tokenizer has one)."""
    return _template_kwargs(tokenizer, chat_template) is not None


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool | str | None = None) -> list[list[int]]:
    """Token ids of each prompt, as the model sees it: a user turn plus generation prompt, or raw text."""
    template = _template_kwargs(tokenizer, chat_template)
    if template is None:
        return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, **template
        )
        for prompt in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def shared_prefix(tokenizer, chat_template: bool | str | None = None) -> list[int]:
    """Tokens the chat template puts before every user message (empty without a template)."""
    if not uses_chat_template(tokenizer, chat_template):
        return []
    first, second = encode_prompts(tokenizer, ["0", "Q"], chat_template)
    length = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    return first[:length]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_prompt(prompt: object, number: int, where: str = "") -> str:
    """`prompt` itself if it is a non-empty string; `number` and `where` name it in the error."""
    if not isinstance(prompt, str):
        raise CNAError(f"{where}prompt {number} is a {type(prompt).__name__}, not a string")
    if not prompt.strip():
        raise CNAError(f"{where}prompt {number} is empty: remove empty prompts from the set")
    return prompt


@dataclass
class Batch:
    """A padded batch: ids and mask [B, T], positions [B, T], label per row, real lengths."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    padding_side: str

    def last_token_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's last real token of `hidden` [B, T, ...], whatever the padding side."""
        if self.padding_side == "left":
            return hidden[:, -1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, self.lengths.to(hidden.device) - 1]


def pad_batch(sequences: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int, padding_side: str,
              position_offset: int = 0) -> Batch:
    """Pad token id lists to one tensor; position ids count real tokens only, from `position_offset`."""
    lengths = torch.tensor([len(seq) for seq in sequences])
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0) + position_offset
    return Batch(input_ids, attention_mask, position_ids, torch.tensor(list(labels), dtype=torch.long), lengths,
                 padding_side)


def pad_after_prefix(sequences: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int,
                     prefix_length: int) -> tuple[Batch, torch.Tensor]:
    """A right-padded batch of prompts that continue a cached prefix, and the mask over prefix + prompt.

    Right padding keeps prefix and prompt contiguous: sliding-window attention measures distance in
    cache slots, and pads in between would push the prefix out. Positions start after the prefix.
    """
    batch = pad_batch(sequences, labels, pad_id, "right", position_offset=prefix_length)
    prefix_mask = torch.ones(len(sequences), prefix_length, dtype=batch.attention_mask.dtype)
    return batch, torch.cat([prefix_mask, batch.attention_mask], dim=1)


def sample_labels(batch: Batch, reduction: str) -> torch.Tensor:
    """The group label of each sample row: one per prompt, or one per real token for reduction "all"."""
    if reduction == "all":
        return batch.labels[:, None].expand_as(batch.attention_mask)[batch.attention_mask.bool()]
    return batch.labels


def length_buckets(lengths: Sequence[int], max_rows: int, overhead_tokens: int = BATCH_OVERHEAD_TOKENS,
                   max_tokens: int = BATCH_MAX_TOKENS) -> list[tuple[int, int]]:
    """Split ascending `lengths` into consecutive batches that minimize padded work.

    A batch holds at most `max_rows` prompts and (unless it is a single prompt) `max_tokens`
    padded tokens. It costs rows x its longest length (the tokens the model computes) plus a
    fixed per-forward overhead; dynamic programming finds the cheapest split, so batches are
    smaller where lengths climb steeply and full where they are flat. Returns (start, stop) pairs.
    """
    count = len(lengths)
    best = [0.0] + [float("inf")] * count
    start_of = [0] * (count + 1)
    for stop in range(1, count + 1):
        for start in range(stop - 1, max(0, stop - max_rows) - 1, -1):
            rows = stop - start
            if rows > 1 and rows * lengths[stop - 1] > max_tokens:
                break  # longer spans only add rows of the same maximum length
            cost = best[start] + rows * lengths[stop - 1] + overhead_tokens
            if cost < best[stop]:
                best[stop], start_of[stop] = cost, start
    spans, stop = [], count
    while stop > 0:
        spans.append((start_of[stop], stop))
        stop = start_of[stop]
    return spans[::-1]


def windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of `size` items (the last may be shorter), read lazily."""
    iterator = iter(items)
    while window := list(itertools.islice(iterator, size)):
        yield window


@dataclass(frozen=True)
class PlannedBatch:
    """Prompts of one forward pass: token ids (shared prefix cut off when `uses_prefix`), labels."""

    sequences: list[list[int]]
    labels: list[int]
    uses_prefix: bool


def plan_batches(encoded: Sequence[list[int]], labels: Sequence[int], max_rows: int,
                 prefix: Sequence[int] = ()) -> Iterator[PlannedBatch]:
    """Length-bucketed batches; prompts that start with `prefix` come first, with it cut off."""
    n_prefix = len(prefix)
    prefix = list(prefix)
    with_prefix = [n_prefix > 0 and len(ids) > n_prefix and ids[:n_prefix] == prefix for ids in encoded]
    for use_prefix in (True, False):
        members = [i for i in range(len(encoded)) if with_prefix[i] == use_prefix]
        members.sort(key=lambda i: len(encoded[i]))
        cut = n_prefix if use_prefix else 0
        for start, stop in length_buckets([len(encoded[i]) - cut for i in members], max_rows):
            chunk = members[start:stop]
            yield PlannedBatch([encoded[i][cut:] for i in chunk], [labels[i] for i in chunk], use_prefix)


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config, if it states one."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generation_overflow(model, prompt_tokens: int, max_new_tokens: int) -> str | None:
    """Why a prompt of `prompt_tokens` tokens cannot get `max_new_tokens` more within the model's context, or None.

    Generation refuses such a prompt (it does not truncate it: cutting a prompt changes what is asked).
    """
    context = context_length(model)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return None
    return (f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, more than the model's "
            f"context of {context} tokens: shorten the prompt or lower max_new_tokens (--max-new-tokens)")


class LengthLimit:
    """Applies a token limit to encoded prompts: truncate (keep the shared prefix and the end) or refuse."""

    def __init__(self, max_length: int | None, on_long: str, prefix: Sequence[int] = ()) -> None:
        one_of(on_long, LONG_PROMPT_POLICIES, "on_long")
        if max_length is not None and max_length <= len(prefix):
            raise CNAError(f"max_length {max_length} leaves no room after the {len(prefix)}-token "
                           "chat-template prefix")
        self.max_length = max_length
        self.on_long = on_long
        self.prefix = list(prefix)
        self.truncated = 0

    def fit(self, ids: list[int], number: int) -> list[int]:
        """`ids` within the limit; `number` names the prompt in the error."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.on_long == "error":
            raise CNAError(f"prompt {number} has {len(ids)} tokens, more than max_length={self.max_length}: shorten "
                           "it, raise max_length, or let it be truncated (on_long='truncate')")
        self.truncated += 1
        keep = len(self.prefix) if ids[:len(self.prefix)] == self.prefix else 0
        return ids[:keep] + ids[len(ids) - (self.max_length - keep):]
