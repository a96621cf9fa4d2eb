"""One forward pass of a capture: the model body run to the last needed layer, the shared prefix run
once, and the recorder that turns each layer's activations into sample rows.

Reductions (how a prompt's token activations become samples):
  "last": the last real token of each prompt (the paper's choice), whatever the padding side;
  "all":  every non-pad token of every prompt is one sample;
  "mean": the mean over a prompt's non-pad tokens is one sample.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..batching import Batch, pad_batch
from ..hooks import HookSet
from ..models import cache_keyword, get_adapter, input_device


class StopForward(Exception):
    """Raised from the last needed layer to skip the rest of the model."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with `model` in eval mode (no dropout, no gradient checkpointing); restore its modes after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def forward_body(model: nn.Module, batch: Batch, cache=None) -> None:
    """Run the model body on `batch` until a hook raises StopForward at the last needed layer."""
    adapter = get_adapter(model)
    device = input_device(model)
    try:
        adapter.body(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     position_ids=batch.position_ids.to(device), use_cache=cache is not None,
                     **{cache_keyword(adapter.body): cache})
    except StopForward:
        return
    raise RuntimeError("the forward pass never reached the last captured layer's down projection")


def raise_stop(*hook_args) -> None:
    """A forward (pre-)hook that ends the pass there."""
    raise StopForward


class SharedPrefix:
    """The chat template's shared prefix, run once: its keys and values, and its activations per layer.

    tokens: the prefix token ids. layers: the forward stops in the MLP of the last of them.
    keep_rows: also keep each layer's neuron activations (rows [P, d] in `rows`), which the "all"
    and "mean" reductions fold into every prompt; "last" needs the keys and values only.
    """

    def __init__(self, model: nn.Module, tokens: Sequence[int], layers: Sequence[int], keep_rows: bool = True) -> None:
        from transformers import DynamicCache

        adapter = get_adapter(model)
        self.model = model
        self.tokens = list(tokens)
        self.rows: list[torch.Tensor | None] = [None] * len(layers)
        cache = DynamicCache(config=model.config)
        with HookSet() as hooks:
            if keep_rows:
                for slot, layer in enumerate(layers):
                    hooks.pre_hook(adapter.neuron_site(layer), self._keeper(slot))
            last = max(layers)
            if adapter.widths[last]:  # stop before the last down projection, as capture's own forwards do
                hooks.pre_hook(adapter.neuron_site(last), raise_stop)
            else:  # an MoE layer of routed experts only: stop after its MLP (the keys and values are complete)
                hooks.post_hook(adapter.mlp(last), raise_stop)
            forward_body(model, pad_batch([self.tokens], [0], 0, "right"), cache)
        self._kv = [(layer.keys, layer.values) if layer.is_initialized else (None, None) for layer in cache.layers]

    def _keeper(self, slot: int):
        def hook(module, args):
            self.rows[slot] = args[0][0].clone()

        return hook

    def __len__(self) -> int:
        return len(self.tokens)

    def cache_for(self, batch_rows: int):
        """A KV cache holding the prefix for each of `batch_rows` rows (expanded views, no copies)."""
        from transformers import DynamicCache

        data = [(None, None) if k is None else (k.expand(batch_rows, -1, -1, -1), v.expand(batch_rows, -1, -1, -1))
                for k, v in self._kv]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)


@dataclass
class Forward:
    """One batch as the model sees it: the prompt part, the attention mask over prefix + prompt, the cache."""

    batch: Batch
    full: Batch
    cache: object | None
    prefix: SharedPrefix | None


class Recorder:
    """Forward pre-hooks on the neuron sites that reduce each layer's activations to sample rows.

    record=False installs only the hook that stops the forward after the last layer (the fused
    kernels capture inside the MLP).
    """

    def __init__(self, adapter, layers: Sequence[int], reduction: str, record: bool = True) -> None:
        self.adapter = adapter
        self.layers = list(layers)
        self.reduction = reduction
        self.record = record
        self.rows: list[torch.Tensor | None] = [None] * len(self.layers)
        self._current: Forward | None = None
        self._sliced = False  # the last layer's MLP already ran on last-token rows only

    def install(self, hooks: HookSet) -> None:
        last = max(self.layers)
        for slot, layer in enumerate(self.layers):
            hooks.pre_hook(self.adapter.neuron_site(layer), self._make_hook(slot, stop=layer == last))
        if self.reduction == "last" and self.record:
            hooks.pre_hook(self.adapter.mlp(last), self._keep_last_tokens)

    def run(self, forward: Forward) -> list[torch.Tensor | None]:
        """Run one forward pass; returns the sample rows of each layer."""
        self._current = forward
        try:
            forward_body(self.adapter.model, forward.full, forward.cache)
        finally:
            self._current = None
        return self.rows

    def _keep_last_tokens(self, module, args):
        """In the last layer only the last token's neurons are needed: run its MLP on those rows alone."""
        if self._current is None or not args or args[0].dim() != 3:
            return None
        self._sliced = True
        return (self._current.batch.last_token_rows(args[0])[:, None], *args[1:])

    def _make_hook(self, slot: int, stop: bool):
        def hook(module, args):
            if self._current is None:
                return  # a forward of someone else's (the shared prefix's own pass)
            if self.record:
                self.rows[slot] = self._reduce(slot, args[0])
            if stop:
                raise StopForward

        return hook

    def _reduce(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, d] activations of one layer -> the sample rows the reduction asks for."""
        batch, prefix = self._current.batch, self._current.prefix
        if self.reduction == "last":
            if self._sliced:
                self._sliced = False
                return hidden[:, 0]
            return batch.last_token_rows(hidden)
        mask = batch.attention_mask.to(hidden.device, hidden.dtype)
        if self.reduction == "all":
            return hidden[mask.bool()]
        sums = torch.bmm(mask[:, None, :], hidden)[:, 0]
        lengths = batch.lengths.to(hidden.device, hidden.dtype)
        if prefix is not None:
            sums = sums + prefix.rows[slot].sum(0).to(sums.device, sums.dtype)
            lengths = lengths + len(prefix)
        return sums / lengths[:, None]
