"""Fused activation + steering scale: h = act(gate) * up * scale, per neuron and optionally per row.

Dense form: `scale` is [d_ff], or a table [n_tables, d_ff] with `table_index` [rows] picking each
row's table, so one launch serves a batch whose requests carry different circuits and multipliers.
`scale=None` gives the plain fused act(gate) * up.

Sparse form: `neurons` [k] and `multipliers` [k] or [n_tables, k]. It runs the unscaled fused
kernel, then `_scale_columns_kernel` rescales only the k circuit columns in place. For circuits
(k is ~0.1% of d_ff) that should be the faster choice: the big kernel stays a pure stream of 2
reads and 1 write, with no per-element scale load and no [n_tables, d_ff] table to build, and the
fix-up moves rows * k elements (under 0.2% of the traffic). Its cost is a second launch (a few
microseconds), which matters only at decode sizes. A gather inside the big kernel would instead
need a per-element search of the k indices or the dense table. Not yet timed on a GPU:
benchmarks/kernels.py measures the sparse and the dense-table forms side by side.

Index tensors are not range-checked on the Triton path (that would cost a host sync); the kernels
mask out-of-range indices so memory stays safe, the torch references raise.
"""
from __future__ import annotations

import torch

from ._triton import INTERPRETER, cdiv, jit, next_power_of_2, require_triton, tl
from .activations import act_and_mul_torch, activation_kind, check_gate_up, load_activated

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_scale(scale: torch.Tensor | None, table_index: torch.Tensor | None, gate: torch.Tensor,
                 width: int, name: str) -> torch.Tensor | None:
    """Validate a per-column `scale` of `width` columns: [width] alone, or [n_tables, width] with table_index."""
    if scale is None:
        if table_index is not None:
            raise ValueError(f"table_index was given without a {name} table")
        return None
    if not scale.is_floating_point() or scale.device != gate.device:
        raise ValueError(f"{name} must be a floating-point tensor on {gate.device}, got {scale.dtype} on "
                         f"{scale.device}")
    if scale.dim() == 1 and scale.shape[0] == width:
        if table_index is not None:
            raise ValueError(f"table_index needs a {name} table [n_tables, {width}], got a vector [{width}]")
    elif scale.dim() == 2 and scale.shape[1] == width:
        if table_index is None:
            raise ValueError(f"a {name} table [n_tables, {width}] needs table_index [rows]")
        if (table_index.shape != (gate.shape[0],) or table_index.dtype not in _INDEX_DTYPES
                or table_index.device != gate.device):
            raise ValueError(f"table_index must be int32/int64 [{gate.shape[0]}] on {gate.device}, got "
                             f"{table_index.dtype} {list(table_index.shape)} on {table_index.device}")
    else:
        raise ValueError(f"{name} must be [{width}] or [n_tables, {width}], got {list(scale.shape)}")
    return scale if scale.stride(-1) == 1 else scale.contiguous()


def _check_neurons(neurons: torch.Tensor, gate: torch.Tensor) -> None:
    if neurons.dim() != 1 or neurons.dtype not in _INDEX_DTYPES or neurons.device != gate.device:
        raise ValueError(f"neurons must be int32/int64 [k] on {gate.device}, got {neurons.dtype} "
                         f"{list(neurons.shape)} on {neurons.device}")


