"""fastat bench: the runner in quick mode on CPU writes JSON, markdown and PNG with the right rows."""
import json
import sys
import types

import pytest

from fastat.bench.ops import _cases, kernel_backends
from fastat.bench.runner import run
from fastat.cli import main


def test_bench_runner_quick_cpu_writes_json_md_png(tmp_path, monkeypatch):
    # The real step suite (fastat.bench.steps) has its own tests; here a stand-in checks the plumbing.
    fake = types.ModuleType("fastat.bench.steps")
    fake.run_step_benchmarks = lambda device, quick: [{"case": "toy", "provider": "eager", "method": "standard",
                                                      "median_ms": 1.5, "ratio_vs_standard": 1.0}]
    monkeypatch.setitem(sys.modules, "fastat.bench.steps", fake)
    result = run("cpu", quick=True, out_dir=str(tmp_path), suites="ops,steps", log=lambda m: None, threads=1)
    data = json.loads(result["json"].read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["device"] == "cpu" and meta["torch"] and meta["commit"] and meta["copy"]["gbps"] > 0
    assert {"triton", "cuda"} <= set(meta["skipped"]) and "GPU column" in meta["skipped"]["triton"]
    cases = {c.name: c for c in _cases()}
    eager = [r for r in rows if r["suite"] == "ops" and r["provider"] == "eager"]
    assert {r["case"] for r in eager} == set(cases)
    for r in eager:
        assert r["median_ms"] > 0 and r["speedup_vs_eager"] == pytest.approx(1.0)
        assert r["bytes"] == cases[r["case"]].bytes_per_element * r["numel"] * 4
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
    timed, _ = kernel_backends(__import__("torch").device("cpu"))
    for b in timed:  # every CPU backend gets a cell per case: a time or the reason it could not run
        assert {r["case"] for r in rows if r.get("provider") == b} == set(cases)
    md = result["md"].read_text()
    assert "## chain" in md and "skipped `triton`" in md
    assert result["png"].read_bytes()[:4] == b"\x89PNG"
    assert [r for r in rows if r["suite"] == "steps"] == [dict(fake.run_step_benchmarks("cpu", True)[0], suite="steps")]
    assert "## training steps" in md and "| toy | eager | standard | 1.500 | 1.000 |" in md


def test_bench_runner_records_a_failing_step_suite(tmp_path, monkeypatch):
    fake = types.ModuleType("fastat.bench.steps")

    def boom(device, quick):
        raise RuntimeError("kernel exploded")

    fake.run_step_benchmarks = boom
    monkeypatch.setitem(sys.modules, "fastat.bench.steps", fake)
    result = run("cpu", quick=True, out_dir=str(tmp_path), suites="steps", log=lambda m: None)
    assert "kernel exploded" in result["meta"]["skipped"]["steps"] and result["rows"] == []


def test_bench_cli_rejects_unknown_suite(tmp_path, capsys):
    assert main(["bench", "--quick", "--suites", "ops,kernels", "--out", str(tmp_path)]) == 2
    assert "suites must be a non-empty subset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="suites"):
        run("cpu", quick=True, out_dir=str(tmp_path), suites=["kernels"])
