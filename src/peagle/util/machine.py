"""What this machine can do, and one setting of its C allocator that training needs.

CPUs differ by 2× and more (an AVX2-only EPYC runs fp32 GEMMs at 90–140 GFLOP/s, an AVX-512 one at
~210), so a wall time means little without the rate it was measured at. `matmul_rate` takes the best of
a few 1024² GEMMs over ``seconds`` (the demo's report and `benchmarks/step.py` both quote it).
`keep_freed_memory` stops glibc from handing each step's activations back to the kernel (see there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import torch

__all__ = ["BF16_MIN_SPEEDUP", "bf16_speedup", "keep_freed_memory", "matmul_rate"]

# `train.dtype: auto` trains in bf16 on a CPU only when its bf16 matmuls run at least this much faster than
# fp32 (AMX: ~3.5x; AVX-512 with bf16 instructions: ~2x; AVX2-only: bf16 is emulated and slower).
BF16_MIN_SPEEDUP = 1.5

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 256 << 20
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks up to 256 MiB instead of mapping and unmapping them.

    torch's CPU tensors come from malloc. By default glibc serves a large block with a fresh mmap and
    unmaps it on free, so a training step, which allocates and frees the same activations every step,
    page-faults its whole working set again each step (measured at L = 2048 in benchmarks/step.py:
    ~190k faults and ~0.4 s of system time per step; after this, ~2 faults and 0.01 s). Peak memory
    stays about the same: the blocks kept were in use at the peak. Linux with glibc only; elsewhere
    nothing changes and it returns False.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def matmul_rate(seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul FLOP/s on this machine in ``dtype`` with torch's current thread count (best of repeats)."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - t0))
    return best


def bf16_speedup(seconds: float = 0.5) -> float:
    """bf16 matmul rate over fp32's on this CPU, measured now (what `train.dtype: auto` decides by)."""
    return matmul_rate(seconds / 2, torch.bfloat16) / matmul_rate(seconds / 2)