def act_and_scale_torch(gate: torch.Tensor, up: torch.Tensor | None, activation: str, scale: torch.Tensor | None,
                        table_index: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: act(gate) * up * scale in float32, rounded once to the input dtype.

    gate, up: [rows, d_ff] (up None for plain MLPs). scale: [d_ff], [n_tables, d_ff] with
    table_index [rows], or None (no scaling).
    """
    kind = activation_kind(activation)
    gate, up = check_gate_up(gate, up)
    scale = _check_scale(scale, table_index, gate, gate.shape[1], "scale")
    h = act_and_mul_torch(gate, up, kind)
    if scale is not None:
        h = h * (scale.float() if table_index is None else scale.float()[table_index])
    return h.to(gate.dtype)


def act_and_scale_sparse_torch(gate: torch.Tensor, up: torch.Tensor | None, activation: str, neurons: torch.Tensor,
                               multipliers: torch.Tensor, table_index: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: h = act(gate) * up (rounded), then columns `neurons` multiplied by `multipliers` (rounded).

    neurons: [k] distinct column indices. multipliers: [k], or [n_tables, k] with table_index [rows].
    """
    h = act_and_scale_torch(gate, up, activation, None)
    _check_neurons(neurons, h)
    multipliers = _check_scale(multipliers, table_index, h, neurons.shape[0], "multipliers")
    factors = multipliers.float() if table_index is None else multipliers.float()[table_index]
    h[:, neurons] = (h[:, neurons].float() * factors).to(h.dtype)
    return h


@jit
def _act_and_scale_kernel(
    gate_ptr, up_ptr, scale_ptr, table_index_ptr, h_ptr,
    n_rows, n_cols, n_tables, gate_stride, up_stride, scale_stride, h_stride,
    KIND: tl.constexpr, HAS_UP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_TABLE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows.to(tl.int64)[:, None]
    values = load_activated(gate_ptr, up_ptr, offsets, cols, gate_stride, up_stride, mask, KIND, HAS_UP)
    if HAS_SCALE:
        if HAS_TABLE:
            table = tl.load(table_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            in_range = mask & ((table >= 0) & (table < n_tables))[:, None]
            values = values * tl.load(scale_ptr + table[:, None] * scale_stride + cols[None, :], mask=in_range,
                                      other=1.0).to(tl.float32)
        else:
            values = values * tl.load(scale_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :]
    tl.store(h_ptr + offsets * h_stride + cols[None, :], values.to(h_ptr.dtype.element_ty), mask=mask)


@jit
def _scale_columns_kernel(
    h_ptr, neurons_ptr, multipliers_ptr, table_index_ptr,
    n_rows, n_cols, n_neurons, n_tables, h_stride, multipliers_stride,
    HAS_TABLE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_NEURONS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    picks = tl.program_id(1) * BLOCK_NEURONS + tl.arange(0, BLOCK_NEURONS)
    row_ok = rows < n_rows
    pick_ok = picks < n_neurons
    neurons = tl.load(neurons_ptr + picks, mask=pick_ok, other=0).to(tl.int64)
    mask = row_ok[:, None] & (pick_ok & (neurons >= 0) & (neurons < n_cols))[None, :]
    if HAS_TABLE:
        table = tl.load(table_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        in_range = mask & ((table >= 0) & (table < n_tables))[:, None]
        factors = tl.load(multipliers_ptr + table[:, None] * multipliers_stride + picks[None, :], mask=in_range,
                          other=1.0).to(tl.float32)
    else:
        factors = tl.load(multipliers_ptr + picks, mask=pick_ok, other=1.0).to(tl.float32)[None, :]
    pointers = h_ptr + rows.to(tl.int64)[:, None] * h_stride + neurons[None, :]
    values = tl.load(pointers, mask=mask, other=0.0).to(tl.float32) * factors
    tl.store(pointers, values.to(h_ptr.dtype.element_ty), mask=mask)


def _blocks(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """(block_rows, block_cols) of the streaming kernel.

    GPUs: up to 4 rows x 1024 neurons per program with 4 warps, 8 contiguous neurons (16-byte loads)
    per thread and row, ~100 registers on sm_90. Interpreter: few, big programs (each costs
    milliseconds). Not yet timed on hardware.
    """
    if device.type != "cuda" or INTERPRETER:
        return min(next_power_of_2(n_rows), 64), min(next_power_of_2(n_cols), 2048)
    return min(next_power_of_2(n_rows), 4), min(next_power_of_2(n_cols), 1024)


def act_and_scale_triton(gate: torch.Tensor, up: torch.Tensor | None, activation: str, scale: torch.Tensor | None,
                         table_index: torch.Tensor | None = None, *, block_rows: int | None = None,
                         block_cols: int | None = None) -> torch.Tensor:
    """Triton version of `act_and_scale_torch`; block sizes (powers of two) override the launch configuration."""
    require_triton()
    kind = activation_kind(activation)
    gate, up = check_gate_up(gate, up)
    scale = _check_scale(scale, table_index, gate, gate.shape[1], "scale")
    n_rows, n_cols = gate.shape
    h = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if h.numel() == 0:
        return h
    auto_rows, auto_cols = _blocks(n_rows, n_cols, gate.device)
    block_rows, block_cols = block_rows or auto_rows, block_cols or auto_cols
    tables = table_index is not None  # then scale is [n_tables, d_ff]
    _act_and_scale_kernel[(cdiv(n_rows, block_rows), cdiv(n_cols, block_cols))](
        gate, gate if up is None else up, gate if scale is None else scale,
        table_index.contiguous() if tables else gate, h,
        n_rows, n_cols, scale.shape[0] if tables else 1,
        gate.stride(0), gate.stride(0) if up is None else up.stride(0), scale.stride(0) if tables else 0,
        h.stride(0),
        KIND=kind, HAS_UP=up is not None, HAS_SCALE=scale is not None, HAS_TABLE=tables,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=4,
    )
    return h


def act_and_scale_sparse_triton(gate: torch.Tensor, up: torch.Tensor | None, activation: str, neurons: torch.Tensor,
                                multipliers: torch.Tensor, table_index: torch.Tensor | None = None, *,
                                block_rows: int | None = None, block_cols: int | None = None) -> torch.Tensor:
    """Triton version of `act_and_scale_sparse_torch`: the fused kernel, then the k columns rescaled in place."""
    h = act_and_scale_triton(gate, up, activation, None, block_rows=block_rows, block_cols=block_cols)
    _check_neurons(neurons, h)
    multipliers = _check_scale(multipliers, table_index, h, neurons.shape[0], "multipliers")
    n_rows, n_cols = h.shape
    n_neurons = neurons.shape[0]
    if h.numel() == 0 or n_neurons == 0:
        return h
    fixup_rows, fixup_neurons = min(next_power_of_2(n_rows), 64), min(next_power_of_2(n_neurons), 64)
    tables = table_index is not None  # then multipliers is [n_tables, k]
    _scale_columns_kernel[(cdiv(n_rows, fixup_rows), cdiv(n_neurons, fixup_neurons))](
        h, neurons.contiguous(), multipliers, table_index.contiguous() if tables else h,
        n_rows, n_cols, n_neurons, multipliers.shape[0] if tables else 1, h.stride(0),
        multipliers.stride(0) if tables else 0,
        HAS_TABLE=tables, BLOCK_ROWS=fixup_rows, BLOCK_NEURONS=fixup_neurons,
    )
    return h
