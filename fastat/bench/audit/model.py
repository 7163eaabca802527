"""From recorded launches to bytes, floors and an estimated fraction of the copy roofline.

Time model (an estimate; a GPU run replaces it with measured device time):

    t(call) = sum over launches k of  L + bytes_k / (BW * f_k) + serial_k * T_STEP
              + H2D_US per host-to-device copy + SYNC_US per host read

    L       = LAUNCH_US, the device-side cost of one dependent kernel (launch, ramp-up, tail)
    BW      = COPY_GBPS, the measured device-to-device copy bandwidth of the H200 (the roofline)
    f_k     = memory-level parallelism of launch k (Little's law): bytes the launch keeps in flight over the
              BW * LATENCY_NS bytes the roofline needs, capped at 1; in flight = resident threads x bytes one
              thread moves per loop iteration, at most SM_INFLIGHT_KB per SM; resident threads from the grid,
              the block size and the register count (65536 registers, 2048 threads, 32 blocks per SM). At least
              the launch's share of the SMs (a block streams at least its SM's share of the bandwidth).
    serial  = dependent steps one thread walks (CUDA per-sample finalize: one thread per sample over its chunks)

Floors (FLOOR): each op direction reads each input once and writes each output once, per-sample [B] vectors
included (at D = 2 they weigh as much as the data). For the losses the residual r (fp32) is an output of the
forward and the input of the backward (the kernels store r instead of re-reading a, b, c), so the fwd+bwd floor
is 5 N e + 2 N * 4 for three inputs (3 N e + 2 N * 4 for two); the bench's `bytes` (fastat.bench.ops) count only
the API tensors (5 N e / 3 N e). The chain's floor is the sum of its ops' floors (12 N e + 2 N * 4; the bench's
7 N e counts a fully fused step). `est_pct_of_floor` = floor time / t; `est_pct_of_copy` = bench bytes / BW / t,
the same quantity as the bench's measured `device_pct_of_copy`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

SMS = 132
COPY_GBPS = 3874.0
LAUNCH_US = 2.0
LATENCY_NS = 700.0
SM_INFLIGHT_KB = 32.0
T_STEP_NS = 40.0
H2D_US = 10.0
SYNC_US = 10.0
REGS_PER_SM, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 2048, 32

CONSTANTS = {"sms": SMS, "copy_gbps": COPY_GBPS, "launch_us": LAUNCH_US, "latency_ns": LATENCY_NS,
             "sm_inflight_kb": SM_INFLIGHT_KB, "serial_step_ns": T_STEP_NS, "h2d_us": H2D_US, "host_read_us": SYNC_US}

# Floor of each audited case: (multiple of N * e for the [B, D] data tensors, multiple of N * a for the loss
# residual, fp32 [B] vectors, int64 [B] vectors); e = the data's element size, a = the accumulation dtype's (the
# residual is stored in fp32, fp64 for fp64 data, so each low-precision gradient is rounded once).
#   noisy_input   x0, noise, delta -> x_t; alpha, sigma                        q_sample: timesteps instead
#   pgd_step      delta, grad -> delta' (scalar step and radius in the bench)    random_perturbation: -> delta
#   losses        fwd: inputs -> residual, loss [B] (+ sigma [B] for P1); bwd: residual, grad_loss [B] (+ sigma,
#                 + loss for pseudo-Huber) -> gradients
#   chain         noisy_input + equivariant_mse fwd/bwd + the loss's sum over the batch + pgd_step
FLOOR = {
    "noisy_input": (4, 0, 2, 0), "q_sample": (4, 0, 0, 1), "pgd_step_l2": (3, 0, 0, 0), "pgd_step_linf": (3, 0, 0, 0),
    "random_perturbation": (1, 0, 0, 0), "equivariant_mse": (3 + 2, 2, 4, 0), "equivariance_regularizer": (3 + 2, 2, 2, 0),
    "consistency_distance": (2 + 1, 2, 3, 0), "chain": (4 + (3 + 2) + 3, 2, 2 + 4 + 1, 0),
}
# Launches of a case with one kernel per op direction (the launch-bound floor).
MIN_LAUNCHES = {"noisy_input": 1, "q_sample": 1, "pgd_step_l2": 1, "pgd_step_linf": 1, "random_perturbation": 1,
                "equivariant_mse": 2, "equivariance_regularizer": 2, "consistency_distance": 2, "chain": 4}


def resident_threads(blocks: int, threads: int, registers: Optional[int]) -> int:
    per_sm = THREADS_PER_SM // threads
    if registers:
        per_sm = min(per_sm, REGS_PER_SM // (max(registers, 1) * threads))
    per_sm = max(1, min(per_sm, BLOCKS_PER_SM))
    return min(blocks, per_sm * SMS) * threads


def parallelism(blocks: int, threads: int, registers: Optional[int], bytes_per_thread_iter: float) -> float:
    """f_k of the module docstring."""
    resident = resident_threads(blocks, threads, registers)
    sms_used = min(SMS, blocks)
    inflight = min(resident * bytes_per_thread_iter, sms_used * SM_INFLIGHT_KB * 1024)
    needed = COPY_GBPS * 1e9 * LATENCY_NS * 1e-9
    return max(min(1.0, inflight / needed), sms_used / SMS)


def launch_us(nbytes: int, f: float, serial: int = 0) -> float:
    return LAUNCH_US + nbytes / (COPY_GBPS * 1e3 * f) + serial * T_STEP_NS * 1e-3


def triton_launch(event: Dict[str, Any], compiled: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Bytes (each accessed tensor argument moved once, those of the kernel's `rare` path aside) and estimate of one
    recorded Triton launch."""
    grid = event["grid"]
    blocks = grid[0] * grid[1] * grid[2]
    warps = event["options"].get("num_warps", 4)
    accessed = (compiled or {}).get("per_arg", {})
    read = write = 0
    streams = 0  # bytes per element of the [B, D] tensors the kernel moves
    data_numel = max([a["tensor"]["numel"] for a in event["args"] if "tensor" in a] or [0])
    rare = set(event.get("rare_args", ()))  # touched only on an exceptional path (see tu.KernelSpec)
    for a in event["args"]:
        spec = a.get("tensor")
        if spec is None or a["name"] not in accessed or a["name"] in rare:
            continue
        kinds = accessed[a["name"]]
        if kinds.get("load"):
            read += spec["span_bytes"]
        if kinds.get("store"):
            write += spec["span_bytes"]
        if spec["numel"] == data_numel:
            streams += spec["element_size"] * (bool(kinds.get("load")) + bool(kinds.get("store")))
    block_b = event["constexprs"].get("BLOCK_B", 1)
    block_d = event["constexprs"].get("BLOCK_D", 1)
    per_thread = block_b * block_d / (warps * 32) * max(streams, 1)  # bytes in flight per thread per iteration
    regs = (compiled or {}).get("resources", {}).get("registers")
    f = parallelism(blocks, warps * 32, regs, per_thread)
    return {"kind": "triton", "name": event["kernel"].split(":")[1], "blocks": blocks, "threads": warps * 32,
            "registers": regs, "read": read, "write": write, "parallelism": round(f, 3),
            "est_us": launch_us(read + write, f)}


