"""The kernels each CUDA host entry point (csrc/cuda/*.cu) launches for given arguments, with their grids and
bytes: a transcription of the host code (launch templates of common.cuh, tiling of indexing.cuh, casts and layout
copies of host_common.h) that the audit applies to the op calls it records. tests/test_kernel_audit.py checks the
tiling against the compiled C++; a GPU run checks the rest: the profiler's kernel count per call (fastat bench,
`kernels`) must equal the audit's `launches` for the cuda column.

Each launch: {"name": kernel instantiation as `cuda_aot.short_name` prints it, "blocks", "threads", "read",
"write" (bytes), "serial": dependent steps per thread (thread-per-sample finalize loops), "streams": tensors the
vector body loads / stores (for the 128-bit check), "vector": whether the 16-byte pack path runs}.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

K_THREADS = 256
K_WARPS = K_THREADS // 32
K_MIN_CHUNK = 256  # indexing.cuh kMinChunk
K_BLOCK_FINALIZE_CHUNKS = 32  # common.cuh kBlockFinalizeChunks
K_SWEEP_MAX_D = 1 << 16  # common.cuh kSweepMaxD
K_SWEEP_MIN_BATCH = 32  # common.cuh kSweepMinBatch
K_SWEEP_L2_BYTES = 32 << 20  # common.cuh kSweepL2Bytes
CPP_TYPES = {"float32": "float", "float16": "Half", "bfloat16": "BFloat16", "float64": "double"}
SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
PROMOTE = {frozenset({"bfloat16", "float16"}): "float32"}


def promote(*dtypes: Optional[str]) -> str:
    present = [d for d in dtypes if d is not None]
    out = present[0]
    for d in present[1:]:
        if d == out:
            continue
        pair = frozenset({out, d})
        out = PROMOTE.get(pair) or max(pair, key=lambda x: SIZES[x])
    return out


def pack(dtype_size: int) -> int:
    return max(16 // dtype_size, 1)


def persistent_blocks(work: int, per_block: int, sms: int, waves: int = 8) -> int:
    need = -(-work // per_block)
    return max(1, min(need, sms * waves))


def tiling(batch: int, d: int, pack_: int, sms: int) -> Dict[str, int]:
    """indexing.cuh tiling_for + common.cuh make_tiling."""
    if batch <= 0:
        return {"chunk": 1, "chunks": 1, "tiles": 0, "blocks": 1}
    target = sms * 64
    chunk = max(-(-(batch * d) // target), K_MIN_CHUNK)
    chunk = min(chunk, d) if d > 0 else 1
    chunks = -(-d // chunk) if d > 0 else 1
    chunk = -(-d // chunks) if d > 0 else 1
    chunk = -(-chunk // pack_) * pack_
    chunks = -(-d // chunk) if d > 0 else 1
    tiles = batch * chunks
    return {"chunk": chunk, "chunks": chunks, "tiles": tiles, "blocks": persistent_blocks(tiles, K_WARPS, sms)}


def use_sweep(batch: int, d: int) -> bool:
    """common.cuh use_sweep."""
    return d <= K_SWEEP_MAX_D and (d <= 4096 or batch >= K_SWEEP_MIN_BATCH)


def sweep_group(d: int) -> int:
    return 1 if d <= 16 else (32 if d <= 2048 else K_THREADS)


def _t(args, name) -> Optional[Dict[str, Any]]:
    value = args.get(name)
    return value if isinstance(value, dict) and "dtype" in value else None


def _bytes(spec) -> int:
    return 0 if spec is None else spec["numel"] * spec["element_size"]


def _coefs(args, *names) -> int:
    """Bytes of the per-sample coefficient tensors among `names` (each read once per sample)."""
    return sum(_bytes(_t(args, n)) for n in names)


def _aligned(*specs) -> bool:
    return all(s is None or s["offset_bytes"] % 16 == 0 for s in specs)


def _contiguous(spec) -> bool:
    strides, acc = [], 1
    for size in reversed(spec["shape"]):
        strides.append(acc)
        acc *= max(size, 1)
    return [st for st, sz in zip(spec["stride"], spec["shape"]) if sz != 1] == \
        [st for st, sz in zip(list(reversed(strides)), spec["shape"]) if sz != 1]


def _launch(name, read, write, blocks, serial=0, streams=(0, 0), vector=True) -> Dict[str, Any]:
    return {"name": name, "blocks": int(blocks), "threads": K_THREADS, "read": int(read), "write": int(write),
            "serial": int(serial), "streams": list(streams), "vector": vector}


def _copy(label: str, spec, dtype: str, sms: int) -> Dict[str, Any]:
    n = spec["numel"]
    return _launch(f"copy ({label})", _bytes(spec), n * SIZES[dtype], persistent_blocks(n, K_THREADS, sms), vector=False)


def _cast(spec, dtype: str, name: str, sms: int, out: List) -> Optional[Dict[str, Any]]:
    """host_common.h cast(t, dtype): a copy kernel when the dtype differs. Returns the spec the kernel then reads."""
    if spec is None or spec["dtype"] == dtype:
        return spec
    out.append(_copy(f"{name} .to({dtype})", spec, dtype, sms))
    return dict(spec, dtype=dtype, element_size=SIZES[dtype], stride=_dense_strides(spec["shape"]), offset_bytes=0)


def _dense_strides(shape) -> List[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return list(reversed(strides))


def _layout_copies(specs, logical: bool, sms: int, out: List) -> None:
    """host_common.h work_layout: contiguous operands, or all sharing a batch-outer dense layout, run as they are;
    otherwise every non-contiguous operand is copied."""
    present = [s for s in specs if s is not None]
    if all(_contiguous(s) for s in present):
        return
    first = present[0]
    dense = first["span_bytes"] == first["numel"] * first["element_size"]
    keep = dense and all(s["stride"] == first["stride"] for s in present)
    if logical:
        keep = keep and len(first["shape"]) in (4, 5) and first["stride"][1] == 1
    if not keep:
        out += [_copy("contiguous", s, s["dtype"], sms) for s in present if not _contiguous(s)]


def _elementwise(functor, n, vec, elt, read, write, streams, sms):
    p = pack(elt) if vec else 1
    blocks = persistent_blocks(-(-n // p), K_THREADS, sms)
    return _launch(f"elementwise_kernel<{p}, {functor}>", read, write, blocks, streams=streams, vector=p > 1)


def _reduce_finalize(reduce_functor, fin_functor, k, batch, d, vec, elt, read, write, acc, sms, batch_sum=False):
    """tile_reduce + finalize (or the one-block finalize_reduce of a batch sum)."""
    p = pack(elt) if vec else 1
    t = tiling(batch, d, p, sms)
    acc_bytes = 8 if acc == "double" else 4
    partials = t["tiles"] * k * acc_bytes
    reduce_ = _launch(f"tile_reduce_kernel<{p}, {k}, {acc}, {reduce_functor}>", read, write + partials, t["blocks"],
                      vector=p > 1)
    block_mode = t["chunks"] >= K_BLOCK_FINALIZE_CHUNKS
    if batch_sum:  # one block: a sample at a time by the block, or samples by thread
        serial = batch * (-(-t["chunks"] // K_THREADS)) if block_mode else -(-batch // K_THREADS) * t["chunks"]
        finalize = _launch(f"finalize_reduce_kernel<{k}, {acc}, {fin_functor}>", partials, acc_bytes, 1, serial=serial,
                           vector=False)
    else:
        blocks = persistent_blocks(batch, 1 if block_mode else K_THREADS, sms)
        serial = -(-t["chunks"] // K_THREADS) if block_mode else t["chunks"]
        finalize = _launch(f"finalize_kernel<{k}, {acc}, {fin_functor}>", partials, 0, blocks, serial=serial, vector=False)
    return [reduce_, finalize], t


def _sweep(stats, fin, apply_, k, batch, d, vec, elt, sample_bytes, read, write, streams, acc, sms):
    """common.cuh launch_sweep: one launch, each tensor moved once."""
    p = pack(elt) if vec else 1
    group = sweep_group(d)
    groups = K_THREADS // group
    blocks = persistent_blocks(batch, groups, sms)
    cap = -(-(K_SWEEP_L2_BYTES // max(sample_bytes, 1)) // groups)
    blocks = max(1, min(blocks, cap))
    return _launch(f"sweep_kernel<{p}, {group}, {k}, {acc}, {stats}, {fin}, {apply_}>", read, write, blocks,
                   streams=streams, vector=p > 1)


def launches(op: str, args: Dict[str, Any], sms: int = 132) -> List[Dict[str, Any]]:
    """Kernels of one fastat_cuda::<op> call; args: {name: tensor spec | value} as the capture records them."""
    fn = _MODELS.get(op)
    if fn is None:
        raise KeyError(f"no CUDA launch model for {op}")
    return fn(args, sms)


def _noisy_input(args, sms):
    out: List[Dict[str, Any]] = []
    dtype = str(args["dtype"]).replace("torch.", "")
    x0, noise, delta = _t(args, "x0"), _t(args, "noise"), _t(args, "delta")
    data = x0["dtype"]
    mixed = dtype == "float32" and data in ("bfloat16", "float16") and (noise is None or noise["dtype"] == data) \
        and (delta is None or delta["dtype"] == dtype)
    if not mixed:  # noisy_input.cu: half-precision x0/noise with fp32 delta and output are read as they are
        x0 = _cast(x0, dtype, "x0", sms, out)
        noise = _cast(noise, dtype, "noise", sms, out)
        data = dtype
    delta = _cast(delta, dtype, "delta", sms, out)
    _layout_copies([x0, noise, delta], noise is None, sms, out)
    elt, n = SIZES[dtype], x0["numel"]
    read = n * SIZES[data] * (1 + (noise is not None)) + (n * elt if delta is not None else 0)
    reads = 1 + (noise is not None) + (delta is not None)
    steps = _t(args, "timesteps")
    if steps is None:
        coefs = _coefs(args, "alpha", "sigma")
    else:  # q_sample: Coef reads the [T] tables at timesteps[b] (at most one value per sample from each)
        batch = steps["numel"]
        coefs = _bytes(steps) + sum(min(_bytes(_t(args, c)), batch * _t(args, c)["element_size"])
                                    for c in ("alpha", "sigma") if _t(args, c) is not None)
    out.append(_elementwise(f"NoisyInputOp<{CPP_TYPES[dtype]}, {CPP_TYPES[data]}>", n, _aligned(x0, noise, delta), elt,
                            read + coefs, n * elt, (reads, 1), sms))
    return out


def _noisy_input_backward(args, sms):
    out: List[Dict[str, Any]] = []
    grad = _t(args, "grad")
    _layout_copies([grad], False, sms, out)
    want = [str(args.get(k)).replace("torch.", "") for k in ("x0_dtype", "noise_dtype") if args.get(k) is not None]
    elt, n = grad["element_size"], grad["numel"]
    if want:
        out.append(_elementwise(f"NoisyInputGradOp<{CPP_TYPES[grad['dtype']]}>", n, _aligned(grad), elt,
                                n * elt + _coefs(args, "alpha", "sigma"), len(want) * n * elt, (1, len(want)), sms))
    result = dict(grad)
    for dtype in want:
        if dtype != grad["dtype"]:
            out.append(_copy(f".to({dtype})", result, dtype, sms))
    return out


def _gaussian_noise(args, sms):
    like = _t(args, "like")
    dtype = str(args["dtype"]).replace("torch.", "")
    elt, n = SIZES[dtype], like["numel"]
    return [_elementwise(f"GaussianOp<{CPP_TYPES[dtype]}>", n, True, elt, 0, n * elt, (0, 1), sms)]


def _pgd_step(args, sms):
    out: List[Dict[str, Any]] = []
    delta_in, grad_in, base = _t(args, "delta"), _t(args, "grad"), _t(args, "base")
    work = promote(delta_in["dtype"], grad_in["dtype"])
    delta = _cast(delta_in, work, "delta", sms, out)
    grad = _cast(grad_in, work, "grad", sms, out)
    fused = base is not None and base["dtype"] == work and delta_in["dtype"] == work
    _layout_copies([delta, grad, base if fused else None], False, sms, out)
    elt, n = SIZES[work], delta["numel"]
    batch = delta["shape"][0]
    d = n // batch if batch else 0
    vec = _aligned(delta, grad, base if fused else None)
    ty = CPP_TYPES[work]
    acc = "double" if ty == "double" else "float"
    acc_b = 8 if acc == "double" else 4
    reads, writes = 2 + fused, 1 + fused
    coefs = _coefs(args, "step_size", "radius")
    if n == 0:
        return out
    if use_sweep(batch, d):
        sample_bytes = d * elt * (3 if fused else 2)
        if args.get("l2"):
            out.append(_sweep(f"L2StatsOp<{ty}, 1>", f"L2CoefFin<{acc}>", f"L2ApplyOp<{ty}>", 4, batch, d, vec, elt,
                              sample_bytes, reads * n * elt + coefs, writes * n * elt, (reads, writes), acc, sms))
        else:
            out.append(_sweep(f"NonfiniteCountOp<{ty}>", f"LinfCoefFin<{acc}>", f"LinfStepOp<{ty}>", 1, batch, d, vec, elt,
                              sample_bytes, reads * n * elt + coefs, writes * n * elt, (reads, writes), acc, sms))
    elif args.get("l2"):
        pair, _ = _reduce_finalize(f"L2StatsOp<{ty}, 1>", f"L2CoefFin<{acc}>", 4, batch, d, vec, elt, 2 * n * elt, 0, acc, sms)
        pair[1]["read"] += coefs
        pair[1]["write"] += 2 * batch * acc_b
        out += pair
        out.append(_elementwise(f"L2ApplyOp<{ty}>", n, vec, elt, reads * n * elt + 2 * batch * acc_b, writes * n * elt,
                                (reads, writes), sms))
    else:
        out.append(_launch("fill (at::zeros)", 0, 4 * batch, 1, vector=False))
        out.append(_elementwise(f"LinfStepOp<{ty}>", n, vec, elt, reads * n * elt + coefs, writes * n * elt, (reads, writes), sms))
        # Restore reads one flag per sample and moves data only for flagged samples.
        out.append(_elementwise(f"RestoreOp<{ty}>", n, vec, elt, 4 * batch, 0, (0, 0), sms))
    if delta_in["dtype"] != work:
        out.append(_copy(f"delta' .to({delta_in['dtype']})", dict(delta, dtype=work), delta_in["dtype"], sms))
    if base is not None and not fused:  # base.to(acc).add(new.to(acc)).to(promoted): the reference's rounding
        xdtype = promote(base["dtype"], delta_in["dtype"])
        for label, spec in (("base .to(acc)", base), ("delta' .to(acc)", delta_in)):
            if spec["dtype"] != "float32":
                out.append(_copy(label, spec, "float32", sms))
        out.append(_launch("add", 2 * n * 4, n * 4, persistent_blocks(n, K_THREADS, sms), vector=False))
        if xdtype != "float32":
            out.append(_copy(f"x' .to({xdtype})", dict(base, dtype="float32", element_size=4), xdtype, sms))
    return out


def _random_perturbation(args, sms):
    like = _t(args, "like")
    dtype = str(args["dtype"]).replace("torch.", "")
    elt, ty = SIZES[dtype], CPP_TYPES[dtype]
    acc = "double" if ty == "double" else "float"
    n, batch = like["numel"], like["shape"][0]
    d = n // batch if batch else 0
    out: List[Dict[str, Any]] = []
    if n == 0:
        return out
    if args.get("l2") and use_sweep(batch, d):
        out.append(_sweep(f"NormalSumOp<{acc}, 1>", f"BallCoefFin<{acc}>", f"RandomApplyOp<{ty}>", 1, batch, d, True, elt, 0,
                          _coefs(args, "radius") + 8, n * elt, (0, 1), acc, sms))
        return out
    if args.get("l2"):
        pair, _ = _reduce_finalize(f"NormalSumOp<{acc}, 1>", f"BallCoefFin<{acc}>", 1, batch, d, True, elt, 0, 0, acc, sms)
        pair[1]["read"] += _coefs(args, "radius")
        pair[1]["write"] += batch * (8 if acc == "double" else 4)
        out += pair
        coef_reads = batch * (8 if acc == "double" else 4)
    else:
        coef_reads = _coefs(args, "radius")
    out.append(_elementwise(f"RandomApplyOp<{ty}>", n, True, elt, coef_reads, n * elt, (0, 1), sms))
    return out


def _residual_loss(args, sms):
    out: List[Dict[str, Any]] = []
    a, b, c = _t(args, "a"), _t(args, "b"), _t(args, "c")
    dtype = promote(a["dtype"], b["dtype"] if b else None, c["dtype"] if c else None)
    a, b, c = (_cast(s, dtype, name, sms, out) for s, name in ((a, "a"), (b, "b"), (c, "c")))
    _layout_copies([a, b, c], b is None, sms, out)
    elt, n = SIZES[dtype], a["numel"]
    batch = a["shape"][0]
    d = n // batch if batch else 0
    if batch == 0:
        return out
    save = bool(args.get("save_residual"))
    vec = _aligned(a, b, c)
    ty = CPP_TYPES[dtype]
    acc = "double" if ty == "double" else "float"
    acc_b = 8 if acc == "double" else 4
    reads = 1 + (b is not None) + (c is not None)
    reduction = args.get("reduction", 0)
    pair, _ = _reduce_finalize(f"ResidualOp<{ty}, {'true' if c is not None else 'false'}, 1>", f"LossFin<{acc}>", 1, batch, d,
                               vec, elt, reads * n * elt + (_coefs(args, "sigma") if c is not None else 0),
                               n * acc_b if save else 0, acc, sms, batch_sum=reduction != 0)  # r in the accumulation dtype
    pair[0]["streams"] = [reads, int(save)]
    pair[1]["read"] += _coefs(args, "weight")
    pair[1]["write"] += batch * acc_b * (2 if reduction == 0 else 1)  # per_sample (+ the loss for reduction none)
    return out + pair


def _residual_loss_backward(args, sms):
    out: List[Dict[str, Any]] = []
    g, residual, per_sample = _t(args, "grad_loss"), _t(args, "residual"), _t(args, "per_sample")
    acc = residual["dtype"]  # float32 (float64 for float64 data)
    wanted = [str(args.get(k)).replace("torch.", "") for k in ("a_dtype", "b_dtype", "c_dtype") if args.get(k) is not None]
    n = residual["numel"]
    if n == 0 or not wanted:
        return out
    _layout_copies([residual], False, sms, out)
    # host_common.h gradient_dtype: the gradients' promoted dtype when its accumulation dtype is the residual's
    grad = promote(*wanted)
    grad = grad if (8 if grad == "float64" else 4) == SIZES[acc] else acc
    if g["dtype"] != acc:  # cast(grad_loss, acc); an expanded grad_loss is read in place with its stride
        out.append(_launch("copy (grad_loss .to(acc))", g["span_bytes"], g["numel"] * SIZES[acc], 1, vector=False))
    if per_sample["dtype"] != acc:
        out.append(_copy("per_sample .to(acc)", per_sample, acc, sms))
    coefs = g["span_bytes"] + (_bytes(per_sample) if args.get("metric") == 2 else 0) \
        + (_coefs(args, "sigma") if args.get("c_dtype") is not None else 0) + _coefs(args, "weight")
    out.append(_elementwise(f"ResidualGradOp<{CPP_TYPES[grad]}>", n, _aligned(residual), SIZES[grad],
                            n * SIZES[acc] + coefs, len(wanted) * n * SIZES[grad], (1, len(wanted)), sms))
    for w in wanted:
        if w != grad:
            out.append(_copy(f"gradient .to({w})", dict(residual, dtype=grad, element_size=SIZES[grad]), w, sms))
    return out


_MODELS = {
    "noisy_input": _noisy_input,
    "noisy_input_backward": _noisy_input_backward,
    "gaussian_noise": _gaussian_noise,
    "pgd_step": _pgd_step,
    "random_perturbation": _random_perturbation,
    "residual_loss": _residual_loss,
    "residual_loss_backward": _residual_loss_backward,
}
