"""Continuous batching on the model's own forward: a finished row's slot goes to the next prompt.

transformers' continuous batching (`generate_batch`) packs all requests into one row of tokens
with a paged cache, so a steering hook on the down projection sees [1, tokens, d_ff] and per-row
multipliers would need a per-token table; on this CPU it also took ~15 s to serve two prompts of
a tiny model. This scheduler keeps the active rows in one left-padded DynamicCache instead:

- new prompts are prefilled as a small left-padded batch with a cache of their own, which is
  then merged in (both sides padded on the left to a common width; the padding is masked);
- a row that finishes (end-of-sequence token or `max_new_tokens`) is dropped from the cache at
  once, and columns that are padding for every remaining row are cut off;
- steering is the ordinary `steer(model, circuits, multipliers=[rows, n_circuits])`, rebuilt
  whenever the set of rows changes, so the hooks are exactly those of `steer`.

Models whose cache has other layer types (sliding windows, linear attention) cannot be merged
this way; they run the same loop with refills only once the batch is empty (static batches that
still drop finished rows).
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..batching import pad_batch
from ..circuit import Circuit
from ..models import cache_keyword, input_device
from ..steering import GenerationSettings, Steering, steer


@dataclass
class Request:
    """One prompt to complete: the caller's handle, token ids, a multiplier per circuit, a private sampler state."""

    handle: object
    token_ids: list[int]
    multipliers: Sequence[float] | None = None
    generator: torch.Generator | None = None


@dataclass
class Completion:
    """A finished request: its new tokens (an end-of-sequence token included) and why it stopped."""

    request: Request
    tokens: list[int]
    finish_reason: str  # "stop": an end-of-sequence token; "length": max_new_tokens reached


def choose_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator | None],
                  generation: GenerationSettings) -> list[int]:
    """The next token of each row from its [rows, vocab] logits: greedy, or sampled at the settings'
    temperature from the smallest token set holding `top_p` of the mass.

    Each row samples with its own generator, so its tokens depend only on its own logits and seed,
    never on which other rows share the batch.
    """
    if not generation.do_sample:
        return logits.argmax(-1).tolist()
    tokens = []
    for row, generator in zip(logits.float().cpu() / generation.temperature, generators):
        probs = row.softmax(-1)
        if generation.top_p < 1:
            ranked, order = probs.sort(descending=True)
            ranked[ranked.cumsum(0) - ranked >= generation.top_p] = 0  # the most likely token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, ranked)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


@dataclass
class _Row:
    request: Request
    tokens: list[int]
    position: int  # position id of tokens[-1], the next token fed to the model
    finish_reason: str | None = field(default=None)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of dimension `dim` (counted from the end) up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (0, 0) * (-dim - 1) + (missing, 0))


