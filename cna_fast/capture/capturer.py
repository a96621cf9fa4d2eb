"""The capture loop: labeled prompts in, statistics out, in batched forward passes.

Prompts are tokenized in windows, sorted by length inside each window (length buckets, little
padding; see `batching`) and run through the model body only: no LM head, and the forward stops
at the down projection of the last layer that is needed. A token prefix shared by every prompt
(the chat template's system turn) runs once; its keys and values are reused for every batch.
Each forward's samples go to an accumulator (see `accumulators`).
"""
from __future__ import annotations

import itertools
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batching import (MIN_PREFIX_TOKENS, WINDOW_BATCHES, Batch, LengthLimit, PlannedBatch, check_prompt,
                        context_length, encode_prompts, pad_after_prefix, pad_batch, pad_token_id, plan_batches,
                        shared_prefix, windows)
from ..errors import CNAError
from ..hooks import HookSet
from ..models import get_adapter, is_moe
from ..models.fused import fused_backend
from ..settings import CaptureSettings
from ..stats import NEGATIVE, POSITIVE, NeuronStats
from .accumulators import Accumulator, DeviceStats, FusedMoments
from .checkpoint import Checkpoint
from .forward import Forward, Recorder, SharedPrefix, eval_mode


class Capturer:
    """Runs labeled prompts through a model and accumulates neuron statistics per group.

    settings: a CaptureSettings, or keyword options that build one (layers, reduction, ...).
    """

    recorder_type = Recorder  # MoE models record ordinary neurons their own way (capture/moe.py)
    handles_moe = False  # capturer_for(model) picks MoECapturer for mixture-of-experts models

    def __init__(self, model: nn.Module, tokenizer, settings: CaptureSettings | None = None, *,
                 progress: bool = True, **options) -> None:
        self.settings = CaptureSettings.build(settings, **options)
        self.adapter = get_adapter(model)
        if is_moe(self.adapter) != self.handles_moe:
            raise CNAError(f"{type(self).__name__} does not capture this {self.adapter.model_type} model: build the "
                           "capturer with cna_fast.capture.capturer_for(model, settings)")
        if not self.handles_moe:
            self.width = self.adapter.d_ff  # dense statistics have one width (raises for layers that differ)
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

    def _accumulator(self, n_groups: int, initial: NeuronStats | None) -> Accumulator:
        if self.fused and n_groups == 2:
            return FusedMoments(self.model, self.adapter, self.layers, initial)
        return DeviceStats(self.adapter, self.layers, n_groups, [initial] if initial is not None else [])

    def _run_window(self, window: list[tuple[str, int]], seen: int, n_groups: int, recorder: Recorder,
                    accumulator: Accumulator, bar) -> None:
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

    def _prepare(self, planned: PlannedBatch) -> Forward:
        """Pad a batch; with the shared prefix, its cache and a mask that covers the prefix too."""
        if not planned.uses_prefix:
            batch = pad_batch(planned.sequences, planned.labels, self.pad_id, self.settings.padding_side)
            return Forward(batch, batch, None, None)
        if self._shared is None:
            self._shared = SharedPrefix(self.model, self.prefix, self.layers,
                                        keep_rows=self.settings.reduction != "last")
        batch, mask = pad_after_prefix(planned.sequences, planned.labels, self.pad_id, len(self.prefix))
        full = Batch(batch.input_ids, mask, batch.position_ids, batch.labels, batch.lengths, batch.padding_side)
        return Forward(batch, full, self._shared.cache_for(len(planned.sequences)), self._shared)

    def _warn_truncated(self) -> None:
        if self.limit.truncated:
            warnings.warn(f"{self.limit.truncated} prompts were longer than {self.limit.max_length} tokens and were "
                          "truncated (kept the chat-template prefix and the last tokens); set max_length or "
                          "on_long='error'", stacklevel=3)


def labeled_prompts(positive: Iterable[str], negative: Iterable[str]) -> Iterator[tuple[str, int]]:
    """(prompt, side) pairs: every positive prompt, then every negative one, each checked as it is read."""
    return itertools.chain(
        ((check_prompt(prompt, number, "positive "), POSITIVE) for number, prompt in enumerate(positive, 1)),
        ((check_prompt(prompt, number, "negative "), NEGATIVE) for number, prompt in enumerate(negative, 1)),
    )


def check_prompt_set(prompts: object, name: str) -> None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise CNAError(f"the {name} prompts must be a list of strings (or a PromptSource), got "
                       f"{type(prompts).__name__}; wrap a single prompt in a list")
