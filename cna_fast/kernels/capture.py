"""Fused activation + capture: h = act(gate) * up, and the labeled rows folded into per-side moments.

One read of gate and up, one write of h: the statistics cost no extra pass over the activations.

Triton design (deterministic, no atomics):
  1. `_act_and_capture_kernel`, grid (neuron tiles, row splits). Each program owns BLOCK_COLS
     neurons and one contiguous range of rows, which it walks in tiles of BLOCK_ROWS. Per tile it
     writes h, then computes each side's tile moments in float32 with two passes over the tile
     held in registers (mean, then sum of squared deviations) and Chan-merges them into running
     per-neuron (count, mean, M2) kept in registers, the mean relative to a per-neuron shift (the
     first tile's rough mean). It stores its split's moments (shift, relative mean, M2) once.
  2. `_merge_partials_kernel`, grid (neuron tiles): Chan-merges the splits in a fixed order, still
     shifted, then merges the result into the running statistics in their dtype (float32 or
     float64), the mean difference taken as (shift - old mean) + relative mean.
  The row splits exist only to fill the GPU when there are few neuron tiles; on the interpreter a
  single split is used. Rows seen per side are added to `count` afterwards on the same stream.

Shifted two-pass moments within a tile and Chan merges between tiles keep data with a large common
offset (values around 1e3) within ~1e-6 relative of a float64 reduction per call; the naive sum of
squares, or even unshifted tile means (a float32 sum of 1e3-sized values is off by ~1e-4), would
not. Across calls, float32 running statistics carry the rounding of their stored mean (~3e-5 at
1e3), which Chan's formula turns into M2 errors near 1e-5 relative for an offset/std of 1e3;
float64 running statistics avoid that floor and cost nothing measurable (one merge per neuron).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._triton import INTERPRETER, cdiv, jit, next_power_of_2, require_triton, tl
from .activations import act_and_mul_torch, activation_kind, check_gate_up, load_activated

NEGATIVE, POSITIVE = 0, 1  # the two sides of the moments; rows labeled otherwise are skipped
_LABEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
_STATS_DTYPES = (torch.float32, torch.float64)


@dataclass
class LayerMoments:
    """Running statistics of one layer, updated in place: count [2], mean and m2 [2, d_ff] (side 0, side 1)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def zeros(cls, width: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "LayerMoments":
        mean = torch.zeros(2, width, dtype=dtype, device=device)
        return cls(torch.zeros(2, dtype=dtype, device=device), mean, torch.zeros_like(mean))


def _check_stats(labels: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                 gate: torch.Tensor) -> None:
    rows, width = gate.shape
    if labels.shape != (rows,) or labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"labels must be a signed integer tensor of shape [{rows}], got {labels.dtype} "
                         f"{list(labels.shape)}")
    if count.shape != (2,) or mean.shape != (2, width) or m2.shape != (2, width):
        raise ValueError(f"count must be [2] and mean, m2 [2, {width}]; got {list(count.shape)}, "
                         f"{list(mean.shape)}, {list(m2.shape)}")
    if count.dtype not in _STATS_DTYPES or mean.dtype not in _STATS_DTYPES or m2.dtype != mean.dtype:
        raise ValueError(f"count, mean and m2 must be float32 or float64 (mean and m2 alike), got {count.dtype}, "
                         f"{mean.dtype}, {m2.dtype}")
    if not (count.is_contiguous() and mean.is_contiguous() and m2.is_contiguous()):
        raise ValueError("count, mean and m2 are updated in place and must be contiguous")
    if any(t.device != gate.device for t in (labels, count, mean, m2)):
        raise ValueError(f"labels and statistics must be on the activations' device {gate.device}")


