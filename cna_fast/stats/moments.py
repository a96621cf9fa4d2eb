"""The two formulas every statistic here is made of: exact batch moments and Chan's merge.

A batch's rows are reduced in float64 with two passes (mean, then squared deviations); running
moments absorb them, and moments from other batches, processes or machines, with Chan's parallel
formula, so a result never depends on how the stream was split.
"""
from __future__ import annotations

import torch


def chan_merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, other_count: torch.Tensor,
               other_mean: torch.Tensor, other_m2: torch.Tensor) -> None:
    """Fold moments of other rows into `mean` and `m2` in place (Chan et al.); the caller adds the counts.

    count, other_count [..., G]; mean, m2, other_mean, other_m2 [..., G, W] (leading dimensions broadcast).
    """
    total = (count + other_count).clamp_min(1.0)
    delta = other_mean - mean
    mean += delta * (other_count / total)[..., None]
    m2 += other_m2 + delta.square() * (count * other_count / total)[..., None]


def batch_moments(rows: torch.Tensor, labels: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, ...]:
    """Exact float64 count [G], mean and M2 [L, G, width] of `rows` [L, R, width] grouped by `labels` [R]."""
    values = rows.to(torch.float64)
    onehot = torch.nn.functional.one_hot(labels, n_groups).to(torch.float64)  # [R, G]
    count = onehot.sum(0)
    sums = torch.matmul(onehot.T, values)  # [L, G, width]
    mean = sums / count.clamp_min(1.0)[None, :, None]
    centered = values - mean[:, labels, :]
    m2 = torch.matmul(onehot.T, centered.square_())
    return count, mean, m2
