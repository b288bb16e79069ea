"""What this machine can do: its measured fp32 matmul rate, quoted beside every time peagle reports.

CPUs differ by 2× and more (an AVX2-only EPYC runs fp32 GEMMs at 90–140 GFLOP/s, an AVX-512 one at
~210), so a wall time means little without the rate it was measured at. `matmul_rate` takes the best of
a few 1024² GEMMs over ``seconds`` (the demo's report and `benchmarks/step.py` both quote it).
"""

from __future__ import annotations

import time

import torch

__all__ = ["matmul_rate"]


def matmul_rate(seconds: float = 1.0) -> float:
    """Measured fp32 matmul FLOP/s on this machine with torch's current thread count (best of repeats)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - t0))
    return best
