"""Capture on mixture-of-experts models: ordinary neurons through down-projection pre-hooks (as in
dense models), routed neurons through row hooks inside the experts' forward (models/moe.py).

Every reduction works: "last" and "all" make each selected token one sample; "mean" makes a
prompt's mean over its tokens one sample (effective mode: sum of w * h over the prompt's routed
tokens divided by its length; conditional mode: the mean of h over the tokens routed to the expert).
The shared chat-template prefix is reused through the KV cache for "last" only; for "all" and
"mean" the prefix tokens run with every prompt, so their routing is seen as it happens.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..batching import Batch
from ..hooks import HookSet
from ..models import MoEAdapter
from ..models.fused import fused_backend
from ..models.moe import RowHook, row_hook
from ..settings import CaptureSettings
from ..stats import ExpertMoments, ExpertStats, MoEStats
from .accumulators import DeviceStats
from .capturer import Capturer
from .forward import Recorder, StopForward


@dataclass
class BatchSamples:
    """Which tokens of a batch are samples: token_sample [B*T] (sample index or -1), labels [P] per sample.

    sizes [P]: tokens a sample averages ("mean"), or None when each sample is one token.
    per_group [G]: samples per side.
    """

    token_sample: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor | None
    per_group: torch.Tensor

    @classmethod
    def of(cls, batch: Batch, reduction: str, n_groups: int) -> "BatchSamples":
        mask = batch.attention_mask.bool()
        rows, width = mask.shape
        token_sample = torch.full((rows, width), -1, dtype=torch.long)
        sizes = None
        labels = batch.labels
        if reduction == "last":
            last = batch.lengths - 1 if batch.padding_side == "right" else torch.full_like(batch.lengths, width - 1)
            token_sample[torch.arange(rows), last] = torch.arange(rows)
        elif reduction == "all":
            token_sample[mask] = torch.arange(int(mask.sum()))
            labels = batch.labels[:, None].expand(rows, width)[mask]
        else:
            token_sample = torch.where(mask, torch.arange(rows)[:, None], token_sample)
            sizes = batch.lengths.to(torch.float64)
        per_group = torch.bincount(labels, minlength=n_groups).to(torch.float64)
        return cls(token_sample.reshape(-1), labels, sizes, per_group)


def sample_rows(samples: BatchSamples, mode: str, num_experts: int, h: torch.Tensor, experts: torch.Tensor,
                tokens: torch.Tensor, routing: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward's expert rows as (values [R, W] float64, experts [R], labels [R]), one per (sample, expert)."""
    device = h.device
    sample = samples.token_sample.to(device)[tokens]
    keep = sample >= 0
    if not bool(keep.all()):  # "all" keeps every row: no copies then
        h, experts, sample, routing = h[keep], experts[keep], sample[keep], routing[keep]
    # Effective values are w * h as the model's dtype rounds it (one rounding; the sums are float64).
    # A copy in every case: fold() squares it in place, and h is still on its way to the down projection.
    values = (h * routing[:, None].to(h.dtype) if mode == "effective" else h).to(torch.float64, copy=True)
    if samples.sizes is not None:  # "mean": sum each (prompt, expert) pair's tokens, then divide
        pairs, inverse = torch.unique(sample * num_experts + experts, return_inverse=True)
        values = torch.zeros(pairs.numel(), values.shape[1], dtype=torch.float64, device=device).index_add_(
            0, inverse, values)
        sample, experts = pairs // num_experts, pairs % num_experts
        divisor = (samples.sizes.to(device)[sample] if mode == "effective"
                   else torch.bincount(inverse, minlength=pairs.numel()).to(torch.float64))
        values = values / divisor[:, None]
    return values, experts, samples.labels.to(device)[sample]