def act_and_capture_torch(gate: torch.Tensor, up: torch.Tensor | None, activation: str, labels: torch.Tensor,
                          count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Reference: h = act(gate) * up; rows labeled 0 / 1 folded into side 0 / 1 of the moments.

    gate, up: [rows, d_ff] (up None for plain MLPs: h = act(gate)). labels: [rows], -1 (or any value
    other than 0 and 1) skips a row. count [2], mean and m2 [2, d_ff]: running statistics, updated in
    place. The moments are those of h as returned (rounded to the input dtype), reduced in float64.
    """
    kind = activation_kind(activation)
    gate, up = check_gate_up(gate, up)
    _check_stats(labels, count, mean, m2, gate)
    h = act_and_mul_torch(gate, up, kind).to(gate.dtype)
    values = h.detach().double()  # the running statistics never join an autograd graph
    for side in (NEGATIVE, POSITIVE):
        selected = (labels == side)[:, None]
        n_batch = selected.sum(dtype=torch.float64)
        batch_mean = torch.where(selected, values, 0.0).sum(0) / n_batch.clamp_min(1.0)
        batch_m2 = torch.where(selected, values - batch_mean, 0.0).square().sum(0)
        n_old = count[side].double()
        weight = n_batch / (n_old + n_batch).clamp_min(1.0)
        delta = batch_mean - mean[side].double()
        mean[side] = mean[side].double() + delta * weight
        m2[side] = m2[side].double() + batch_m2 + delta.square() * (n_old * weight)
        count[side] = n_old + n_batch
    return h


@jit
def _chan_merge(n_a, mean_a, m2_a, n_b, m2_b, delta):
    """Moments of the union of two row sets (Chan et al.); `delta` = mean_b - mean_a.

    An empty set b leaves a unchanged. Returns (count, mean, M2).
    """
    total = n_a + n_b
    weight = n_b / tl.maximum(total, 1.0)
    return total, mean_a + delta * weight, m2_a + m2_b + delta * delta * (n_a * weight)


@jit
def _fold_tile(values, selected, n, shift, mean, m2):
    """Fold the `selected` rows of a [BLOCK_ROWS, BLOCK_COLS] float32 tile into running moments.

    `mean` is relative to a per-neuron `shift`, the rough mean of the first tile that had rows:
    shifted values are small, so their float32 sums stay exact under a large common offset.
    """
    n_tile = tl.sum(selected.to(tl.float32), axis=0)
    rough_mean = tl.sum(tl.where(selected[:, None], values, 0.0), axis=0) / tl.maximum(n_tile, 1.0)
    shift = tl.where(n == 0.0, rough_mean, shift)  # no rows folded yet: re-shifting is free
    shifted = tl.where(selected[:, None], values - shift[None, :], 0.0)
    tile_mean = tl.sum(shifted, axis=0) / tl.maximum(n_tile, 1.0)
    deviation = tl.where(selected[:, None], shifted - tile_mean[None, :], 0.0)
    n, mean, m2 = _chan_merge(n, mean, m2, n_tile, tl.sum(deviation * deviation, axis=0), tile_mean - mean)
    return n, shift, mean, m2


@jit
def _act_and_capture_kernel(
    gate_ptr, up_ptr, h_ptr, labels_ptr, part_count_ptr, part_shift_ptr, part_mean_ptr, part_m2_ptr,
    n_rows, n_cols, rows_per_split, gate_stride, up_stride, h_stride,
    KIND: tl.constexpr, HAS_UP: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    col_tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = col_tile * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    zeros = tl.zeros((BLOCK_COLS,), tl.float32)
    n_neg, shift_neg, mean_neg, m2_neg = 0.0, zeros, zeros, zeros  # rows folded: the same for every neuron
    n_pos, shift_pos, mean_pos, m2_pos = 0.0, zeros, zeros, zeros
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    for start in range(row_start, row_end, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None]
        values = load_activated(gate_ptr, up_ptr, offsets, cols, gate_stride, up_stride, mask, KIND, HAS_UP)
        h = values.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offsets * h_stride + cols[None, :], h, mask=mask)
        values = h.to(tl.float32)  # the statistics describe h as written
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        n_neg, shift_neg, mean_neg, m2_neg = _fold_tile(values, labels == 0, n_neg, shift_neg, mean_neg, m2_neg)
        n_pos, shift_pos, mean_pos, m2_pos = _fold_tile(values, labels == 1, n_pos, shift_pos, mean_pos, m2_pos)
    neg = (split * 2) * n_cols + cols  # partials are [split, side, neuron]
    pos = neg + n_cols
    tl.store(part_shift_ptr + neg, shift_neg, mask=col_ok)
    tl.store(part_mean_ptr + neg, mean_neg, mask=col_ok)
    tl.store(part_m2_ptr + neg, m2_neg, mask=col_ok)
    tl.store(part_shift_ptr + pos, shift_pos, mask=col_ok)
    tl.store(part_mean_ptr + pos, mean_pos, mask=col_ok)
    tl.store(part_m2_ptr + pos, m2_pos, mask=col_ok)
    if col_tile == 0:  # counts are the same for every neuron
        tl.store(part_count_ptr + split * 2, n_neg)
        tl.store(part_count_ptr + split * 2 + 1, n_pos)


@jit
def _merge_partials_kernel(
    part_count_ptr, part_shift_ptr, part_mean_ptr, part_m2_ptr, count_ptr, mean_ptr, m2_ptr, n_cols, n_splits,
    BLOCK_COLS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    stats_dtype = mean_ptr.dtype.element_ty
    for side in tl.static_range(2):
        n = 0.0
        shift = tl.zeros((BLOCK_COLS,), tl.float32)
        mean = tl.zeros((BLOCK_COLS,), tl.float32)  # relative to shift, as in the first kernel
        m2 = tl.zeros((BLOCK_COLS,), tl.float32)
        for split in range(n_splits):
            offsets = (split * 2 + side) * n_cols + cols
            part_shift = tl.load(part_shift_ptr + offsets, mask=col_ok, other=0.0)
            shift = tl.where(n == 0.0, part_shift, shift)
            part_mean = (part_shift - shift) + tl.load(part_mean_ptr + offsets, mask=col_ok, other=0.0)
            n, mean, m2 = _chan_merge(n, mean, m2, tl.load(part_count_ptr + split * 2 + side),
                                      tl.load(part_m2_ptr + offsets, mask=col_ok, other=0.0), part_mean - mean)
        stats = side * n_cols + cols
        old_mean = tl.load(mean_ptr + stats, mask=col_ok, other=0.0)
        _, new_mean, new_m2 = _chan_merge(
            tl.load(count_ptr + side).to(stats_dtype), old_mean, tl.load(m2_ptr + stats, mask=col_ok, other=0.0),
            n.to(stats_dtype), m2.to(stats_dtype), (shift.to(stats_dtype) - old_mean) + mean.to(stats_dtype))
        tl.store(mean_ptr + stats, new_mean, mask=col_ok)
        tl.store(m2_ptr + stats, new_m2, mask=col_ok)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(block_rows, block_cols, row_splits) for the first kernel.

    GPUs: 4 rows x 512 neurons with 4 warps gives each thread 4 contiguous neurons of all 4 rows, so
    the per-tile reductions over rows stay in registers (no shared memory); ~100 registers per thread
    on sm_90 (cuobjdump), so 4-5 programs fit per SM; enough row splits for ~4 programs per SM.
    Interpreter: few, big programs (each costs milliseconds). Not yet timed on hardware.
    """
    if device.type != "cuda" or INTERPRETER:
        return min(next_power_of_2(n_rows), 64), min(next_power_of_2(n_cols), 2048), 1
    block_rows, block_cols = min(next_power_of_2(n_rows), 4), min(next_power_of_2(n_cols), 512)
    col_tiles = cdiv(n_cols, block_cols)
    row_splits = min(cdiv(n_rows, block_rows), cdiv(4 * _multiprocessors(device.index or 0), col_tiles))
    return block_rows, block_cols, max(row_splits, 1)


def act_and_capture_triton(gate: torch.Tensor, up: torch.Tensor | None, activation: str, labels: torch.Tensor,
                           count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, *,
                           block_rows: int | None = None, block_cols: int | None = None,
                           row_splits: int | None = None) -> torch.Tensor:
    """Triton version of `act_and_capture_torch` (same arguments and results).

    block_rows, block_cols (powers of two) and row_splits override the launch configuration (tests).
    """
    require_triton()
    kind = activation_kind(activation)
    gate, up = check_gate_up(gate, up)
    _check_stats(labels, count, mean, m2, gate)
    n_rows, n_cols = gate.shape
    h = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if n_rows == 0 or n_cols == 0:
        return h
    auto_rows, auto_cols, auto_splits = _launch_config(n_rows, n_cols, gate.device)
    block_rows, block_cols = block_rows or auto_rows, block_cols or auto_cols
    row_tiles = cdiv(n_rows, block_rows)
    rows_per_split = cdiv(row_tiles, min(row_splits or auto_splits, row_tiles)) * block_rows
    n_splits = cdiv(n_rows, rows_per_split)
    part_count = torch.empty((n_splits, 2), dtype=torch.float32, device=gate.device)
    part_shift, part_mean, part_m2 = torch.empty((3, n_splits, 2, n_cols), dtype=torch.float32, device=gate.device)
    col_tiles = cdiv(n_cols, block_cols)
    _act_and_capture_kernel[(col_tiles, n_splits)](
        gate, gate if up is None else up, h, labels.contiguous(), part_count, part_shift, part_mean, part_m2,
        n_rows, n_cols, rows_per_split, gate.stride(0), gate.stride(0) if up is None else up.stride(0), h.stride(0),
        KIND=kind, HAS_UP=up is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=4,
    )
    _merge_partials_kernel[(col_tiles,)](part_count, part_shift, part_mean, part_m2, count, mean, m2, n_cols,
                                         n_splits, BLOCK_COLS=block_cols)
    count += part_count.sum(0).to(count.dtype)
    return h
