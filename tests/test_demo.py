"""fastat demo: the embedded mixture, corruptions, the model, and a --quick smoke run through the CLI."""
import json
import math

import pytest
import torch

import fastat
from fastat.cli import main
from fastat.demo import run_demo
from fastat.demo.mixture import corrupt, ring_mixture
from fastat.demo.models import MLPDenoiser, sinusoidal_embedding
from fastat.demo.report import summarize_runs
from fastat.demo.train import METHODS


def test_mixture_samples_have_the_mixture_mean_and_corruptions_touch_the_right_share():
    mix = ring_mixture()
    x = mix.sample(20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (mix.weights[:, None] * mix.means).sum(0)
    torch.testing.assert_close(x.mean(0), expected, atol=0.03, rtol=0)
    x = x[:1000]
    g = torch.Generator().manual_seed(1)
    assert torch.equal(corrupt(x, "clean"), x)
    noisy = corrupt(x, "noisy", generator=g)
    assert int((noisy != x).any(dim=1).sum()) == 900
    out = corrupt(x, "outliers", generator=g)
    changed = (out != x).any(dim=1)
    assert int(changed.sum()) == 100 and float(out[changed].abs().max()) <= 4.0
    with pytest.raises(ValueError, match="kind"):
        corrupt(x, "rotated")
    with pytest.raises(ValueError, match="fraction"):
        corrupt(x, "noisy", fraction=1.5)


def test_mlp_denoiser_shapes_and_embedding():
    emb = sinusoidal_embedding(torch.tensor([0, 5, 999]), 7)
    assert emb.shape == (3, 7) and torch.equal(emb[0, :3], torch.ones(3))
    model = MLPDenoiser(dim=2, hidden=16, depth=2)
    out = model(torch.randn(5, 2), torch.randint(0, 1000, (5,)))
    assert out.shape == (5, 2)
    assert model(torch.randn(4, 2), torch.tensor([3])).shape == (4, 2)


def test_run_demo_rejects_unknown_methods_and_settings(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        run_demo(methods="standard,fgsm", quick=True, out=str(tmp_path))
    with pytest.raises(ValueError, match="settings"):
        run_demo(settings=["dirty"], quick=True, out=str(tmp_path))
    assert main(["demo", "--quick", "--methods", "fgsm", "--out", str(tmp_path)]) == 2


def test_demo_quick_smoke_writes_files_with_finite_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    with fastat.use_backend("torch"):
        rc = main(["demo", "--quick", "--out", str(out), "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "setting: noisy" in printed and "p2_adversarial" in printed
    data = json.loads((out / "demo.json").read_text())
    assert set(data["results"]) == {"clean", "noisy", "outliers"}
    assert (out / "demo.png").stat().st_size > 10000 and (out / "demo.md").read_text().count("| standard |") == 3

    def leaves(d):
        for v in d.values():
            if isinstance(v, dict):
                yield from leaves(v)
            elif isinstance(v, list):
                yield from (x for x in v if not isinstance(x, (dict, list)))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield v

    for setting, rows in data["results"].items():
        assert set(rows) == set(METHODS) | {"exact"}, setting
        for method, row in rows.items():
            values = list(leaves(row))
            assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (setting, method)
            assert set(row["few_step"]) == {"5", "10", "20"}
            if method != "exact":
                assert row["time"]["ms_per_step"] > 0 and row["train"]["optimizer_steps"] >= 40
    assert data["claims"] and all(isinstance(c["holds"], bool) for c in data["claims"].values())
    summary = summarize_runs([str(out / "demo.json")] * 2)
    assert summary.count("| p2_adversarial |") == 3 and "| P2 noisy p2_random: err_clean below standard |" in summary
