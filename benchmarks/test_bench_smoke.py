"""pytest-benchmark smoke of every op case at tiny sizes (serial, few rounds):

    pytest benchmarks/test_bench_smoke.py -p no:xdist --benchmark-only

Each case runs through the public API on the reference backend and on every CPU/GPU kernel backend this
machine can run; the numbers are a CI smoke, not results (use `fastat bench` for those).
"""
import pytest
import torch

import fastat
from fastat.bench.ops import QUICK_SHAPES, _cases, _setup, kernel_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {c.name: c for c in _cases()}
BACKENDS = ["torch"] + kernel_backends(DEVICE)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape_name", sorted(QUICK_SHAPES))
def test_op_case(benchmark, case, backend, shape_name):
    spec = CASES[case]
    if backend != "torch":
        missing = [op for op in spec.ops if backend not in fastat._dispatch.registered_backends(op)]
        if missing:
            pytest.skip(f"no {backend} kernel for {', '.join(missing)}")
    t = _setup(QUICK_SHAPES[shape_name], DEVICE, torch.float32)

    def call():
        with fastat.use_backend(backend):
            out = spec.public(t)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(o).all() for o in outs)
