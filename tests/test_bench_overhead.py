"""`fastat bench --suites overhead`: the suite runs through the runner on CPU (quick), gives every case a row per
provider with host time and kernel counts, replaces Triton launches through the documented hook only while it
measures, and counts device kernels the way a GPU would launch them."""
import json

import pytest
import torch

import fastat
from fastat import _checks
from fastat.bench import overhead
from fastat.bench.runner import run


def test_overhead_suite_through_the_runner_writes_a_row_per_case_and_provider(tmp_path):
    result = run("cpu", quick=True, out_dir=str(tmp_path), suites="overhead", log=lambda m: None, threads=1)
    assert result["json"].name.endswith("-overhead-quick.json")
    data = json.loads(result["json"].read_text())
    rows = [r for r in data["rows"] if r["suite"] == "overhead"]
    names = data["meta"]["overhead_providers"]
    assert {"eager", "torch", "auto"} <= set(names)
    t = overhead._inputs(overhead.SMALL, torch.device("cpu"))
    assert {(r["case"], r["provider"]) for r in rows} == {(c, n) for c in overhead.cases(t) for n in names}
    for r in rows:
        assert "error" not in r, r
        assert r["shape"] == "8x3x8x8" and r["host_us"] > 0 and r["x_eager"] > 0
        assert r["launches_replaced"] == (r["provider"] == "triton")
        assert (r["kernels"] is None) == (r["provider"] == "cpp")
    eager = {r["case"]: r["kernels"] for r in rows if r["provider"] == "eager"}
    assert eager["noisy_input"] >= 3 and eager["chain"] > 10  # several aten kernels per eager expression
    if "triton" in names:
        triton = {r["case"]: r["kernels"] for r in rows if r["provider"] == "triton"}
        assert triton["noisy_input"] == 1 and triton["pgd_step_linf"] == 1
        assert triton["chain"] < eager["chain"]
    md = result["md"].read_text()
    assert "## host overhead per call" in md and "| chain | 8x3x8x8 |" in md
    # the suite left the process as it found it
    assert fastat.get_backend() == "auto" and _checks._READ_CPU_VALUES


def test_count_kernels_counts_compute_not_views_or_allocation():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert overhead.count_kernels(lambda: (a * b + 1).view(-1).t(), torch.device("cpu")) == 2
    assert overhead.count_kernels(lambda: torch.empty_like(a).unsqueeze(0), torch.device("cpu")) == 0


def test_replace_launch_hook_replaces_triton_launches_and_value_reads_only_inside():
    pytest.importorskip("triton")
    from fastat import _triton_utils

    calls = []
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    half, nan = torch.tensor([0.5, 0.5]), torch.tensor([0.5, float("nan")])
    with fastat.use_backend("triton"):
        with _triton_utils.replace_launch(lambda kernel, grid, args, meta: calls.append(kernel)):
            assert not _checks._READ_CPU_VALUES
            fastat.noisy_input(x0, noise, nan, half)  # values not read (as on a GPU), launch replaced
        assert len(calls) == 1 and _checks._READ_CPU_VALUES
        with pytest.raises(ValueError, match="alpha must be finite"):
            fastat.noisy_input(x0, noise, nan, half)
        out = fastat.noisy_input(x0, noise, half, half)
    torch.testing.assert_close(out, 0.5 * x0 + 0.5 * noise)
    assert len(calls) == 1
