"""Batched forward passes that feed neuron activations into streaming statistics.

Prompts are tokenized in windows, sorted by length inside each window (length buckets, little
padding) and run in batches through the model body only: no LM head, and the forward stops at the
down projection of the last layer that is needed. A token prefix shared by every prompt (the chat
template's system turn) runs once; its keys and values are reused for every batch.

Positions:
  "last": the last real token of each prompt (the paper's choice), whatever the padding side;
  "all":  every non-pad token of every prompt is one sample;
  "mean": the mean over a prompt's non-pad tokens is one sample.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .errors import CNAError
from .kernels import LayerMoments, backend_for, patched_capture
from .models import get_adapter
from .stats import NEGATIVE, POSITIVE, NeuronStats, batch_moments

POSITIONS = ("last", "all", "mean")
PADDING_SIDES = ("left", "right")
_WINDOW_BATCHES = 32  # a tokenization window holds this many batches, sorted by length
_MIN_PREFIX_TOKENS = 2
_BATCH_OVERHEAD_TOKENS = 32  # fixed cost of one forward pass, in tokens of compute (weights streamed once)
_BATCH_MAX_TOKENS = 16384  # padded tokens per forward pass at most, to bound activation memory


class _StopForward(Exception):
    """Raised from the last needed layer to skip the rest of the model."""


def validate_position(position: str) -> str:
    if position not in POSITIONS:
        raise CNAError(f"unknown position {position!r}: choose one of {', '.join(POSITIONS)}")
    return position


def _template_kwargs(tokenizer, chat_template: bool | str | None) -> dict | None:
    """Arguments for apply_chat_template, or None to feed raw text."""
    if chat_template is False:
        return None
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(chat_template, str):
        return {"chat_template": chat_template}
    if chat_template is True and not has_template:
        raise CNAError("chat_template=True but the tokenizer has no chat template: pass chat_template=False or a template")
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


@dataclass
class Batch:
    """A padded batch: ids and mask [B, T], positions [B, T], label per row, real lengths."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    padding_side: str


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


