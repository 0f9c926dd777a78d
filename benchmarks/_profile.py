"""Where a step's time goes on the GPU: kernel time (union of kernel intervals) against wall time, per kernel.

Used by profile_step.py (W1's profile) and bench_throughput.py (W2's GPU busy fraction). torch.profiler records
kernels launched from CUDA graphs too (CUPTI), so replayed steps are counted like eager ones.
"""

from __future__ import annotations

import collections
import time


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def profile_gpu(fn, *, top: int = 12, timeline: int = 0) -> dict:
    """Run `fn()` once under torch.profiler; returns wall ms, GPU busy ms (kernels and copies, overlaps counted
    once), the busy fraction, and the `top` kernels by total time: name → (total ms, calls). With `timeline`, also
    the last `timeline` device events in start order as [name, start us from the first of them, duration us]: the
    gaps and overlaps between kernels (what a step's boundaries cost) read off it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # device activity only: less overhead
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start)
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in device_events]
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in device_events:
        per_kernel[e.name][0] += (e.time_range.end - e.time_range.start) / 1e3
        per_kernel[e.name][1] += 1
    busy_ms = _union_us(intervals) / 1e3
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    result = {"wall_ms": wall_ms, "gpu_busy_ms": busy_ms, "busy_fraction": busy_ms / wall_ms if wall_ms else 0.0,
            "num_kernels": len(device_events), "top_kernels": {name[:90]: [round(t, 4), n] for name, (t, n) in ranked}}
    if timeline:
        last = sorted(device_events, key=lambda e: e.time_range.start)[-timeline:]
        t0 = last[0].time_range.start if last else 0
        result["timeline"] = [[e.name[:60], round(e.time_range.start - t0, 2),
                               round(e.time_range.end - e.time_range.start, 2)] for e in last]
    return result
