"""Batched forward passes that feed neuron activations into streaming statistics.

Prompts are tokenized in windows, sorted by length inside each window (length buckets, little
padding; see `batching`) and run through the model body only: no LM head, and the forward stops
at the down projection of the last layer that is needed. A token prefix shared by every prompt
(the chat template's system turn) runs once; its keys and values are reused for every batch.

Reductions (how a prompt's token activations become samples):
  "last": the last real token of each prompt (the paper's choice), whatever the padding side;
  "all":  every non-pad token of every prompt is one sample;
  "mean": the mean over a prompt's non-pad tokens is one sample.

Two accumulators sit behind one interface: per-device `NeuronStats` fed by pre-hooks (any
reduction, any number of groups), and the fused Triton kernel that folds rows into two-sided
moments inside the MLP (CUDA, or forced with CNA_FAST_BACKEND=triton).
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import (MIN_PREFIX_TOKENS, WINDOW_BATCHES, Batch, LengthLimit, PlannedBatch, check_prompt,
                       context_length, encode_prompts, length_buckets, pad_after_prefix, pad_batch, pad_token_id,
                       plan_batches, sample_labels, shared_prefix, uses_chat_template, windows)
from .checkpoint import Checkpoint
from .errors import CNAError
from .hooks import HookSet
from .kernels import LayerMoments
from .models import cache_keyword, get_adapter
from .models.fused import fused_backend, patched_capture
from .settings import REDUCTIONS, CaptureSettings, validate_layers, validate_reduction
from .stats import NEGATIVE, POSITIVE, NeuronStats, batch_moments

# Batching helpers and settings are re-exported for callers of the old single module.
__all__ = ["Capturer", "CaptureSettings", "Checkpoint", "SharedPrefix", "capture_contrast", "eval_mode",
           "context_length", "encode_prompts", "length_buckets", "pad_batch", "shared_prefix", "uses_chat_template",
           "validate_layers", "validate_reduction", "POSITIONS", "REDUCTIONS"]

POSITIONS = REDUCTIONS  # deprecated name, kept for one release


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


def _forward_body(model: nn.Module, batch: Batch, cache=None) -> None:
    """Run the model body on `batch` until a hook raises StopForward at the last needed layer."""
    adapter = get_adapter(model)
    device = adapter.body.get_input_embeddings().weight.device
    try:
        adapter.body(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     position_ids=batch.position_ids.to(device), use_cache=cache is not None,
                     **{cache_keyword(adapter.body): cache})
    except StopForward:
        return
    raise RuntimeError("the forward pass never reached the last captured layer's down projection")


def _raise_stop(*hook_args) -> None:
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
                hooks.pre_hook(adapter.neuron_site(last), _raise_stop)
            else:  # an MoE layer of routed experts only: stop after its MLP (the keys and values are complete)
                hooks.post_hook(adapter.mlp(last), _raise_stop)
            _forward_body(model, pad_batch([self.tokens], [0], 0, "right"), cache)
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
class _Forward:
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
        self._current: _Forward | None = None
        self._sliced = False  # the last layer's MLP already ran on last-token rows only

    def install(self, hooks: HookSet) -> None:
        last = max(self.layers)
        for slot, layer in enumerate(self.layers):
            hooks.pre_hook(self.adapter.neuron_site(layer), self._make_hook(slot, stop=layer == last))
        if self.reduction == "last" and self.record:
            hooks.pre_hook(self.adapter.mlp(last), self._keep_last_tokens)

    def run(self, forward: _Forward) -> list[torch.Tensor | None]:
        """Run one forward pass; returns the sample rows of each layer."""
        self._current = forward
        try:
            _forward_body(self.adapter.model, forward.full, forward.cache)
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


class _DeviceStats:
    """The hook path's accumulator: one NeuronStats per device, holding the layers on that device."""

    records = True

    def __init__(self, adapter, layers: list[int], n_groups: int, initial: NeuronStats | None) -> None:
        slots_by_device: dict[torch.device, list[int]] = {}
        for slot, layer in enumerate(layers):
            slots_by_device.setdefault(adapter.layer_device(layer), []).append(slot)
        self.parts: list[tuple[list[int], NeuronStats]] = []
        for device, slots in slots_by_device.items():
            part = NeuronStats([layers[slot] for slot in slots], adapter.d_ff, n_groups, device=device)
            if initial is not None:  # each part starts from an exact copy of its layers
                part.count = initial.count.to(device).clone()
                part.mean = initial.mean[slots].to(device).clone()
                part.m2 = initial.m2[slots].to(device).clone()
            self.parts.append((slots, part))

    def forward_context(self, forward: _Forward, reduction: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def add(self, forward: _Forward, rows: list[torch.Tensor], reduction: str) -> None:
        batch = forward.batch
        labels = sample_labels(batch, reduction)
        for slots, stats in self.parts:
            stats.update([rows[slot] for slot in slots], labels)
            if forward.prefix is not None and reduction == "all":
                _fold_prefix_tokens(stats, [forward.prefix.rows[slot] for slot in slots], batch.labels)

    def gather(self) -> NeuronStats:
        return NeuronStats.concat([part for _, part in self.parts])


def _fold_prefix_tokens(stats: NeuronStats, prefix_rows: list[torch.Tensor], labels: torch.Tensor) -> None:
    """Each prompt also contains the prefix tokens: fold them in once per row of each group."""
    prefix = torch.stack([rows.to(stats.device) for rows in prefix_rows])  # [L, P, d]
    zeros = torch.zeros(prefix.shape[1], dtype=torch.long, device=stats.device)
    _, prefix_mean, prefix_m2 = batch_moments(prefix, zeros, 1)
    per_group = torch.bincount(labels, minlength=stats.n_groups).to(stats.device, torch.float64)
    stats.merge_moments(per_group * prefix.shape[1], prefix_mean.expand(-1, stats.n_groups, -1),
                        prefix_m2 * per_group[None, :, None])


class _FusedMoments:
    """The fused path's accumulator: float64 two-sided moments per layer, on that layer's device."""

    records = False

    def __init__(self, model: nn.Module, adapter, layers: list[int], initial: NeuronStats | None) -> None:
        self.model = model
        self.layers = layers
        self.width = adapter.d_ff
        self.moments: dict[int, LayerMoments] = {}
        for slot, layer in enumerate(layers):
            state = LayerMoments.zeros(self.width, device=adapter.layer_device(layer), dtype=torch.float64)
            if initial is not None:
                state.count.copy_(initial.count)
                state.mean.copy_(initial.mean[slot])
                state.m2.copy_(initial.m2[slot])
            self.moments[layer] = state

    def forward_context(self, forward: _Forward, reduction: str) -> contextlib.AbstractContextManager:
        batch = forward.batch
        token_labels = torch.full(batch.attention_mask.shape, -1, dtype=torch.long)
        if reduction == "last":
            rows = torch.arange(len(batch.labels))
            last = batch.lengths - 1 if batch.padding_side == "right" else torch.full_like(batch.lengths, -1)
            token_labels[rows, last] = batch.labels
        else:
            token_labels = torch.where(batch.attention_mask.bool(), batch.labels[:, None], token_labels)
        return patched_capture(self.model, self.moments, labels=lambda: token_labels)

    def add(self, forward: _Forward, rows: list[torch.Tensor], reduction: str) -> None:
        """Nothing to do: the kernel already folded the rows in during the forward."""

    def gather(self) -> NeuronStats:
        stats = NeuronStats(self.layers, self.width, 2)
        stats.count = self.moments[self.layers[0]].count.detach().cpu().to(torch.float64)
        stats.mean = torch.stack([self.moments[layer].mean.cpu() for layer in self.layers]).to(torch.float64)
        stats.m2 = torch.stack([self.moments[layer].m2.cpu() for layer in self.layers]).to(torch.float64)
        return stats


class Capturer:
    """Runs labeled prompts through a model and accumulates neuron statistics per group.

    settings: a CaptureSettings, or keyword options that build one (layers, reduction, ...).
    """

    recorder_type = Recorder  # MoE models record ordinary neurons their own way (moe_capture.py)

    def __init__(self, model: nn.Module, tokenizer, settings: CaptureSettings | None = None, *,
                 progress: bool = True, **options) -> None:
        self.settings = CaptureSettings.build(settings, **options)
        self.adapter = get_adapter(model)
        self.model = model
        self.tokenizer = tokenizer
        self.progress = progress
        self.layers = self.settings.resolved_layers(self.adapter.num_layers)
        reduction = self.settings.reduction
        # Per-prompt means take the hook path; the fused kernel handles last and all.
        self.fused = reduction in ("last", "all") and fused_backend(self.adapter, self.layers[0]) == "triton"
        prefix = shared_prefix(tokenizer, self.settings.chat_template) if self.settings.prefix_cache else []
        if len(prefix) < MIN_PREFIX_TOKENS or (self.fused and reduction == "all"):
            prefix = []  # the fused path captures every token of full sequences
        self.prefix = prefix
        max_length = self.settings.max_length if self.settings.max_length is not None else context_length(model)
        self.limit = LengthLimit(max_length, self.settings.on_long, prefix)
        self.pad_id = pad_token_id(tokenizer)
        self._shared: SharedPrefix | None = None

    def run(self, labeled: Iterable[tuple[str, int]], n_groups: int = 2, total: int | None = None,
            stats: NeuronStats | None = None, allow_empty: bool = False,
            checkpoint: Checkpoint | None = None) -> NeuronStats:
        """Feed (prompt, group) pairs; returns the statistics, continuing from `stats` if given.

        allow_empty: return zero-count statistics for an empty stream instead of raising (a
        distributed rank whose shard is empty must still join the merge).
        checkpoint: save progress at the end of tokenization windows (every max(every, 32 x
        batch_size) prompts); with checkpoint.resume, skip the prompts an existing checkpoint
        covers and continue from its statistics.
        """
        stats, consumed = self._starting_point(stats, checkpoint, n_groups)
        accumulator = self._accumulator(n_groups, stats)
        stream = iter(labeled)
        if consumed and len(list(itertools.islice(stream, consumed))) < consumed:
            raise CNAError(f"the checkpoint covers {consumed} prompts but the inputs have fewer")
        seen, since_save = consumed, 0
        self.limit.truncated = 0
        recorder = self.recorder_type(self.adapter, self.layers, self.settings.reduction, record=accumulator.records)
        bar = tqdm(total=total, initial=consumed, desc="capture", unit="prompt", disable=not self.progress)
        with torch.inference_mode(), eval_mode(self.model), HookSet() as hooks:
            recorder.install(hooks)
            for window in windows(stream, self.settings.batch_size * WINDOW_BATCHES):
                self._run_window(window, seen, n_groups, recorder, accumulator, bar)
                seen += len(window)
                since_save += len(window)
                if checkpoint is not None and since_save >= checkpoint.every:
                    checkpoint.save(accumulator.gather(), seen)
                    since_save = 0
        bar.close()
        if seen == 0 and not allow_empty:
            raise CNAError("no prompts to capture: the prompt set is empty")
        self._warn_truncated()
        gathered = accumulator.gather()
        if checkpoint is not None:
            checkpoint.save(gathered, seen)
        return gathered

    def _starting_point(self, stats: NeuronStats | None, checkpoint: Checkpoint | None,
                        n_groups: int) -> tuple[NeuronStats | None, int]:
        """Statistics to continue from and how many prompts they cover (a checkpoint, `stats`, or nothing)."""
        consumed = 0
        restored = checkpoint.restore() if checkpoint is not None else None
        if restored is not None:
            if stats is not None:
                raise CNAError("pass either initial statistics or a checkpoint to resume from, not both")
            stats, consumed = restored
        if stats is not None and (stats.layers != self.layers or stats.n_groups != n_groups):
            raise CNAError(f"statistics cover layers {stats.layers} and {stats.n_groups} groups; this capture "
                           f"covers layers {self.layers} and {n_groups} groups")
        return stats, consumed

    def _accumulator(self, n_groups: int, initial: NeuronStats | None):
        if self.fused and n_groups == 2:
            return _FusedMoments(self.model, self.adapter, self.layers, initial)
        return _DeviceStats(self.adapter, self.layers, n_groups, initial)

    def _run_window(self, window: list[tuple[str, int]], seen: int, n_groups: int, recorder: Recorder,
                    accumulator, bar) -> None:
        """Tokenize one window of prompts, bucket it by length and run its batches."""
        prompts = [check_prompt(prompt, seen + i + 1) for i, (prompt, _) in enumerate(window)]
        labels = [label for _, label in window]
        for label in labels:
            if not 0 <= label < n_groups:
                raise CNAError(f"group label {label} is outside 0..{n_groups - 1}")
        encoded = [self.limit.fit(ids, seen + i + 1)
                   for i, ids in enumerate(encode_prompts(self.tokenizer, prompts, self.settings.chat_template))]
        for planned in plan_batches(encoded, labels, self.settings.batch_size, self.prefix):
            forward = self._prepare(planned)
            with accumulator.forward_context(forward, self.settings.reduction):
                rows = recorder.run(forward)
            accumulator.add(forward, rows, self.settings.reduction)
            bar.update(len(planned.sequences))

    def _prepare(self, planned: PlannedBatch) -> _Forward:
        """Pad a batch; with the shared prefix, its cache and a mask that covers the prefix too."""
        if not planned.uses_prefix:
            batch = pad_batch(planned.sequences, planned.labels, self.pad_id, self.settings.padding_side)
            return _Forward(batch, batch, None, None)
        if self._shared is None:
            self._shared = SharedPrefix(self.model, self.prefix, self.layers,
                                        keep_rows=self.settings.reduction != "last")
        batch, mask = pad_after_prefix(planned.sequences, planned.labels, self.pad_id, len(self.prefix))
        full = Batch(batch.input_ids, mask, batch.position_ids, batch.labels, batch.lengths, batch.padding_side)
        return _Forward(batch, full, self._shared.cache_for(len(planned.sequences)), self._shared)

    def _warn_truncated(self) -> None:
        if self.limit.truncated:
            warnings.warn(f"{self.limit.truncated} prompts were longer than {self.limit.max_length} tokens and were "
                          "truncated (kept the chat-template prefix and the last tokens); set max_length or "
                          "on_long='error'", stacklevel=3)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CNAError("distributed capture needs torch.distributed initialized: launch with torchrun and call "
                       "torch.distributed.init_process_group (the CLI's --distributed does both)")
    return dist.get_rank(), dist.get_world_size()


def _labeled(positive: Iterable[str], negative: Iterable[str]) -> Iterator[tuple[str, int]]:
    """(prompt, side) pairs: every positive prompt, then every negative one, each checked as it is read."""
    return itertools.chain(
        ((check_prompt(prompt, number, "positive "), POSITIVE) for number, prompt in enumerate(positive, 1)),
        ((check_prompt(prompt, number, "negative "), NEGATIVE) for number, prompt in enumerate(negative, 1)),
    )


def _check_prompt_set(prompts: object, name: str) -> None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise CNAError(f"the {name} prompts must be a list of strings (or a PromptSource), got "
                       f"{type(prompts).__name__}; wrap a single prompt in a list")


def capture_contrast(model: nn.Module, tokenizer, positive: Iterable[str], negative: Iterable[str],
                     settings: CaptureSettings | None = None, *, progress: bool = True, distributed: bool = False,
                     checkpoint: Checkpoint | None = None, **options) -> NeuronStats:
    """Statistics of positive (group 1) and negative (group 0) prompts in one stream of mixed batches.

    settings / options: a CaptureSettings, or its fields as keywords (layers, reduction, batch_size, ...).
    distributed: under torch.distributed (torchrun), each rank streams every world_size-th prompt of
    each set and the ranks' moments are merged exactly; every rank returns the merged statistics.
    checkpoint: save progress periodically and resume (per rank when distributed).
    """
    _check_prompt_set(positive, "positive")
    _check_prompt_set(negative, "negative")
    from .moe_capture import capturer_class

    settings = CaptureSettings.build(settings, **options)
    capturer = capturer_class(model, settings)(model, tokenizer, settings, progress=progress)
    total = None
    if hasattr(positive, "__len__") and hasattr(negative, "__len__"):
        total = len(positive) + len(negative)
    if distributed:
        rank, world = _rank_and_world()
        positive = itertools.islice(positive, rank, None, world)
        negative = itertools.islice(negative, rank, None, world)
        total = None if total is None else len(range(rank, total, world))
        if checkpoint is not None:
            checkpoint = checkpoint.for_rank(rank, world)
    stats = capturer.run(_labeled(positive, negative), n_groups=2, total=total, allow_empty=distributed,
                         checkpoint=checkpoint)
    if distributed:
        stats.all_reduce()
    for side, name in ((POSITIVE, "positive"), (NEGATIVE, "negative")):
        if stats.count[side] == 0:
            raise CNAError(f"the {name} prompt set is empty: give at least one {name} prompt")
    return stats
