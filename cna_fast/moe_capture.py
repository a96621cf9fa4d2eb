"""Capture on mixture-of-experts models: ordinary neurons through down-projection pre-hooks (as in
dense models), routed neurons through row hooks inside the experts' forward (models/moe.py).

Every position mode works: "last" and "all" make each selected token one sample; "mean" makes a
prompt's mean over its tokens one sample (effective mode: sum of w * h over the prompt's routed
tokens divided by its length; conditional mode: the mean of h over the tokens routed to the expert).
The shared chat-template prefix is reused through the KV cache for "last" only; for "all" and
"mean" the prefix tokens run with every prompt, so their routing is seen as it happens.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .capture import Batch, Capturer, _Recorder, _StopForward
from .kernels import backend_for
from .models.moe import RowHook, register_row_hook
from .moe_stats import ExpertMoments, ExpertStats, MoEStats, validate_mode
from .stats import NeuronStats


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
    def of(cls, batch: Batch, position: str, n_groups: int) -> "BatchSamples":
        mask = batch.attention_mask.bool()
        rows, width = mask.shape
        token_sample = torch.full((rows, width), -1, dtype=torch.long)
        sizes = None
        labels = batch.labels
        if position == "last":
            last = batch.lengths - 1 if batch.padding_side == "right" else torch.full_like(batch.lengths, width - 1)
            token_sample[torch.arange(rows), last] = torch.arange(rows)
        elif position == "all":
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
    h, experts, sample, routing = h[keep], experts[keep], sample[keep], routing[keep]
    values = h.to(torch.float64)
    if mode == "effective":
        values = values * routing.to(torch.float64)[:, None]
    if samples.sizes is not None:  # "mean": sum each (prompt, expert) pair's tokens, then divide
        pairs, inverse = torch.unique(sample * num_experts + experts, return_inverse=True)
        values = torch.zeros(pairs.numel(), values.shape[1], dtype=torch.float64, device=device).index_add_(
            0, inverse, values)
        sample, experts = pairs // num_experts, pairs % num_experts
        divisor = (samples.sizes.to(device)[sample] if mode == "effective"
                   else torch.bincount(inverse, minlength=pairs.numel()).to(torch.float64))
        values = values / divisor[:, None]
    return values, experts, samples.labels.to(device)[sample]


class _MoERecorder(_Recorder):
    """Ordinary-neuron rows by pre-hooks (as for dense models), routed rows folded by row hooks;
    the forward stops after the last captured layer's MLP block."""

    def __init__(self, capturer: "MoECapturer") -> None:
        super().__init__(capturer.adapter, capturer.layers, capturer.position)
        self.capturer = capturer
        self.samples: BatchSamples | None = None
        self.moments: dict[int, ExpertMoments] = {}

    def __enter__(self) -> "_MoERecorder":
        adapter = self.adapter
        for slot, layer in enumerate(self.layers):
            if adapter.widths[layer]:
                site = adapter.neuron_site(layer)
                self._handles.append(site.register_forward_pre_hook(self._make_hook(slot, stop=False)))
            if adapter.layers[layer].experts is not None:
                self._handles.append(register_row_hook(adapter.experts(layer), self._routed_hook(layer)))
        self._handles.append(adapter.mlp(self.last_layer).register_forward_hook(self._stop))
        return self

    def _reduce(self, slot: int, hidden: torch.Tensor) -> torch.Tensor:
        """Shared experts may see the tokens flattened to [B*T, d] (Qwen2-MoE): restore [B, T, d] first."""
        if hidden.dim() == 2:
            hidden = hidden[None] if self.record_prefix else hidden.view(self.batch.input_ids.shape[0], -1,
                                                                         hidden.shape[-1])
        return super()._reduce(slot, hidden)

    @staticmethod
    def _stop(module, args, output):
        raise _StopForward

    def _routed_hook(self, layer: int) -> RowHook:
        def hook(h: torch.Tensor, experts: torch.Tensor, tokens: torch.Tensor, routing: torch.Tensor) -> None:
            if self.samples is None or self.record_prefix:
                return
            moments = self.moments[layer]
            values, row_experts, labels = sample_rows(self.samples, moments.mode, moments.shape[0], h, experts,
                                                      tokens, routing)
            moments.fold(values, row_experts, labels, self.samples.per_group)

        return hook


