"""Timing primitives shared by every benchmark: medians and spread, CUDA events on GPU, perf_counter on CPU."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import torch


def _percentile(sorted_values: List[float], q: float) -> float:
    index = min(int(round(q * (len(sorted_values) - 1))), len(sorted_values) - 1)
    return sorted_values[index]


def summarize(times_ms: List[float]) -> Dict[str, float]:
    """median, 10th and 90th percentile of a list of per-call times (ms)."""
    ordered = sorted(times_ms)
    return {
        "median_ms": statistics.median(ordered),
        "q10_ms": _percentile(ordered, 0.1),
        "q90_ms": _percentile(ordered, 0.9),
        "reps": len(ordered),
    }


class _Timer:
    """Times one call of fn: CUDA events on a CUDA device (GPU time), wall clock otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def measure(fn: Callable[[], Any], *, device, warmup: int = 10, reps: int = 50) -> Dict[str, float]:
    """Run fn `warmup` times, then time `reps` calls one by one; returns summarize(times)."""
    timer = _Timer(device)
    for _ in range(warmup):
        fn()
    if timer.cuda:
        torch.cuda.synchronize()
    return summarize([timer(fn) for _ in range(reps)])


def interleaved(fns: Dict[str, Callable[[], Any]], *, device, warmup: int = 3, reps: int = 20) -> Dict[str, Dict[str, float]]:
    """Time several callables round-robin (A B C A B C ...) so machine drift hits all alike."""
    timer = _Timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: summarize(values) for name, values in times.items()}


def peak_memory_mb(fn: Callable[[], Any], *, device) -> float:
    """Peak CUDA memory allocated during one call of fn (MiB); NaN on CPU."""
    if torch.device(device).type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


def device_profile(fn: Callable[[], Any], *, calls: int = 5) -> Dict[str, float]:
    """Device work of one call of fn on a CUDA device, from the CUDA profiler (CUPTI), not from wall time:
    {"kernels": device kernels and memsets/copies launched per call, "device_us": their summed device time per
    call}. A per-call event time includes the host's launch gaps; this does not, so bytes / device_us is the
    kernels' own bandwidth (the roofline comparison), while the event time is what a training loop waits for."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        sync()
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in device_events)
    return {"kernels": len(device_events) / calls, "device_us": total_us / calls}
