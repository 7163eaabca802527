"""tools/gpu_acceptance.py: the plan's limits and the reporting, on fabricated results (the GPU run itself is not
testable here; `bash tools/gpu_acceptance.sh OUT --dry-run` in CI checks the commands and test selections)."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "tools" / "gpu_acceptance.py")
ga = importlib.util.module_from_spec(spec)
sys.modules["gpu_acceptance"] = ga  # dataclasses look their module up there
spec.loader.exec_module(ga)


def test_plan_fits_nine_minutes_and_eight_files():
    assert sum(s.cap_s for s in ga.STEPS) <= 540
    assert len(ga.OUT_FILES) <= 8 and len(set(ga.OUT_FILES)) == len(ga.OUT_FILES)
    assert ga.STEP_NAMES[0] == "env" and ga.STEP_NAMES[-1] == "big"  # the > 2^31 test last


def test_selection_expressions_follow_pytest_semantics():
    markers = {"gpu", "slow"}
    assert not ga._selected("gpu and not slow", lambda m: m in markers)
    assert ga._selected("gpu", lambda m: m in markers)
    name = "test_gpu_cuda_graph_capture"
    assert not ga._selected(f"not ({ga.CAPTURE_K})", lambda w: w in name)
    assert not ga._selected(ga.CAPTURE_K, lambda w: w in "test_gpu_torch_compile_fullgraph")


def test_verbose_counts_reads_xdist_and_serial_lines():
    text = ("[gw0] [ 10%] PASSED tests/test_a.py::test_x[1]\n[gw1] [ 20%] FAILED tests/test_a.py::test_y\n"
            "tests/test_b.py::test_z SKIPPED (no gpu) [ 30%]\ntests/test_b.py::test_w PASSED [ 40%]\n")
    counts = ga.verbose_counts(text)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 1, 1)
    assert counts["failures"][0][0] == "tests/test_a.py::test_y"


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom">trace</failure></testcase>'
                   '<testcase classname="a" name="skip"><skipped/></testcase></testsuite></testsuites>')
    c = ga.junit_counts(xml)
    assert (c["passed"], c["failed"], c["skipped"]) == (1, 1, 1)
    assert "boom" in c["failures"][0][1]
    assert ga.junit_counts(tmp_path / "missing.xml") == {}


def _op(case, shape_name, provider, ms, numel=128, dtype="float32", **extra):
    return dict(suite="ops", case=case, shape_name=shape_name, provider=provider, median_ms=ms, dtype=dtype,
                numel=numel, pct_of_copy=1.0, shape=shape_name, **extra)


def _step(case, provider, method, ratio, batch=128, mem=100.0, ms=10.0):
    return dict(suite="steps", case=case, provider=provider, method=method, ratio_vs_standard=ratio, batch=batch,
                peak_mem_mb=mem, median_ms=ms)


def test_headline_against_targets():
    rows = [
        _op("chain", "cifar", "eager", 1.2), _op("chain", "cifar", "cuda", 0.05, device_us=20.0),
        _op("chain", "cifar", "triton", 0.08),
        _op("pgd_step_l2", "flat16M", "cuda", 0.1, numel=16 * 2**20, device_pct_of_copy=90.0),
        _op("pgd_step_l2", "flat16M", "triton", 0.1, numel=16 * 2**20, device_pct_of_copy=70.0),
        _step("ddpm_cifar10_unet", "eager", "standard", 1.0, mem=100.0),
        _step("ddpm_cifar10_unet", "fastat", "p2_adversarial", 2.2, mem=120.0),
        _step("ddpm_cifar10_unet", "fastat", "free_p1", 0.98),
        _step("toy_mlp_2d", "fastat+cudagraph", "pgd_k3", 3.0, batch=4096, ms=0.9),
    ]
    h = ga.headline(rows)
    assert h["chain_ms_cifar"]["value"] == 0.05 and h["chain_ms_cifar"]["met"] is True
    assert h["chain_ms_cifar"]["device_ms"] == {"cuda": 0.02}
    assert h["chain_ms_pixel512"]["value"] is None and h["chain_ms_pixel512"]["met"] is None
    assert h["op_pct_of_copy_at_16M"]["value"] == 70.0 and h["op_pct_of_copy_at_16M"]["met"] is False
    assert h["free_p1_ratio"]["met"] is True and h["p2_adversarial_ratio"]["met"] is False
    assert math.isclose(h["p2_adversarial_mem_ratio"]["value"], 1.2) and h["p2_adversarial_mem_ratio"]["met"]
    assert h["toy_pgd_k3_ms"]["value"] == 0.9 and h["toy_pgd_k3_ms"]["met"] is True


def test_outputs_stay_within_the_limits(tmp_path):
    run = ga.Run(out=tmp_path / "out", work=tmp_path, deadline=math.inf)
    run.results["tests"] = {"name": "tests", "cap_s": 120, "status": "failed", "reason": "x", "seconds": 3.0}
    ga.write_outputs(run, {"gpu": "fabricated"}, finished=False)
    written = sorted(p.name for p in run.out.iterdir())
    assert set(written) <= set(ga.OUT_FILES) and all(p.is_file() for p in run.out.iterdir())
    summary = (run.out / "summary.md").read_text()
    assert "| tests | failed |" in summary and "not run" in summary


def test_refuses_unknown_steps_and_stale_output(tmp_path):
    with pytest.raises(SystemExit):
        ga.main([str(tmp_path), "--only", "nonsense"])
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(SystemExit):
        ga.main([str(tmp_path), "--only", "env"])