def cuda_launch(launch: Dict[str, Any], compiled: Dict[str, Dict[str, Any]], elt: int) -> Dict[str, Any]:
    info = compiled.get(launch["name"], {})
    regs = info.get("registers")
    pack = 16 // elt if launch.get("vector") else 1
    streams = sum(launch.get("streams", [1, 0])) or 1
    per_thread = pack * elt * streams
    f = 1.0 if launch["name"].startswith(("copy", "fill")) else parallelism(launch["blocks"], launch["threads"], regs, per_thread)
    return {"kind": "cuda", "name": launch["name"], "blocks": launch["blocks"], "threads": launch["threads"], "registers": regs,
            "read": launch["read"], "write": launch["write"], "serial": launch.get("serial", 0), "parallelism": round(f, 3),
            "streams": launch.get("streams"), "vector": launch.get("vector"),
            "est_us": launch_us(launch["read"] + launch["write"], f, launch.get("serial", 0))}


def torch_launch(event: Dict[str, Any]) -> Dict[str, Any]:
    nbytes = event.get("read", 0) + event.get("write", 0)
    return {"kind": "torch", "name": event["op"], "read": event.get("read", 0), "write": event.get("write", 0),
            "inside": event.get("inside"), "est_us": launch_us(nbytes, 1.0) + (H2D_US if event.get("h2d") else 0.0),
            "h2d": event.get("h2d", 0), "origin": event.get("origin", "fastat")}


def floor_bytes(case: str, numel: int, batch: int, elt: int) -> int:
    data, residual, fp32_vectors, int64_vectors = FLOOR[case]
    acc = 8 if elt == 8 else 4
    return data * numel * elt + residual * numel * acc + batch * (4 * fp32_vectors + 8 * int64_vectors)


def summarize(case: str, numel: int, batch: int, elt: int, bench_multiple: int, launches: List[Dict[str, Any]],
              host_reads: int) -> Dict[str, Any]:
    """Totals of one (case, shape, backend) row. Launches and time count everything the call runs; bytes count
    fastat's work only (not the caller's own ops, e.g. the benchmark's .sum() of a per-sample loss)."""
    moved = sum(l["read"] + l["write"] + l.get("h2d", 0) for l in launches if l.get("origin", "fastat") == "fastat")
    floor = floor_bytes(case, numel, batch, elt)
    bench_bytes = bench_multiple * numel * elt
    t = sum(l["est_us"] for l in launches) + host_reads * SYNC_US
    floor_us = floor / (COPY_GBPS * 1e3)
    launch_floor_us = MIN_LAUNCHES[case] * LAUNCH_US + floor_us
    return {
        "launches": len(launches),
        "launches_by_kind": {k: sum(l["kind"] == k for l in launches) for k in ("triton", "cuda", "torch")},
        "caller_launches": sum(l.get("origin", "fastat") != "fastat" for l in launches),
        "h2d_copies": sum(1 for l in launches if l.get("h2d")),
        "host_reads": host_reads,
        "bytes": moved, "floor_bytes": floor, "bytes_over_floor": round(moved / floor, 3) if floor else None,
        "bench_bytes": bench_bytes,
        "est_us": round(t, 2),
        "est_pct_of_floor": round(100 * floor_us / t, 1) if t else None,
        "est_pct_of_copy": round(100 * bench_bytes / (COPY_GBPS * 1e3) / t, 1) if t else None,
        "launch_bound_pct": round(100 * floor_us / launch_floor_us, 1),
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def prod(shape) -> int:
    return int(math.prod(shape))
