"""Streaming per-neuron moments for groups of prompts (the two sides of a contrast, or more).

Per layer, group and neuron: count, mean and M2 (sum of squared deviations from the mean). A batch
is reduced exactly in float64 (two passes over the batch), then folded into the running moments
with Chan's parallel formula. The same formula merges statistics computed by other processes or
machines, so results do not depend on how the prompt stream was split. Memory is
O(layers x groups x d_ff) whatever the number of prompts.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_path
from ..errors import CNAError
from .moments import batch_moments, chan_merge

NEGATIVE, POSITIVE, SKIP = 0, 1, -1
_FORMAT = "cna_fast.stats/1"
_UPDATE_ELEMENTS = 1 << 22  # activations reduced in one float64 step (32 MiB)
_SAME_MEANS = 1e-6  # largest |mean difference| relative to the largest |mean| that counts as no contrast


# Longer than 150 lines: one value type whose update, merge, distributed reduction and file format share
# the same invariants (count/mean/M2 layout); splitting it would scatter them.
class NeuronStats:
    """Count, mean and M2 per (layer, group, neuron), accumulated in float64.

    layers: the model layer index behind each row of `mean` and `m2`.
    count: [groups] rows seen per group (identical for every layer).
    mean, m2: [len(layers), groups, width].
    meta: free-form provenance (model architecture, capture settings).
    """

    def __init__(
        self,
        layers: Sequence[int],
        width: int,
        n_groups: int = 2,
        *,
        device: torch.device | str = "cpu",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if n_groups < 1 or width < 1 or len(layers) < 1:
            raise CNAError(f"statistics need at least one layer, group and neuron; got {len(layers)}, {n_groups}, "
                           f"{width}")
        self.layers = [int(layer) for layer in layers]
        self.width = int(width)
        self.n_groups = int(n_groups)
        self.count = torch.zeros(n_groups, dtype=torch.float64, device=device)
        self.mean = torch.zeros(len(self.layers), n_groups, width, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def merge_moments(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold in moments of other rows: count [G], mean and m2 [L, G, width] (Chan et al.)."""
        count = count.to(self.device, torch.float64)
        self._merge_layers(slice(None), count, mean, m2)
        self.count = self.count + count

    def _merge_layers(self, layers: slice, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan merge into the layer rows `layers`; leaves `self.count` to the caller."""
        chan_merge(self.count, self.mean[layers], self.m2[layers], count, mean.to(self.device, torch.float64),
                   m2.to(self.device, torch.float64))

    def update(self, rows: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Fold in sample rows with group `labels` [R]; -1 skips a row.

        rows: [L, R, width], or a sequence of L tensors [R, width], one per tracked layer. Layers
        are reduced a few at a time so that the float64 copy stays small.
        """
        if len(rows) != len(self.layers) or any(r.dim() != 2 or r.shape[1] != self.width for r in rows):
            shapes = [list(r.shape) for r in rows]
            raise ValueError(f"rows must be {len(self.layers)} x [R, {self.width}], got {shapes}")
        labels = labels.to(self.device)
        if labels.numel() and int(labels.max()) >= self.n_groups:
            raise CNAError(f"group label {int(labels.max())} is outside 0..{self.n_groups - 1}")
        keep = labels >= 0
        labels = labels[keep]
        if labels.numel() == 0:
            return
        step = max(1, _UPDATE_ELEMENTS // max(rows[0].numel(), 1))
        count = None
        for start in range(0, len(self.layers), step):
            part = torch.stack([r.to(self.device)[keep] for r in rows[start:start + step]])
            count, mean, m2 = batch_moments(part, labels, self.n_groups)
            self._merge_layers(slice(start, start + step), count, mean, m2)
        self.count = self.count + count

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """Fold `other` into these statistics in place and return self."""
        if (other.layers, other.width, other.n_groups) != (self.layers, self.width, self.n_groups):
            raise CNAError(
                "cannot merge statistics of different shapes: "
                f"layers {other.layers} vs {self.layers}, width {other.width} vs {self.width}, "
                f"groups {other.n_groups} vs {self.n_groups}"
            )
        self.merge_moments(other.count, other.mean, other.m2)
        return self

    @classmethod
    def concat(cls, parts: Sequence["NeuronStats"], device: torch.device | str = "cpu") -> "NeuronStats":
        """Join statistics of disjoint layer sets over the same rows (e.g. one part per device), sorted by layer."""
        first = parts[0]
        for part in parts[1:]:
            if part.width != first.width or part.n_groups != first.n_groups or not torch.equal(
                    part.count.cpu(), first.count.cpu()):
                raise CNAError("only statistics of the same rows, width and groups can be joined by layer")
        layers = [layer for part in parts for layer in part.layers]
        if len(set(layers)) != len(layers):
            raise CNAError(f"statistics to join cover some layers twice: {layers}")
        order = sorted(range(len(layers)), key=layers.__getitem__)
        joined = cls([layers[i] for i in order], first.width, first.n_groups, device=device, meta=first.meta)
        joined.count = first.count.to(device)
        joined.mean = torch.cat([part.mean.to(device) for part in parts])[order]
        joined.m2 = torch.cat([part.m2.to(device) for part in parts])[order]
        return joined

    def all_reduce(self, group=None) -> "NeuronStats":
        """Merge the statistics of every torch.distributed rank, in rank order; every rank gets the result.

        Exact: the Chan merge of counts, means and M2, never a mean of means.
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        device = self.device
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        payload = [self.count.to(device), self.mean.to(device), self.m2.to(device)]
        gathered = [[torch.empty_like(tensor) for _ in range(world)] for tensor in payload]
        for slots, tensor in zip(gathered, payload):
            dist.all_gather(slots, tensor, group=group)
        merged = NeuronStats(self.layers, self.width, self.n_groups, device=self.device, meta=self.meta)
        for count, mean, m2 in zip(*gathered):
            merged.merge_moments(count, mean, m2)
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    def variance(self, ddof: int = 1) -> torch.Tensor:
        """Per-neuron variance [L, G, width]; NaN where a group has `ddof` rows or fewer."""
        denominator = (self.count - ddof)[None, :, None]
        return torch.where(denominator > 0, self.m2 / denominator.clamp_min(1), torch.nan)

    def std(self, ddof: int = 1) -> torch.Tensor:
        return self.variance(ddof).sqrt()

    def layer_row(self, layer: int) -> int:
        """Row of `mean`/`m2` that holds model layer `layer`."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise CNAError(f"layer {layer} was not captured; captured layers: {self.layers}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics as safetensors, atomically."""
        tensors = {
            "count": self.count.cpu().contiguous(),
            "mean": self.mean.cpu().contiguous(),
            "m2": self.m2.cpu().contiguous(),
            "layers": torch.tensor(self.layers, dtype=torch.int64),
        }
        header = {"format": _FORMAT, "meta": json.dumps(self.meta, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "NeuronStats":
        """Read statistics written by `save`; damaged or crafted files are a CNAError, not a traceback."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                names = set(handle.keys())
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error type for corrupt files
            raise CNAError(f"cannot read statistics file {str(path)!r}: {error}") from error
        if header.get("format") != _FORMAT:
            raise CNAError(f"{str(path)!r} is not a cna_fast statistics file")
        try:
            meta = json.loads(header.get("meta", "{}"))
            layers = _checked_tensors(names, tensors, meta)
        except (CNAError, ValueError, RecursionError) as error:
            raise CNAError(f"statistics file {str(path)!r} is damaged ({error}): delete it and start over") from None
        stats = cls(layers, tensors["mean"].shape[2], tensors["mean"].shape[1], device=device, meta=meta)
        stats.count = tensors["count"].to(device)
        stats.mean = tensors["mean"].to(device)
        stats.m2 = tensors["m2"].to(device)
        return stats


def check_contrast(stats: NeuronStats) -> None:
    """Refuse statistics that cannot rank neurons: NaN anywhere, or no difference between the groups."""
    bad = int((~torch.isfinite(stats.mean)).sum()) + int((~torch.isfinite(stats.m2)).sum())
    if bad:
        raise CNAError(f"the statistics hold {bad} NaN or infinite values (NaN activations, e.g. a float16 "
                       "overflow, or a damaged checkpoint): capture in float32 or bfloat16, and do not resume "
                       "from that checkpoint")
    if stats.n_groups >= 2 and stats.count.min() > 0:
        gap = (stats.mean[:, POSITIVE] - stats.mean[:, NEGATIVE]).abs().max()
        if gap <= _SAME_MEANS * stats.mean.abs().max().clamp_min(1e-30):
            raise CNAError("the positive and negative prompts give the same activations: the two sets are "
                           "identical (or do not differ for this model); give two different prompt sets")


def _checked_tensors(names: set[str], tensors: dict[str, torch.Tensor], meta: object) -> list[int]:
    """The layer list of a statistics file, after checking its tensors and checkpoint fields."""
    if names != {"count", "mean", "m2", "layers"}:
        raise CNAError(f"tensors {sorted(names)}, expected count, layers, m2, mean")
    count, mean, m2, layers = (tensors[name] for name in ("count", "mean", "m2", "layers"))
    if layers.dim() != 1 or layers.dtype != torch.int64 or mean.dim() != 3 or mean.shape[0] != layers.numel():
        raise CNAError(f"layers {list(layers.shape)} and mean {list(mean.shape)} do not fit together")
    if m2.shape != mean.shape or count.shape != mean.shape[1:2] or mean.dtype != torch.float64:
        raise CNAError(f"count {list(count.shape)}, mean {list(mean.shape)}, m2 {list(m2.shape)}: shapes differ")
    if count.dtype != torch.float64 or not torch.isfinite(count).all() or (count < 0).any() or (
            count != count.round()).any():
        raise CNAError("counts must be non-negative whole numbers")
    if layers.numel() and (int(layers.min()) < 0 or len(set(layers.tolist())) != layers.numel()):
        raise CNAError(f"layers must be distinct non-negative indices, got {layers.tolist()}")
    if not isinstance(meta, dict):
        raise CNAError(f"metadata of type {type(meta).__name__}, expected an object")
    if not (torch.isfinite(mean).all() and torch.isfinite(m2).all()):
        raise CNAError("it holds NaN or infinite statistics")
    identity, consumed = meta.get("identity"), meta.get("consumed")
    if identity is not None and (not isinstance(identity, dict) or identity.get("layers", layers.tolist())
                                 != layers.tolist()):
        raise CNAError("the checkpoint identity does not match its layers")
    if identity is not None and (isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0):
        raise CNAError(f"checkpoint position 'consumed' must be a whole number of prompts, got {consumed!r}")
    return layers.tolist()
