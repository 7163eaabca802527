"""The kernels each CUDA host entry point (csrc/cuda/*.cu) launches for given arguments, with their grids and
bytes: a transcription of the host code (launch templates of common.cuh, tiling of indexing.cuh) that the
audit applies to the op calls it records. A GPU run checks it: the profiler's kernel count per call
(fastat bench, `kernels`) must equal the audit's `launches` for the cuda column.

Each launch: {"name": kernel instantiation as `cuda_aot.short_name` prints it, "blocks", "threads",
"read", "write" (bytes), "serial": dependent steps per thread (finalize loops), "streams": tensors the vector
body loads / stores (for the 128-bit check), "vector": whether the 16-byte pack path runs}.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

K_THREADS = 256
K_WARPS = K_THREADS // 32
CPP_TYPES = {"float32": "float", "float16": "Half", "bfloat16": "BFloat16", "float64": "double"}


def _elt(spec) -> int:
    return spec["element_size"]


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
    chunk = max(-(-(batch * d) // target), 1024)
    chunk = min(chunk, d) if d > 0 else 1
    chunks = -(-d // chunk) if d > 0 else 1
    chunk = -(-d // chunks) if d > 0 else 1
    chunk = -(-chunk // pack_) * pack_
    chunks = -(-d // chunk) if d > 0 else 1
    tiles = batch * chunks
    return {"chunk": chunk, "chunks": chunks, "tiles": tiles, "blocks": persistent_blocks(tiles, K_WARPS, sms)}


def _aligned(*specs) -> bool:
    return all(s is None or s["offset_bytes"] % 16 == 0 for s in specs)


def _bytes(spec) -> int:
    return 0 if spec is None else spec["numel"] * spec["element_size"]


def _coefs(args, *names) -> int:
    """Bytes of the per-sample coefficient tensors among `names` (each read once per sample)."""
    return sum(_bytes(_t(args, n)) for n in names)


def _batch_major_ok(*specs) -> bool:
    """common.cuh shares_batch_major_layout: dense, batch outermost, identical strides."""
    present = [s for s in specs if s is not None]
    first = present[0]
    for s in present:
        if s["span_bytes"] != s["numel"] * s["element_size"]:
            return False
        if s["shape"] != first["shape"] or s["stride"] != first["stride"]:
            return False
        if len(s["shape"]) > 0 and s["shape"][0] > 1 and s["stride"][0] != s["numel"] // s["shape"][0]:
            return False
    return True


def _copies(specs, keep: bool) -> List[Dict[str, Any]]:
    """batch_major(t, keep): a .contiguous() copy of every non-contiguous operand when the group does not share a layout."""
    out = []
    if keep:
        return out
    for s in specs:
        if s is None:
            continue
        contiguous = s["stride"] == _contiguous_strides(s["shape"])
        if not contiguous:
            out.append(_launch("copy (at::contiguous)", _bytes(s), _bytes(s), s["numel"], 1, 4))
    return out


def _contiguous_strides(shape) -> List[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return list(reversed(strides))


def _launch(name, read, write, work, vector_pack, elt, sms=132, blocks=None, serial=0, streams=(0, 0), vector=True):
    if blocks is None:
        blocks = persistent_blocks(-(-work // max(vector_pack, 1)), K_THREADS, sms)
    return {"name": name, "blocks": blocks, "threads": K_THREADS, "read": int(read), "write": int(write), "serial": serial,
            "streams": list(streams), "vector": vector}


def _elementwise(functor, n, vec, elt, read, write, streams, sms):
    p = pack(elt) if vec else 1
    return _launch(f"elementwise_kernel<{p}, {functor}>", read, write, n, p, elt, sms, streams=streams, vector=p > 1)


def _reduce_finalize(reduce_functor, fin_functor, k, batch, d, vec, elt, read, write, acc, sms):
    p = pack(elt) if vec else 1
    t = tiling(batch, d, p, sms)
    acc_bytes = 8 if acc == "double" else 4
    partials = t["tiles"] * k * acc_bytes
    reduce_ = _launch(f"tile_reduce_kernel<{p}, {k}, {acc}, {reduce_functor}>", read, write + partials, batch * d, p, elt,
                      sms, blocks=t["blocks"], streams=(0, 0), vector=p > 1)
    finalize = _launch(f"finalize_kernel<{k}, {acc}, {fin_functor}>", partials, 0, batch, 1, 4, sms,
                       blocks=persistent_blocks(batch, K_THREADS, sms), serial=t["chunks"], vector=False)
    return [reduce_, finalize], t


def launches(op: str, args: Dict[str, Any], sms: int = 132) -> List[Dict[str, Any]]:
    """Kernels of one fastat_cuda::<op> call; args: {name: tensor spec | value} as the capture records them."""
    fn = _MODELS.get(op)
    if fn is None:
        raise KeyError(f"no CUDA launch model for {op}")
    return fn(args, sms)


def _t(args, name) -> Optional[Dict[str, Any]]:
    value = args.get(name)
    return value if isinstance(value, dict) and "dtype" in value else None


def _noisy_input(args, sms):
    x0, noise, delta = _t(args, "x0"), _t(args, "noise"), _t(args, "delta")
    seeded = noise is None
    keep = (not seeded) and _batch_major_ok(x0, noise, delta)
    out = _copies([x0, noise, delta], keep)
    elt = _elt(x0)
    n = x0["numel"]
    vec = _aligned(x0, noise, delta)
    reads = 1 + (0 if seeded else 1) + (delta is not None)
    out.append(_elementwise(f"NoisyInputOp<{CPP_TYPES[x0['dtype']]}>", n, vec, elt,
                            reads * n * elt + _coefs(args, "alpha", "sigma"), n * elt, (reads, 1), sms))
    return out


def _gaussian_noise(args, sms):
    like = _t(args, "like")
    dtype = str(args.get("dtype", like["dtype"])).replace("torch.", "")
    elt = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]
    n = like["numel"]
    return [_elementwise(f"GaussianOp<{CPP_TYPES[dtype]}>", n, True, elt, 0, n * elt, (0, 1), sms)]


def _scale_per_sample(args, sms):
    g = _t(args, "grad")
    keep = _batch_major_ok(g)
    out = _copies([g], keep)
    n, elt = g["numel"], _elt(g)
    out.append(_elementwise(f"ScaleOp<{CPP_TYPES[g['dtype']]}>", n, _aligned(g), elt, n * elt + _coefs(args, "coef"), n * elt,
                            (1, 1), sms))
    return out


def _pgd_step(args, sms):
    delta, grad, base = _t(args, "delta"), _t(args, "grad"), _t(args, "base")
    keep = _batch_major_ok(delta, grad, base)
    out = _copies([delta, grad, base], keep)
    elt, n = _elt(delta), delta["numel"]
    batch = delta["shape"][0]
    d = n // batch if batch else 0
    vec = _aligned(delta, grad, base)
    ty = CPP_TYPES[delta["dtype"]]
    acc = "double" if ty == "double" else "float"
    with_base = base is not None
    if args.get("l2"):
        pair, _ = _reduce_finalize(f"L2StatsOp<{ty}>", f"L2CoefFin<{acc}>", 4, batch, d, vec, elt, 2 * n * elt, 0, acc, sms)
        pair[1]["read"] += _coefs(args, "step_size", "radius")
        pair[1]["write"] += 2 * batch * (8 if acc == "double" else 4)  # (cd, cg) per sample, read back by the apply pass
        out += pair
        reads, writes = 2 + with_base, 1 + with_base
        out.append(_elementwise(f"L2ApplyOp<{ty}>", n, vec, elt, reads * n * elt + 2 * batch * (8 if acc == "double" else 4),
                                writes * n * elt, (reads, writes), sms))
    else:
        out.append(_launch("fill (at::zeros)", 0, 4 * max(batch, 1), batch, 1, 4, sms, streams=(0, 1), vector=False))
        reads, writes = 2 + with_base, 1 + with_base
        out.append(_elementwise(f"LinfStepOp<{ty}>", n, vec, elt, reads * n * elt + _coefs(args, "step_size", "radius"),
                                writes * n * elt, (reads, writes), sms))
        # Restore reads one flag per sample per element pack (cached) and moves data only for flagged samples.
        out.append(_elementwise(f"RestoreOp<{ty}>", n, vec, elt, 4 * max(batch, 1), 0, (0, 0), sms))
    return out


def _random_perturbation(args, sms):
    like = _t(args, "like")
    dtype = str(args.get("dtype", like["dtype"])).replace("torch.", "")
    elt = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]
    ty = CPP_TYPES[dtype]
    acc = "double" if ty == "double" else "float"
    n, batch = like["numel"], like["shape"][0]
    d = n // batch if batch else 0
    out = []
    if args.get("l2"):
        pair, _ = _reduce_finalize(f"NormalSumOp<{acc}>", f"BallCoefFin<{acc}>", 1, batch, d, True, elt, 0, 0, acc, sms)
        pair[1]["read"] += _coefs(args, "radius")
        pair[1]["write"] += batch * (8 if acc == "double" else 4)
        out += pair
        coef_reads = batch * (8 if acc == "double" else 4)
    else:
        coef_reads = _coefs(args, "radius")
    out.append(_elementwise(f"RandomApplyOp<{ty}>", n, True, elt, coef_reads, n * elt, (0, 1), sms))
    return out


def _residual_loss(args, sms):
    a, b, c = _t(args, "a"), _t(args, "b"), _t(args, "c")
    seeded = args.get("seed", -1) >= 0
    keep = (not seeded) and _batch_major_ok(a, b, c)
    out = _copies([a, b, c], keep)
    elt, n = _elt(a), a["numel"]
    batch = a["shape"][0]
    d = n // batch if batch else 0
    save = bool(args.get("save_residual"))
    vec = _aligned(a, b, c)
    ty = CPP_TYPES[a["dtype"]]
    acc = "double" if ty == "double" else "float"
    reads = 1 + (b is not None) + (c is not None)
    pair, _ = _reduce_finalize(f"ResidualOp<{ty}, {'true' if c is not None else 'false'}>", f"LossFin<{acc}>", 1, batch, d,
                               vec, elt, reads * n * elt + (_coefs(args, "k") if c is not None else 0), (n * elt if save else 0),
                               acc, sms)
    pair[0]["streams"] = [reads, int(save)]
    pair[1]["write"] = batch * (8 if acc == "double" else 4)
    return out + pair


def _residual_loss_backward(args, sms):
    g, residual = _t(args, "grad_loss"), _t(args, "residual")
    out = []
    if g is not None and (g["span_bytes"] < g["numel"] * g["element_size"] or g["dtype"] not in ("float32", "float64")):
        out.append(_launch("copy (grad_loss .to(acc).contiguous())", g["span_bytes"], g["numel"] * 4, g["numel"], 1, 4, sms,
                           vector=False))
    elt, n = _elt(residual), residual["numel"]
    wanted = sum(bool(args.get(k)) for k in ("need_a", "need_b", "need_c"))
    if wanted:
        coefs = _coefs(args, "grad_loss") + (_coefs(args, "loss") if args.get("metric") == 2 else 0) \
            + (_coefs(args, "k") if args.get("need_c") else 0)
        out.append(_elementwise(f"ResidualGradOp<{CPP_TYPES[residual['dtype']]}>", n, _aligned(residual), elt, n * elt + coefs,
                                wanted * n * elt, (1, wanted), sms))
    return out


_MODELS = {
    "noisy_input": _noisy_input,
    "noisy_input_seeded": _noisy_input,
    "gaussian_noise": _gaussian_noise,
    "scale_per_sample": _scale_per_sample,
    "pgd_step": _pgd_step,
    "random_perturbation": _random_perturbation,
    "residual_loss": _residual_loss,
    "residual_loss_backward": _residual_loss_backward,
}


def numel(shape) -> int:
    return int(math.prod(shape))
