"""Where a capture's samples go: the accumulators behind one interface (`Accumulator`).

- `DeviceStats`, the hook path: the recorder's sample rows go into one `NeuronStats` per
  (device, width) group of layers (any reduction, any number of groups);
- `FusedMoments`, the fused path: the `act_and_capture` kernel folds rows into two-sided moments
  inside the MLP (CUDA, or forced with CNA_FAST_BACKEND=triton); nothing is recorded;
- `capture.moe.MoEStatsAccumulator`: ordinary neurons as `DeviceStats`, routed ones through row
  hooks inside the experts' forward.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol, Sequence

import torch
from torch import nn

from ..batching import sample_labels
from ..kernels import LayerMoments
from ..models.fused import patched_capture
from ..stats import NeuronStats, Stats, batch_moments
from .forward import Forward


class Accumulator(Protocol):
    """What a capture needs of the place its samples go.

    records: whether the recorder must reduce each layer's activations to sample rows for `add`
    (False when the samples are folded inside the forward itself).
    """

    records: bool

    def forward_context(self, forward: Forward, reduction: str) -> ContextManager:
        """A context around one forward pass (hooks or MLP patches that fold samples while it runs)."""

    def add(self, forward: Forward, rows: list[torch.Tensor], reduction: str) -> None:
        """Fold the sample rows the recorder made of one forward (one tensor per captured layer)."""

    def gather(self) -> Stats:
        """The statistics so far, as one object on the CPU (NeuronStats, or MoEStats on MoE models)."""


class DeviceStats:
    """Ordinary neurons on the hook path: one NeuronStats per (device, width) group, on that device.

    layers: the captured layers (slots of the recorder's rows); layers of width 0 (routed experts
    only) hold no ordinary neurons. initial: statistics to continue from, one NeuronStats per width.
    """

    records = True

    def __init__(self, adapter, layers: list[int], n_groups: int, initial: Sequence[NeuronStats] = ()) -> None:
        groups: dict[tuple[torch.device, int], list[int]] = {}
        for slot, layer in enumerate(layers):
            if adapter.widths[layer]:
                groups.setdefault((adapter.layer_device(layer), adapter.widths[layer]), []).append(slot)
        self.parts: list[tuple[list[int], NeuronStats]] = []
        for (device, width), slots in groups.items():
            part = NeuronStats([layers[slot] for slot in slots], width, n_groups, device=device)
            source = next((other for other in initial if other.width == width), None)
            if source is not None:  # each part starts from an exact copy of its layers
                rows = [source.layer_row(layer) for layer in part.layers]
                part.count = source.count.to(device).clone()
                part.mean, part.m2 = source.mean[rows].to(device).clone(), source.m2[rows].to(device).clone()
            self.parts.append((slots, part))

    def forward_context(self, forward: Forward, reduction: str) -> ContextManager:
        return contextlib.nullcontext()

    def add(self, forward: Forward, rows: list[torch.Tensor], reduction: str) -> None:
        labels = sample_labels(forward.batch, reduction)
        for slots, stats in self.parts:
            stats.update([rows[slot] for slot in slots], labels)
            if forward.prefix is not None and reduction == "all":
                _fold_prefix_tokens(stats, [forward.prefix.rows[slot] for slot in slots], forward.batch.labels)

    def by_width(self) -> list[NeuronStats]:
        """The statistics of each width, its layers joined in order (a dense model has one width)."""
        widths: dict[int, list[NeuronStats]] = {}
        for _, part in self.parts:
            widths.setdefault(part.width, []).append(part)
        return [NeuronStats.concat(group) for _, group in sorted(widths.items())]

    def gather(self) -> NeuronStats:
        (stats,) = self.by_width()
        return stats


def _fold_prefix_tokens(stats: NeuronStats, prefix_rows: list[torch.Tensor], labels: torch.Tensor) -> None:
    """Each prompt also contains the prefix tokens: fold them in once per row of each group."""
    prefix = torch.stack([rows.to(stats.device) for rows in prefix_rows])  # [L, P, d]
    zeros = torch.zeros(prefix.shape[1], dtype=torch.long, device=stats.device)
    _, prefix_mean, prefix_m2 = batch_moments(prefix, zeros, 1)
    per_group = torch.bincount(labels, minlength=stats.n_groups).to(stats.device, torch.float64)
    stats.merge_moments(per_group * prefix.shape[1], prefix_mean.expand(-1, stats.n_groups, -1),
                        prefix_m2 * per_group[None, :, None])


class FusedMoments:
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

    def forward_context(self, forward: Forward, reduction: str) -> contextlib.AbstractContextManager:
        batch = forward.batch
        token_labels = torch.full(batch.attention_mask.shape, -1, dtype=torch.long)
        if reduction == "last":
            rows = torch.arange(len(batch.labels))
            last = batch.lengths - 1 if batch.padding_side == "right" else torch.full_like(batch.lengths, -1)
            token_labels[rows, last] = batch.labels
        else:
            token_labels = torch.where(batch.attention_mask.bool(), batch.labels[:, None], token_labels)
        return patched_capture(self.model, self.moments, labels=lambda: token_labels)

    def add(self, forward: Forward, rows: list[torch.Tensor], reduction: str) -> None:
        """Nothing to do: the kernel already folded the rows in during the forward."""

    def gather(self) -> NeuronStats:
        stats = NeuronStats(self.layers, self.width, 2)
        stats.count = self.moments[self.layers[0]].count.detach().cpu().to(torch.float64)
        stats.mean = torch.stack([self.moments[layer].mean.cpu() for layer in self.layers]).to(torch.float64)
        stats.m2 = torch.stack([self.moments[layer].m2.cpu() for layer in self.layers]).to(torch.float64)
        return stats
