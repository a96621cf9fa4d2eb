"""Optional Triton: kernel modules import with or without it, so their torch references always work.

Without Triton, `jit` returns the plain function (never launched) and `require_triton` raises. The
kernels are decorated when their module is imported, so `TRITON_INTERPRET=1` (run them on CPU
under Triton's interpreter) must be set before that; `INTERPRETER` records what was in force.
"""
from __future__ import annotations

from typing import Callable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch references only
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
INTERPRETER = bool(TRITON_AVAILABLE and triton.knobs.runtime.interpret)


def jit(fn: Callable) -> Callable:
    """`triton.jit(fn)` when Triton is installed; otherwise `fn` itself (the launchers refuse to run)."""
    return triton.jit(fn) if TRITON_AVAILABLE else fn


def require_triton() -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton kernels need the `triton` package; install it, or use the torch backend "
                           "(CNA_FAST_BACKEND=torch)")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
