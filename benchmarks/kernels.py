"""Fused-kernel benchmark: each kernel vs its torch reference and vs plain act(gate) * up.

    python -m benchmarks.kernels --out benchmarks/results/kernels.csv

On a CUDA machine: Llama-3-8B and 70B MLP shapes (d_ff 14336 and 28672, rows 1..16384) in
bfloat16, effective bandwidth (bytes the kernel must move / time) against the device's measured
copy bandwidth, and the targets: act_and_scale within 5% of the unscaled fused SwiGLU, and
act_and_capture at >= 80% of copy bandwidth. Without CUDA it times only the torch path at small
shapes, which says nothing about the kernels.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if not __package__:  # run as a file: its folder on sys.path would shadow the Hugging Face `kernels` package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import csv  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if CUDA:  # the CPU test and benchmark suites turn Triton's interpreter on; real kernels compile here
    os.environ["TRITON_INTERPRET"] = "0"

from cna_fast.kernels import (act_and_capture_torch, act_and_capture_triton, act_and_scale_sparse_torch,  # noqa: E402
                              act_and_scale_sparse_triton, act_and_scale_torch, act_and_scale_triton,
                              apply_activation)

GPU_WIDTHS = (14336, 28672)  # Llama-3-8B, Llama-3-70B
GPU_ROWS = (1, 16, 128, 1024, 4096, 16384)
CPU_WIDTHS = (1536, 14336)
CPU_ROWS = (1, 16, 64)
N_TABLES = 8  # distinct steering requests in one batch
SCALE_TARGET = 1.05  # act_and_scale time / unscaled fused time
CAPTURE_TARGET = 0.80  # act_and_capture bandwidth / copy bandwidth
FIELDS = ["device", "dtype", "d_ff", "rows", "variant", "backend", "ms", "gb_per_s", "fraction_of_copy"]


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call (CUDA: triton's do_bench, L2 flushed between calls)."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write counted)."""
    elements = (1 << 29) if CUDA else (1 << 24)  # 1 GiB / 32 MiB of bfloat16
    source = torch.empty(elements, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    return 2 * source.numel() * source.element_size() / time_ms(lambda: target.copy_(source)) / 1e6


def cases(gate: torch.Tensor, up: torch.Tensor) -> dict[tuple[str, str], Callable[[], object]]:
    """(variant, backend) -> a call, for one shape."""
    rows, width = gate.shape
    device = gate.device
    scale = torch.rand(width, device=device) + 0.5
    table = torch.rand(N_TABLES, width, device=device) + 0.5
    table_index = torch.randint(0, N_TABLES, (rows,), device=device)
    neurons = torch.randperm(width, device=device)[: max(1, width // 1000)]  # 0.1% of the neurons
    multipliers = torch.rand(N_TABLES, neurons.numel(), device=device)
    labels = torch.randint(-1, 2, (rows,), device=device)

    def fresh_stats():
        return torch.zeros(2, device=device), torch.zeros(2, width, device=device), torch.zeros(2, width, device=device)

    stats = {"triton": fresh_stats(), "torch": fresh_stats()}
    calls = {
        ("act*up (plain torch)", "torch"): lambda: apply_activation(gate, "silu") * up,
        ("act_and_scale, no scale", "torch"): lambda: act_and_scale_torch(gate, up, "silu", None),
        ("act_and_scale, vector", "torch"): lambda: act_and_scale_torch(gate, up, "silu", scale),
        ("act_and_scale, per-row table", "torch"): lambda: act_and_scale_torch(gate, up, "silu", table, table_index),
        ("act_and_scale_sparse, per-row", "torch"):
            lambda: act_and_scale_sparse_torch(gate, up, "silu", neurons, multipliers, table_index),
        ("act_and_capture", "torch"): lambda: act_and_capture_torch(gate, up, "silu", labels, *stats["torch"]),
    }
    if CUDA:
        calls.update({
            ("act_and_scale, no scale", "triton"): lambda: act_and_scale_triton(gate, up, "silu", None),
            ("act_and_scale, vector", "triton"): lambda: act_and_scale_triton(gate, up, "silu", scale),
            ("act_and_scale, per-row table", "triton"):
                lambda: act_and_scale_triton(gate, up, "silu", table, table_index),
            ("act_and_scale_sparse, per-row", "triton"):
                lambda: act_and_scale_sparse_triton(gate, up, "silu", neurons, multipliers, table_index),
            ("act_and_capture", "triton"): lambda: act_and_capture_triton(gate, up, "silu", labels, *stats["triton"]),
        })
    return calls


def run(out: Path) -> None:
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if CUDA else "CPU"
    if not CUDA:
        print("No CUDA device: timing only the torch references at small shapes. These numbers say nothing "
              "about the Triton kernels; run this on a GPU for those.")
    copy = copy_bandwidth(device)
    print(f"{name}: copy bandwidth {copy:.0f} GB/s")
    rows_list, widths = (GPU_ROWS, GPU_WIDTHS) if CUDA else (CPU_ROWS, CPU_WIDTHS)
    results = []
    for width in widths:
        for rows in rows_list:
            gate = torch.randn(rows, width, device=device, dtype=dtype)
            up = torch.randn(rows, width, device=device, dtype=dtype)
            moved = 3 * gate.numel() * gate.element_size()  # read gate and up, write h
            for (variant, backend), call in cases(gate, up).items():
                ms = time_ms(call)
                gb_per_s = moved / ms / 1e6
                results.append(dict(device=name, dtype="bfloat16", d_ff=width, rows=rows, variant=variant,
                                    backend=backend, ms=round(ms, 5), gb_per_s=round(gb_per_s, 1),
                                    fraction_of_copy=round(gb_per_s / copy, 3)))
                print(f"d_ff {width:6d} rows {rows:6d}  {variant:30s} {backend:6s} {ms:9.4f} ms "
                      f"{gb_per_s:8.1f} GB/s  {gb_per_s / copy:6.1%} of copy")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {out}")
    if CUDA:
        report_targets(results)


def report_targets(results: list[dict]) -> None:
    """Targets at the largest row count per width, where launch overhead no longer dominates."""
    index = {(r["d_ff"], r["rows"], r["variant"], r["backend"]): r for r in results}
    for width in GPU_WIDTHS:
        rows = GPU_ROWS[-1]
        unscaled = index[(width, rows, "act_and_scale, no scale", "triton")]["ms"]
        for variant in ("act_and_scale, vector", "act_and_scale, per-row table", "act_and_scale_sparse, per-row"):
            ratio = index[(width, rows, variant, "triton")]["ms"] / unscaled
            verdict = "met" if ratio <= SCALE_TARGET else "MISSED"
            print(f"d_ff {width} rows {rows}: {variant} / unscaled fused = {ratio:.3f} "
                  f"(target <= {SCALE_TARGET}) {verdict}")
        fraction = index[(width, rows, "act_and_capture", "triton")]["fraction_of_copy"]
        verdict = "met" if fraction >= CAPTURE_TARGET else "MISSED"
        print(f"d_ff {width} rows {rows}: act_and_capture at {fraction:.1%} of copy bandwidth "
              f"(target >= {CAPTURE_TARGET:.0%}) {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.csv"), help="CSV file to write")
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
