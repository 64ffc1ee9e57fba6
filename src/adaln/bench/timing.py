"""Timers for the GPU report: median milliseconds of a call, images per second, the device's ceilings.

On CUDA a call is timed with CUDA events, after overwriting a 256 MiB buffer so that no input is left in
the L2 cache (as ``triton.testing.do_bench`` does); on CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 << 20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def reps_for(fn: Callable[[], object], device: torch.device, target_ms: float, *, low: int = 3, high: int = 200) -> int:
    """How many repetitions of ``fn`` fill about ``target_ms`` (one timed call estimates it)."""
    one = time_ms(fn, device, reps=1, warmup=1)
    return int(min(high, max(low, target_ms // max(one, 1e-3))))


def per_second(fn: Callable[[], object], items: int, steps: int, device: torch.device) -> float:
    """Items per second over ``steps`` back-to-back calls of an already warmed-up ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return items * steps / (time.perf_counter() - start)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Device-to-device copy of ``nbytes``, in bytes moved (read + written) per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=reps)
    return 2 * nbytes / (ms * 1e-3)


def matmul_flops(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    """Floating-point operations per second of an ``n x n @ n x n`` matmul in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=reps)
    return 2 * n**3 / (ms * 1e-3)


def peak_memory_gib(device: torch.device) -> float | None:
    """The allocator's peak since the last ``reset_peak`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
