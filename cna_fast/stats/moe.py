"""Streaming statistics of routed-expert neurons, and the MoE statistics file.

Two modes:
  effective (default): a sample's value for neuron (layer, expert, j) is w_e(x) * h_ej(x), the
      routing weight times the activation, and 0 when the sample is not routed to the expert.
      That is exactly what reaches the down projection's output. Every expert sees every sample.
  conditional: statistics over the samples routed to the expert only, with a count per expert and side.

Both modes record how many samples each expert was routed for, per side (routing frequency).
Moments are exact to float64 rounding: each batch is reduced in float64 (sums and sums of
squares of the float32 activations), then folded in with Chan's formula, per (expert, side)
count. Memory is O(layers x experts x expert width), whatever the number of prompts.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_path
from ..errors import CNAError
from ..settings import validate_moe_mode
from .dense import NeuronStats
from .moments import chan_merge

FORMAT = "cna_fast.moe_stats/1"


class ExpertMoments:
    """One MoE layer's routed-neuron moments, on that layer's device, updated in place.

    samples [G]: samples seen per side. routed [E, G]: samples routed to each expert.
    count [E, G]: samples folded into each expert's moments (effective: = samples; conditional: = routed).
    mean, m2 [E, G, W].
    """

    def __init__(self, num_experts: int, width: int, n_groups: int, mode: str,
                 device: torch.device | str = "cpu") -> None:
        self.mode = validate_moe_mode(mode)
        self.samples = torch.zeros(n_groups, dtype=torch.float64, device=device)
        self.routed = torch.zeros(num_experts, n_groups, dtype=torch.float64, device=device)
        self.count = torch.zeros_like(self.routed)
        self.mean = torch.zeros(num_experts, n_groups, width, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self._present = torch.zeros(num_experts, dtype=torch.bool, device=device)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)

    def fold(self, values: torch.Tensor, experts: torch.Tensor, labels: torch.Tensor,
             samples_per_group: torch.Tensor) -> None:
        """Fold rows of one batch: values [R, W] float64 (one per routed (sample, expert) pair, overwritten),
        experts and labels [R].

        samples_per_group [G]: the batch's samples per side (the zeros of the effective mode).
        Each expert must get all of its rows of a batch in one call (true of every experts forward).
        """
        num_experts, n_groups, width = self.shape
        device = self.mean.device
        values, experts, labels = values.to(device, torch.float64), experts.to(device), labels.to(device)
        key = experts * n_groups + labels
        routed = torch.bincount(key, minlength=num_experts * n_groups).view(num_experts, n_groups).to(torch.float64)
        present = routed.sum(1) > 0
        if self.mode == "effective":
            count = samples_per_group.to(device, torch.float64).expand(num_experts, n_groups) * present[:, None]
        else:
            count = routed
        sums = torch.zeros(num_experts * n_groups, width, dtype=torch.float64, device=device).index_add_(0, key, values)
        squares = torch.zeros_like(sums).index_add_(0, key, values.square_())  # `values` is ours: squared in place
        sums, squares = sums.view(num_experts, n_groups, width), squares.view(num_experts, n_groups, width)
        mean = sums / count.clamp_min(1.0)[..., None]
        # Sum of squared deviations over all `count` samples (unrouted ones are zeros in effective mode). In
        # float64 from float32 activations the one-pass form loses nothing measurable, at half the memory
        # traffic of two passes (this runs on every routed row of every layer).
        m2 = (squares - sums * mean).clamp_min_(0.0)
        chan_merge(self.count, self.mean, self.m2, count, mean, m2)
        self.count += count
        self.routed += routed
        self._present |= present

    def end_batch(self, samples_per_group: torch.Tensor) -> None:
        """Close a batch: count its samples; in effective mode, experts that got no row see only zeros."""
        samples = samples_per_group.to(self.samples.device, torch.float64)
        self.samples += samples
        if self.mode == "effective":
            absent = samples.expand_as(self.count) * (~self._present)[:, None]
            chan_merge(self.count, self.mean, self.m2, absent, torch.zeros_like(self.mean), torch.zeros_like(self.m2))
            self.count += absent
        self._present.zero_()


class ExpertStats:
    """Routed-neuron statistics of all MoE layers: tensors [layers, experts, groups, width] on one device."""

    def __init__(self, layers: Sequence[int], num_experts: int, width: int, n_groups: int = 2,
                 mode: str = "effective", device: torch.device | str = "cpu") -> None:
        self.layers = [int(layer) for layer in layers]
        self.mode = validate_moe_mode(mode)
        shape = (len(self.layers), num_experts, n_groups)
        self.samples = torch.zeros(n_groups, dtype=torch.float64, device=device)
        self.routed = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros_like(self.routed)
        self.mean = torch.zeros(*shape, width, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    @property
    def num_experts(self) -> int:
        return self.mean.shape[1]

    @property
    def width(self) -> int:
        return self.mean.shape[3]

    @property
    def n_groups(self) -> int:
        return self.mean.shape[2]

    @classmethod
    def stack(cls, layers: Sequence[int], moments: Sequence[ExpertMoments], mode: str) -> "ExpertStats":
        """One object on the CPU from per-layer moments (each on its layer's device)."""
        num_experts, n_groups, width = moments[0].shape
        stats = cls(layers, num_experts, width, n_groups, mode)
        stats.samples = moments[0].samples.cpu().clone()
        for name in ("routed", "count", "mean", "m2"):
            setattr(stats, name, torch.stack([getattr(part, name).cpu() for part in moments]))
        return stats

    def to_moments(self, slot: int, device: torch.device | str) -> ExpertMoments:
        """Layer `slot`'s moments as an ExpertMoments on `device` (to continue a capture)."""
        moments = ExpertMoments(self.num_experts, self.width, self.n_groups, self.mode, device)
        moments.samples = self.samples.to(device).clone()
        for name in ("routed", "count", "mean", "m2"):
            setattr(moments, name, getattr(self, name)[slot].to(device).clone())
        return moments

    def merge(self, other: "ExpertStats") -> "ExpertStats":
        if (other.layers, other.mode, other.mean.shape) != (self.layers, self.mode, self.mean.shape):
            raise CNAError("cannot merge expert statistics of different layers, modes or shapes")
        self.merge_tensors(other.samples, other.routed, other.count, other.mean, other.m2)
        return self

    def merge_tensors(self, samples, routed, count, mean, m2) -> None:
        chan_merge(self.count, self.mean, self.m2, count.to(self.mean.device), mean.to(self.mean.device),
                   m2.to(self.mean.device))
        self.count += count.to(self.count.device)
        self.samples += samples.to(self.samples.device)
        self.routed += routed.to(self.routed.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"samples": self.samples, "routed": self.routed, "count": self.count, "mean": self.mean, "m2": self.m2}

    def routing_frequency(self) -> torch.Tensor:
        """[layers, experts, groups]: the fraction of each side's samples routed to each expert."""
        return self.routed / self.samples.clamp_min(1.0)

    def variance(self, ddof: int = 1) -> torch.Tensor:
        denominator = (self.count - ddof)[..., None]
        return torch.where(denominator > 0, self.m2 / denominator.clamp_min(1), torch.nan)


class MoEStats:
    """Statistics of an MoE model: ordinary neurons (dense layers, shared experts) and routed ones.

    ordinary: one NeuronStats per distinct MLP width (DeepSeek-V3's dense layers and shared
    experts differ), each over the layers of that width; empty when no layer has ordinary neurons.
    routed: the routed-expert statistics.
    """

    def __init__(self, ordinary: Sequence[NeuronStats], routed: ExpertStats, meta: dict[str, Any] | None = None):
        self.ordinary = list(ordinary)
        self.routed = routed
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def count(self) -> torch.Tensor:
        """Samples per side [G]."""
        return self.routed.samples

    @property
    def n_groups(self) -> int:
        return self.routed.n_groups

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.routed.layers).union(*(part.layers for part in self.ordinary)))

    def merge(self, other: "MoEStats") -> "MoEStats":
        if len(other.ordinary) != len(self.ordinary):
            raise CNAError("cannot merge MoE statistics with different ordinary-neuron parts")
        for mine, theirs in zip(self.ordinary, other.ordinary):
            mine.merge(theirs)
        self.routed.merge(other.routed)
        return self

    def all_reduce(self, group=None) -> "MoEStats":
        """Exact merge over torch.distributed ranks (Chan, in rank order); every rank gets the result."""
        import torch.distributed as dist

        for part in self.ordinary:
            part.all_reduce(group)
        world = dist.get_world_size(group)
        names = ("samples", "routed", "count", "mean", "m2")
        payload = [getattr(self.routed, name) for name in names]
        gathered = [[torch.empty_like(tensor) for _ in range(world)] for tensor in payload]
        for slots, tensor in zip(gathered, payload):
            dist.all_gather(slots, tensor, group=group)
        merged = ExpertStats(self.routed.layers, self.routed.num_experts, self.routed.width, self.routed.n_groups,
                             self.routed.mode, device=self.routed.mean.device)
        for rank_tensors in zip(*gathered):
            merged.merge_tensors(*rank_tensors)
        self.routed = merged
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors, atomically."""
        tensors = {f"routed.{name}": tensor.cpu().contiguous() for name, tensor in self.routed.tensors().items()}
        tensors["routed.layers"] = torch.tensor(self.routed.layers, dtype=torch.int64)
        for index, part in enumerate(self.ordinary):
            tensors.update({f"ordinary{index}.count": part.count.cpu(), f"ordinary{index}.mean": part.mean.cpu(),
                            f"ordinary{index}.m2": part.m2.cpu(),
                            f"ordinary{index}.layers": torch.tensor(part.layers, dtype=torch.int64)})
        header = {"format": FORMAT, "mode": self.routed.mode, "parts": str(len(self.ordinary)),
                  "meta": json.dumps(self.meta, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MoEStats":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error type for corrupt files
            raise CNAError(f"cannot read statistics file {str(path)!r}: {error}") from error
        if header.get("format") != FORMAT:
            raise CNAError(f"{str(path)!r} is not a cna_fast MoE statistics file")
        mean = tensors["routed.mean"]
        routed = ExpertStats(tensors["routed.layers"].tolist(), mean.shape[1], mean.shape[3], mean.shape[2],
                             header["mode"])
        for name in ("samples", "routed", "count", "mean", "m2"):
            setattr(routed, name, tensors[f"routed.{name}"])
        ordinary = []
        for index in range(int(header["parts"])):
            part_mean = tensors[f"ordinary{index}.mean"]
            part = NeuronStats(tensors[f"ordinary{index}.layers"].tolist(), part_mean.shape[2], part_mean.shape[1])
            part.count, part.mean, part.m2 = (tensors[f"ordinary{index}.count"], part_mean,
                                              tensors[f"ordinary{index}.m2"])
            ordinary.append(part)
        return cls(ordinary, routed, json.loads(header.get("meta", "{}")))