class ContinuousBatcher:
    """Generates many requests through at most `generation.batch_size` active rows, refilling slots as rows finish.

    circuits: steered with per-row multipliers (each request's `multipliers`, one per circuit), or None.
    generation: answer length, batch size, steered positions and sampling (its chat template and seed
        are the caller's: requests arrive as token ids with their own generators).
    refill_at: how many free slots trigger a prefill of new requests (fewer, larger prefills cost less).
    """

    def __init__(self, model: nn.Module, circuits: Sequence[Circuit] | None, *, generation: GenerationSettings,
                 eos_ids: Iterable[int], pad_id: int, refill_at: int | None = None) -> None:
        self.model, self.circuits, self.generation, self.positions = model, circuits, generation, generation.positions
        self.batch_size, self.max_new_tokens, self.pad_id = generation.batch_size, generation.max_new_tokens, pad_id
        self.eos_ids = frozenset(eos_ids)
        self.refill_at = refill_at if refill_at is not None else max(1, self.batch_size // 4)
        self.device = input_device(model)
        self.keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters \
            else {}
        self.continuous: bool | None = None  # known after the first prefill: can caches be merged?
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._steering: Steering | None = None

    def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Completions in the order they finish; the model is left unhooked when the iterator ends or closes."""
        pending = iter(requests)
        exhausted = False
        try:
            while True:
                free = self.batch_size - len(self._rows)
                if not exhausted and free and (not self._rows or (self.continuous and free >= self.refill_at)):
                    new = list(itertools.islice(pending, free))
                    exhausted = len(new) < free
                    if new:
                        yield from self._admit(new)
                        continue
                if not self._rows:
                    return
                yield from self._step()
        finally:
            self._set_steering(None)
            self._rows, self._cache, self._mask = [], None, None

    def _set_steering(self, rows: list[_Row] | None) -> None:
        """Steer for these rows (their multipliers, one table row each), or remove the steering (None)."""
        if self._steering is not None:
            self._steering.remove()
            self._steering = None
        if rows and self.circuits is not None:
            table = torch.tensor([list(row.request.multipliers) for row in rows], dtype=torch.float32)
            self._steering = steer(self.model, self.circuits, multipliers=table, positions=self.positions)

    def _forward(self, rows: list[_Row], input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: DynamicCache) -> list[int]:
        if self._steering is None:
            self._set_steering(rows)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=position_ids.to(self.device), use_cache=True,
                                **{cache_keyword(self.model): cache}, **self.keep_logits).logits[:, -1]
        return choose_tokens(logits, [row.request.generator for row in rows], self.generation)

    def _admit(self, requests: list[Request]) -> Iterator[Completion]:
        """Prefill new requests, emit those already finished, merge the others into the active batch."""
        self._set_steering(None)
        batch = pad_batch([request.token_ids for request in requests], [0] * len(requests), self.pad_id, "left")
        rows = [_Row(request, [], len(request.token_ids)) for request in requests]
        cache = DynamicCache(config=self.model.config)
        try:
            tokens = self._forward(rows, batch.input_ids, batch.attention_mask, batch.position_ids, cache)
        finally:
            self._set_steering(None)  # the decode steps steer the merged rows
        if self.continuous is None:
            self.continuous = all(type(layer) is DynamicLayer for layer in cache.layers)
        keep = [index for index, (row, token) in enumerate(zip(rows, tokens)) if not self._append(row, token)]
        yield from (Completion(row.request, row.tokens, row.finish_reason) for row in rows if row.finish_reason)
        if keep:
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
            self._merge(cache, batch.attention_mask[keep], [rows[index] for index in keep])

    def _append(self, row: _Row, token: int) -> bool:
        """Add a generated token to the row; True when the row is finished."""
        row.tokens.append(token)
        if token in self.eos_ids:
            row.finish_reason = "stop"
        elif len(row.tokens) >= self.max_new_tokens:
            row.finish_reason = "length"
        return row.finish_reason is not None

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, rows: list[_Row]) -> None:
        """Append prefilled rows to the active batch, left-padding keys, values and masks to one width."""
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])
        self._rows = self._rows + rows
        self._set_steering(None)

    def _step(self) -> Iterator[Completion]:
        """One decode step for every active row; finished rows leave the batch."""
        rows = self._rows
        input_ids = torch.tensor([[row.tokens[-1]] for row in rows])
        position_ids = torch.tensor([[row.position] for row in rows])
        self._mask = F.pad(self._mask, (0, 1), value=1)
        tokens = self._forward(rows, input_ids, self._mask, position_ids, self._cache)
        keep = []
        for index, (row, token) in enumerate(zip(rows, tokens)):
            row.position += 1
            if not self._append(row, token):
                keep.append(index)
        if len(keep) < len(rows):
            self._drop(keep)
            yield from (Completion(row.request, row.tokens, row.finish_reason) for row in rows if row.finish_reason)

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows `keep`; cut the cache columns that are padding for all of them."""
        self._set_steering(None)
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._rows = [self._rows[index] for index in keep]
        self._cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self._mask = self._mask[keep]
        first = int(self._mask.any(0).nonzero()[0])
        if first and self.continuous:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self._mask = self._mask[:, first:]