class MoERecorder(Recorder):
    """Ordinary-neuron rows by pre-hooks on dense and shared-expert down projections (as for dense
    models); the forward stops after the last captured layer's MLP block. Routed rows are folded
    by the accumulator's row hooks."""

    def install(self, hooks: HookSet) -> None:
        for slot, layer in enumerate(self.layers):
            if self.adapter.widths[layer]:
                hooks.pre_hook(self.adapter.neuron_site(layer), self._make_hook(slot, stop=False))
        hooks.post_hook(self.adapter.mlp(max(self.layers)), self._stop)

    def _stop(self, module, args, output) -> None:
        if self._current is not None:
            raise StopForward

    def _reduce(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """Shared experts may see the tokens flattened to [B*T, d] (Qwen2-MoE): restore [B, T, d] first."""
        if hidden.dim() == 2:
            hidden = hidden.view(self._current.batch.input_ids.shape[0], -1, hidden.shape[-1])
        return super()._reduce(slot, hidden)


class MoEStatsAccumulator(DeviceStats):
    """Capture's accumulator for MoE models: ordinary neurons as in `DeviceStats` (per device and width),
    routed neurons in ExpertMoments per layer (on its device), folded by row hooks during each forward."""

    def __init__(self, adapter: MoEAdapter, layers: list[int], n_groups: int, mode: str,
                 initial: MoEStats | None) -> None:
        super().__init__(adapter, layers, n_groups, initial.ordinary if initial is not None else ())
        self.adapter, self.n_groups, self.mode = adapter, n_groups, mode
        self.routed_layers = [layer for layer in layers if adapter.layers[layer].experts is not None]
        self.moments = {layer: (initial.routed.to_moments(slot, adapter.layer_device(layer)) if initial is not None
                                else ExpertMoments(adapter.num_experts, adapter.expert_width, n_groups, mode,
                                                   adapter.layer_device(layer)))
                        for slot, layer in enumerate(self.routed_layers)}
        self.samples_seen = initial.count.clone() if initial is not None else torch.zeros(n_groups, dtype=torch.float64)

    @contextlib.contextmanager
    def forward_context(self, forward, reduction: str) -> Iterator[None]:
        """Row hooks on the routed layers' experts for one forward; closes the batch's moments after it."""
        samples = BatchSamples.of(forward.batch, reduction, self.n_groups)
        with HookSet() as hooks:
            for layer in self.routed_layers:
                hooks.enter(row_hook(self.adapter.experts(layer), self._folder(layer, samples)))
            yield
        for moments in self.moments.values():
            moments.end_batch(samples.per_group)
        self.samples_seen += samples.per_group

    def _folder(self, layer: int, samples: BatchSamples) -> RowHook:
        moments = self.moments[layer]

        def hook(h: torch.Tensor, experts: torch.Tensor, tokens: torch.Tensor, routing: torch.Tensor) -> None:
            values, row_experts, labels = sample_rows(samples, self.mode, self.adapter.num_experts, h, experts,
                                                      tokens, routing)
            moments.fold(values, row_experts, labels, samples.per_group)

        return hook

    def gather(self) -> MoEStats:
        ordinary = self.by_width()
        if self.routed_layers:
            routed = ExpertStats.stack(self.routed_layers, [self.moments[layer] for layer in self.routed_layers],
                                       self.mode)
        else:  # only dense layers captured
            routed = ExpertStats([], self.adapter.num_experts, self.adapter.expert_width, self.n_groups, self.mode)
            routed.samples = self.samples_seen.clone()
        return MoEStats(ordinary, routed)


class MoECapturer(Capturer):
    """Capturer for mixture-of-experts models; returns MoEStats (see cna_fast.stats.moe for the modes)."""

    recorder_type = MoERecorder
    handles_moe = True

    def __init__(self, model: nn.Module, tokenizer, settings: CaptureSettings | None = None, *,
                 progress: bool = True, **options) -> None:
        super().__init__(model, tokenizer, settings, progress=progress, **options)
        if fused_backend(self.adapter, self.layers[0]) == "triton":
            warnings.warn("the fused Triton kernels do not cover routed experts yet: MoE capture takes the hook "
                          "path", stacklevel=2)
        self.fused = False
        if self.settings.reduction != "last":
            self.prefix = []  # prefix tokens run with each prompt, so their routed rows are samples too

    def _accumulator(self, n_groups: int, initial: MoEStats | None) -> MoEStatsAccumulator:
        return MoEStatsAccumulator(self.adapter, self.layers, n_groups, self.settings.moe_mode, initial)