class MoECapturer(Capturer):
    """Capturer for mixture-of-experts models; returns MoEStats (see moe_stats.py for the modes)."""

    def __init__(self, model, tokenizer, *, moe_mode: str = "effective", **settings) -> None:
        super().__init__(model, tokenizer, **settings)
        self.moe_mode = validate_mode(moe_mode)
        probe = next(self.adapter.mlp(self.layers[0]).parameters())
        if backend_for(probe) == "triton":
            warnings.warn("the fused Triton kernels do not cover routed experts yet: MoE capture takes the hook "
                          "path", stacklevel=2)
        self.fused = False
        if self.position != "last":
            self.prefix = []  # prefix tokens run with each prompt, so their routed rows are samples too
        self.routed_layers = [layer for layer in self.layers if self.adapter.layers[layer].experts is not None]

    def _make_recorder(self, record: bool = True) -> _MoERecorder:
        return _MoERecorder(self)

    def _stats_per_device(self, n_groups: int, initial: MoEStats | None):
        """Ordinary parts per (device, width) with their slots, and routed moments per layer on its device."""
        self.n_groups = n_groups
        self.samples_seen = initial.count.clone() if initial is not None else torch.zeros(n_groups, dtype=torch.float64)
        groups: dict[tuple[torch.device, int], list[int]] = {}
        for slot, layer in enumerate(self.layers):
            if self.adapter.widths[layer]:
                groups.setdefault((self.adapter.layer_device(layer), self.adapter.widths[layer]), []).append(slot)
        ordinary = []
        for (device, width), slots in groups.items():
            layers = [self.layers[slot] for slot in slots]
            part = NeuronStats(layers, width, n_groups, device=device)
            if initial is not None:
                source = next(p for p in initial.ordinary if p.width == width)
                rows = [source.layer_row(layer) for layer in layers]
                part.count = source.count.to(device).clone()
                part.mean, part.m2 = source.mean[rows].to(device).clone(), source.m2[rows].to(device).clone()
            ordinary.append((slots, part))
        routed = {}
        for slot, layer in enumerate(self.routed_layers):
            device = self.adapter.layer_device(layer)
            routed[layer] = (initial.routed.to_moments(slot, device) if initial is not None else
                             ExpertMoments(self.adapter.num_experts, self.adapter.expert_width, n_groups,
                                           self.moe_mode, device))
        return ordinary, routed

    def _run_batch(self, recorder: _MoERecorder, parts, sequences, labels, use_prefix: bool) -> None:
        ordinary, routed = parts
        recorder.moments = routed
        batch, full, cache = self._prepare_batch(recorder, sequences, labels, use_prefix)
        samples = BatchSamples.of(batch, self.position, self.n_groups)
        recorder.samples = samples
        try:
            self._forward(full, cache)
        finally:
            recorder.samples = None
        for moments in routed.values():
            moments.end_batch(samples.per_group)
        self.samples_seen += samples.per_group
        row_labels = batch.labels
        if self.position == "all":
            row_labels = batch.labels[:, None].expand_as(batch.attention_mask)[batch.attention_mask.bool()]
        for slots, stats in ordinary:
            stats.update([recorder.rows[slot] for slot in slots], row_labels)

    def _gather(self, parts) -> MoEStats:
        ordinary, routed = parts
        by_width: dict[int, list[NeuronStats]] = {}
        for _, part in ordinary:
            by_width.setdefault(part.width, []).append(part)
        merged = [NeuronStats.concat(group) for _, group in sorted(by_width.items())]
        if self.routed_layers:
            routed_stats = ExpertStats.stack(self.routed_layers, [routed[layer] for layer in self.routed_layers],
                                             self.moe_mode)
        else:  # only dense layers captured
            routed_stats = ExpertStats([], self.adapter.num_experts, self.adapter.expert_width, self.n_groups,
                                       self.moe_mode)
            routed_stats.samples = self.samples_seen.clone()
        return MoEStats(merged, routed_stats)


def capturer_class(model) -> type[Capturer]:
    """MoECapturer for mixture-of-experts models, Capturer otherwise."""
    from .models import get_adapter
    from .models.moe import MoEAdapter

    return MoECapturer if isinstance(get_adapter(model), MoEAdapter) else Capturer


def moe_settings(model, moe_mode: str) -> dict:
    """Capturer keyword arguments for MoE models ({} for dense ones, where only the effective default is valid)."""
    if capturer_class(model) is MoECapturer:
        return {"moe_mode": moe_mode}
    if moe_mode != "effective":
        from .errors import CNAError

        raise CNAError(f"moe_mode={moe_mode!r} applies to mixture-of-experts models only; this model is dense")
    return {}