class _Recorder:
    """Forward pre-hooks on the neuron sites: reduce each layer's activations to sample rows."""

    def __init__(self, adapter, layers: Sequence[int], position: str, record: bool = True) -> None:
        """record=False only stops the forward after the last layer (the fused kernels capture)."""
        self.adapter = adapter
        self.layers = list(layers)
        self.position = position
        self.record = record
        self.last_layer = max(self.layers)
        self.rows: list[torch.Tensor | None] = [None] * len(self.layers)
        self.batch: Batch | None = None
        self.prefix_sums: list[torch.Tensor] | None = None  # "mean" with a shared prefix
        self.prefix_length = 0
        self.record_prefix = False
        self.sliced = False  # the last layer's MLP already ran on last-token rows only
        self._handles = []

    def __enter__(self) -> "_Recorder":
        for slot, layer in enumerate(self.layers):
            hook = self._make_hook(slot, stop=layer == self.last_layer)
            self._handles.append(self.adapter.neuron_site(layer).register_forward_pre_hook(hook))
        if self.position == "last" and self.record:
            mlp = self.adapter.mlp(self.last_layer)
            self._handles.append(mlp.register_forward_pre_hook(self._keep_last_tokens))
        return self

    def _keep_last_tokens(self, module, args):
        """In the last layer only the last token's neurons are needed: run its MLP on those rows alone."""
        if self.record_prefix or not args or args[0].dim() != 3:
            return None
        hidden = args[0]
        self.sliced = True
        return (self._last_token_rows(hidden)[:, None], *args[1:])

    def _last_token_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.batch.padding_side == "left":
            return hidden[:, -1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, self.batch.lengths.to(hidden.device) - 1]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, slot: int, stop: bool):
        def hook(module, args):
            if self.record or self.record_prefix:
                self.rows[slot] = self._reduce(slot, args[0])
            if stop:
                raise _StopForward

        return hook

    def _reduce(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, d] activations of one layer -> the sample rows the position mode asks for."""
        if self.record_prefix:
            return hidden[0]
        batch = self.batch
        if self.position == "last":
            if self.sliced:
                self.sliced = False
                return hidden[:, 0]
            return self._last_token_rows(hidden)
        mask = batch.attention_mask.to(hidden.device, hidden.dtype)
        if self.position == "all":
            return hidden[mask.bool()]
        sums = torch.bmm(mask[:, None, :], hidden)[:, 0]
        if self.prefix_sums is not None:
            sums = sums + self.prefix_sums[slot].to(sums.device, sums.dtype)
        lengths = batch.lengths.to(hidden.device, hidden.dtype) + self.prefix_length
        return sums / lengths[:, None]


def _windows(labeled: Iterable[tuple[str, int]], size: int) -> Iterator[list[tuple[str, int]]]:
    iterator = iter(labeled)
    while window := list(itertools.islice(iterator, size)):
        yield window


def _check_prompt(prompt: object, number: int, where: str = "") -> str:
    if not isinstance(prompt, str):
        raise CNAError(f"{where}prompt {number} is a {type(prompt).__name__}, not a string")
    if not prompt.strip():
        raise CNAError(f"{where}prompt {number} is empty: remove empty prompts from the set")
    return prompt


@dataclass
class Checkpoint:
    """Periodic, atomic saves of the running statistics and the stream position, for resuming.

    path: the statistics file (safetensors). every: prompts between saves; saves happen at the
    end of a tokenization window, so a resumed run builds exactly the same batches as an
    uninterrupted one and ends with bit-identical statistics.
    identity: what the run is computed from (model, settings, input hashes); resuming from a
    checkpoint with a different identity is an error.
    """

    path: Path
    every: int
    identity: dict
    resume: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise CNAError(f"checkpoint_every must be a positive number of prompts, got {self.every!r}")

    def restore(self) -> tuple[NeuronStats, int] | None:
        """The saved statistics and how many prompts they cover, when resuming from an existing checkpoint."""
        if not self.resume or not self.path.exists():
            return None
        from .moe_stats import load_any_stats

        stats = load_any_stats(self.path)
        saved = stats.meta.get("identity")
        if saved != self.identity:
            changed = sorted(key for key in set(saved or {}) | set(self.identity)
                             if (saved or {}).get(key) != self.identity.get(key))
            raise CNAError(f"checkpoint {str(self.path)!r} was computed from different inputs or settings "
                           f"({', '.join(changed)} changed): resume with the original ones, or start over "
                           "without --resume")
        return stats, int(stats.meta["consumed"])

    def save(self, stats: NeuronStats, consumed: int) -> None:
        stats.meta = {"identity": self.identity, "consumed": consumed}
        stats.save(self.path)


class Capturer:
    """Runs prompts through a model and accumulates neuron statistics per group."""

    def __init__(self, model, tokenizer, *, layers: Sequence[int] | None = None, position: str = "last",
                 chat_template: bool | str | None = None, batch_size: int = 32, padding_side: str = "right",
                 prefix_cache: bool = True, progress: bool = True, max_length: int | None = None,
                 on_long: str = "truncate") -> None:
        self.adapter = get_adapter(model)
        self.model = model
        self.tokenizer = tokenizer
        self.position = validate_position(position)
        if padding_side not in PADDING_SIDES:
            raise CNAError(f"unknown padding side {padding_side!r}: choose left or right")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CNAError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.layers = validate_layers(layers if layers is not None else range(self.adapter.num_layers),
                                      self.adapter.num_layers)
        if not self.layers:
            raise CNAError("no layers left to capture: every layer was excluded")
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.progress = progress
        self.prefix = shared_prefix(tokenizer, chat_template) if prefix_cache else []
        if len(self.prefix) < _MIN_PREFIX_TOKENS:
            self.prefix = []
        if on_long not in ("truncate", "error"):
            raise CNAError(f"unknown on_long {on_long!r}: choose truncate or error")
        self.on_long = on_long
        self.max_length = max_length if max_length is not None else context_length(model)
        if self.max_length is not None and self.max_length <= len(self.prefix):
            raise CNAError(f"max_length {self.max_length} leaves no room after the {len(self.prefix)}-token "
                           "chat-template prefix")
        self.truncated = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # The fused Triton kernel folds token rows into two-sided moments inside the MLP (CUDA, or
        # forced with CNA_FAST_BACKEND=triton); per-prompt means ("mean") take the hook path.
        probe = next(self.adapter.mlp(self.layers[0]).parameters())
        self.fused = self.position in ("last", "all") and backend_for(probe) == "triton"
        if self.fused and self.position == "all":
            self.prefix = []  # the fused path captures every token of full sequences
        self.input_device = self.adapter.body.get_input_embeddings().weight.device
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._prefix_rows: list[torch.Tensor] | None = None

    def run(self, labeled: Iterable[tuple[str, int]], n_groups: int = 2, total: int | None = None,
            stats: NeuronStats | None = None, allow_empty: bool = False,
            checkpoint: Checkpoint | None = None) -> NeuronStats:
        """Feed (prompt, group) pairs; returns the statistics, continuing from `stats` if given.

        allow_empty: return zero-count statistics for an empty stream instead of raising (a
        distributed rank whose shard is empty must still join the merge).
        checkpoint: save progress periodically; with checkpoint.resume, skip the prompts an
        existing checkpoint already covers and continue from its statistics.
        """
        consumed = 0
        restored = checkpoint.restore() if checkpoint is not None else None
        if restored is not None:
            if stats is not None:
                raise CNAError("pass either initial statistics or a checkpoint to resume from, not both")
            stats, consumed = restored
        if stats is not None and (stats.layers != self.layers or stats.n_groups != n_groups):
            raise CNAError(f"statistics cover layers {stats.layers} and {stats.n_groups} groups; this capture "
                           f"covers layers {self.layers} and {n_groups} groups")
        fused = self.fused and n_groups == 2
        parts = self._moments_per_layer(stats) if fused else self._stats_per_device(n_groups, stats)
        stream = iter(labeled)
        if consumed and len(list(itertools.islice(stream, consumed))) < consumed:
            raise CNAError(f"the checkpoint covers {consumed} prompts but the inputs have fewer")
        seen, since_save = consumed, 0
        self.truncated = 0
        bar = tqdm(total=total, initial=consumed, desc="capture", unit="prompt", disable=not self.progress)
        with torch.inference_mode(), self._make_recorder(record=not fused) as recorder:
            for window in _windows(stream, self.batch_size * _WINDOW_BATCHES):
                prompts = [_check_prompt(prompt, seen + i + 1) for i, (prompt, _) in enumerate(window)]
                for _, label in window:
                    if not 0 <= label < n_groups:
                        raise CNAError(f"group label {label} is outside 0..{n_groups - 1}")
                encoded = [self._fit(ids, seen + i + 1)
                           for i, ids in enumerate(encode_prompts(self.tokenizer, prompts, self.chat_template))]
                for batch in self._batches(encoded, [label for _, label in window]):
                    (self._run_batch_fused if fused else self._run_batch)(recorder, parts, *batch)
                    bar.update(len(batch[0]))
                seen += len(window)
                since_save += len(window)
                if checkpoint is not None and since_save >= checkpoint.every:
                    checkpoint.save(self._gather(parts), seen)
                    since_save = 0
        bar.close()
        if seen == 0 and not allow_empty:
            raise CNAError("no prompts to capture: the prompt set is empty")
        if self.truncated:
            warnings.warn(f"{self.truncated} prompts were longer than {self.max_length} tokens and were truncated "
                          "(kept the chat-template prefix and the last tokens); set max_length or on_long='error'",
                          stacklevel=2)
        gathered = self._gather(parts)
        if checkpoint is not None:
            checkpoint.save(gathered, seen)
        return gathered

    def _make_recorder(self, record: bool) -> _Recorder:
        return _Recorder(self.adapter, self.layers, self.position, record=record)

    def _gather(self, parts) -> NeuronStats:
        """All layers' statistics as one NeuronStats on the CPU."""
        if isinstance(parts, dict):  # fused: LayerMoments per layer
            first = parts[self.layers[0]]
            stats = NeuronStats(self.layers, self.adapter.d_ff, 2)
            stats.count = first.count.detach().cpu().to(torch.float64)
            stats.mean = torch.stack([parts[layer].mean.cpu() for layer in self.layers]).to(torch.float64)
            stats.m2 = torch.stack([parts[layer].m2.cpu() for layer in self.layers]).to(torch.float64)
            return stats
        return NeuronStats.concat([part for _, part in parts])

    def _moments_per_layer(self, initial: NeuronStats | None) -> dict[int, LayerMoments]:
        """float64 moments for the fused kernel, one per layer on that layer's device."""
        moments = {}
        for slot, layer in enumerate(self.layers):
            device = self.adapter.layer_device(layer)
            state = LayerMoments.zeros(self.adapter.d_ff, device=device, dtype=torch.float64)
            if initial is not None:
                state.count.copy_(initial.count)
                state.mean.copy_(initial.mean[slot])
                state.m2.copy_(initial.m2[slot])
            moments[layer] = state
        return moments

    def _fit(self, ids: list[int], number: int) -> list[int]:
        """Apply the length limit: truncate (keep the shared prefix and the last tokens) or refuse."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.on_long == "error":
            raise CNAError(f"prompt {number} has {len(ids)} tokens, more than max_length={self.max_length}: shorten "
                           "it, raise max_length, or let it be truncated (on_long='truncate')")
        self.truncated += 1
        keep = len(self.prefix) if ids[:len(self.prefix)] == self.prefix else 0
        return ids[:keep] + ids[len(ids) - (self.max_length - keep):]

    def _stats_per_device(self, n_groups: int, initial: NeuronStats | None) -> list[tuple[list[int], NeuronStats]]:
        """One NeuronStats per device, holding the layers on that device (sharded models), with their slots.

        initial: statistics to continue from; each part starts from an exact copy of its layers.
        """
        slots_by_device: dict[torch.device, list[int]] = {}
        for slot, layer in enumerate(self.layers):
            slots_by_device.setdefault(self.adapter.layer_device(layer), []).append(slot)
        parts = []
        for device, slots in slots_by_device.items():
            part = NeuronStats([self.layers[slot] for slot in slots], self.adapter.d_ff, n_groups, device=device)
            if initial is not None:
                part.count = initial.count.to(device).clone()
                part.mean = initial.mean[slots].to(device).clone()
                part.m2 = initial.m2[slots].to(device).clone()
            parts.append((slots, part))
        return parts

    def _batches(self, encoded: list[list[int]], labels: list[int]):
        """Length-sorted batches, split into those that start with the shared prefix and those that don't."""
        n_prefix = len(self.prefix)
        with_prefix = [n_prefix > 0 and len(ids) > n_prefix and ids[:n_prefix] == self.prefix for ids in encoded]
        for use_prefix in (True, False):
            members = [i for i in range(len(encoded)) if with_prefix[i] == use_prefix]
            members.sort(key=lambda i: len(encoded[i]))
            cut = n_prefix if use_prefix else 0
            for start, stop in length_buckets([len(encoded[i]) - cut for i in members], self.batch_size):
                chunk = members[start:stop]
                yield [encoded[i][cut:] for i in chunk], [labels[i] for i in chunk], use_prefix

    def _forward(self, batch: Batch, cache) -> None:
        body = self.adapter.body
        try:
            body(input_ids=batch.input_ids.to(self.input_device),
                 attention_mask=batch.attention_mask.to(self.input_device),
                 position_ids=batch.position_ids.to(self.input_device),
                 past_key_values=cache, use_cache=cache is not None)
        except _StopForward:
            return
        raise RuntimeError("the forward pass never reached the last captured layer's down projection")

    def _prepare_prefix(self, recorder: _Recorder) -> None:
        """Run the shared prefix once; keep its keys/values (and its activations for all/mean)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = [self.prefix]
        recorder.batch = pad_batch(ids, [0], self.pad_id, "right")
        recorder.record_prefix = True
        try:
            self._forward(recorder.batch, cache)
        finally:
            recorder.record_prefix = False
        self._prefix_kv = [(layer.keys, layer.values) if layer.is_initialized else (None, None)
                           for layer in cache.layers]
        if self.position in ("all", "mean"):
            self._prefix_rows = [rows.clone() for rows in recorder.rows]

    def _prefix_cache_for(self, batch_rows: int):
        from transformers import DynamicCache

        data = [(None, None) if k is None else (k.expand(batch_rows, -1, -1, -1), v.expand(batch_rows, -1, -1, -1))
                for k, v in self._prefix_kv]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)

    def _run_batch_fused(self, recorder: _Recorder, moments: dict[int, LayerMoments], sequences, labels,
                         use_prefix: bool) -> None:
        """One batch through MLPs patched with the fused activation+capture kernel."""
        batch, full, cache = self._prepare_batch(recorder, sequences, labels, use_prefix)
        token_labels = torch.full(batch.attention_mask.shape, -1, dtype=torch.long)
        if self.position == "last":
            rows = torch.arange(len(sequences))
            last = batch.lengths - 1 if batch.padding_side == "right" else torch.full_like(batch.lengths, -1)
            token_labels[rows, last] = batch.labels
        else:
            token_labels = torch.where(batch.attention_mask.bool(), batch.labels[:, None], token_labels)
        with patched_capture(self.model, moments, labels=lambda: token_labels):
            self._forward(full, cache)

    def _prepare_batch(self, recorder: _Recorder, sequences, labels, use_prefix: bool):
        """Pad a batch; returns it, the model inputs (prefix included in the mask) and the prefix cache."""
        cache = None
        offset = 0
        if use_prefix:
            if self._prefix_kv is None:
                self._prepare_prefix(recorder)
            offset = len(self.prefix)
            cache = self._prefix_cache_for(len(sequences))
        # Prefixed batches are right-padded so prefix and prompt stay contiguous: sliding-window
        # attention measures distance in cache slots, and pads in between would push the prefix out.
        side = "right" if use_prefix else self.padding_side
        batch = pad_batch(sequences, labels, self.pad_id, side, position_offset=offset)
        if use_prefix:
            prefix_mask = torch.ones(len(sequences), offset, dtype=batch.attention_mask.dtype)
            full_mask = torch.cat([prefix_mask, batch.attention_mask], dim=1)
        else:
            full_mask = batch.attention_mask
        recorder.batch = batch
        recorder.prefix_length = offset if self.position == "mean" else 0
        recorder.prefix_sums = ([rows.sum(0) for rows in self._prefix_rows]
                                if use_prefix and self.position == "mean" else None)
        full = Batch(batch.input_ids, full_mask, batch.position_ids, batch.labels, batch.lengths, batch.padding_side)
        return batch, full, cache

    def _run_batch(self, recorder: _Recorder, parts: list[tuple[list[int], NeuronStats]], sequences, labels,
                   use_prefix: bool) -> None:
        batch, full, cache = self._prepare_batch(recorder, sequences, labels, use_prefix)
        self._forward(full, cache)
        row_labels = batch.labels
        if self.position == "all":
            row_labels = batch.labels[:, None].expand_as(batch.attention_mask)[batch.attention_mask.bool()]
        for slots, stats in parts:
            stats.update([recorder.rows[slot] for slot in slots], row_labels)
            if use_prefix and self.position == "all":
                self._fold_prefix_tokens(stats, [self._prefix_rows[slot] for slot in slots], batch.labels)

    @staticmethod
    def _fold_prefix_tokens(stats: NeuronStats, prefix_rows: list[torch.Tensor], labels: torch.Tensor) -> None:
        """Each prompt also contains the prefix tokens: fold them in once per row of each group."""
        prefix = torch.stack([rows.to(stats.device) for rows in prefix_rows])  # [L, P, d]
        zeros = torch.zeros(prefix.shape[1], dtype=torch.long, device=stats.device)
        _, prefix_mean, prefix_m2 = batch_moments(prefix, zeros, 1)
        per_group = torch.bincount(labels, minlength=stats.n_groups).to(stats.device, torch.float64)
        stats.merge_moments(per_group * prefix.shape[1], prefix_mean.expand(-1, stats.n_groups, -1),
                            prefix_m2 * per_group[None, :, None])


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config, if it states one."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def length_buckets(lengths: Sequence[int], max_rows: int, overhead_tokens: int = _BATCH_OVERHEAD_TOKENS,
                   max_tokens: int = _BATCH_MAX_TOKENS) -> list[tuple[int, int]]:
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


def validate_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    """Sorted unique layer indices, each checked against the model's layer count."""
    checked = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise CNAError(f"layer index {layer!r} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        checked.add(layer)
    return sorted(checked)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CNAError("distributed capture needs torch.distributed initialized: launch with torchrun and call "
                       "torch.distributed.init_process_group (the CLI's --distributed does both)")
    return dist.get_rank(), dist.get_world_size()


def capture_contrast(model, tokenizer, positive: Iterable[str], negative: Iterable[str], *,
                     layers: Sequence[int] | None = None, position: str = "last",
                     chat_template: bool | str | None = None, batch_size: int = 32, padding_side: str = "right",
                     prefix_cache: bool = True, progress: bool = True, distributed: bool = False,
                     max_length: int | None = None, on_long: str = "truncate",
                     checkpoint: Checkpoint | None = None, moe_mode: str = "effective") -> NeuronStats:
    """Statistics of positive (group 1) and negative (group 0) prompts in one stream of mixed batches.

    distributed: under torch.distributed (torchrun), each rank streams every world_size-th prompt of
    each set and the ranks' moments are merged exactly; every rank returns the merged statistics.
    max_length / on_long: prompts longer than max_length tokens (default: the model's context
    length) are truncated, keeping the chat-template prefix and the last tokens, or refused.
    checkpoint: save progress periodically and resume (per rank when distributed).
    moe_mode: on mixture-of-experts models, "effective" or "conditional" routed-neuron statistics;
    the result is then an MoEStats (see moe_stats.py).
    """
    from .moe_capture import capturer_class, moe_settings

    capturer = capturer_class(model)(model, tokenizer, layers=layers, position=position, chat_template=chat_template,
                                     batch_size=batch_size, padding_side=padding_side, prefix_cache=prefix_cache,
                                     progress=progress, max_length=max_length, on_long=on_long,
                                     **moe_settings(model, moe_mode))
    total = None
    if hasattr(positive, "__len__") and hasattr(negative, "__len__"):
        total = len(positive) + len(negative)
    if distributed:
        rank, world = _rank_and_world()
        positive, negative = itertools.islice(positive, rank, None, world), itertools.islice(negative, rank, None, world)
        total = None if total is None else len(range(rank, total, world))
        if checkpoint is not None:
            checkpoint = Checkpoint(checkpoint.path.with_name(f"{checkpoint.path.name}.rank{rank}"),
                                    checkpoint.every, {**checkpoint.identity, "rank": rank, "world": world},
                                    checkpoint.resume)
    labeled = itertools.chain(
        ((_check_prompt(prompt, number, "positive "), POSITIVE) for number, prompt in enumerate(positive, 1)),
        ((_check_prompt(prompt, number, "negative "), NEGATIVE) for number, prompt in enumerate(negative, 1)),
    )
    stats = capturer.run(labeled, n_groups=2, total=total, allow_empty=distributed, checkpoint=checkpoint)
    if distributed:
        stats.all_reduce()
    for side, name in ((POSITIVE, "positive"), (NEGATIVE, "negative")):
        if stats.count[side] == 0:
            raise CNAError(f"the {name} prompt set is empty: give at least one {name} prompt")
    return stats
