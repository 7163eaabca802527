"""fastat experiment digits: data split, corruption, metrics against their floors, and the --quick path end to end
(shrunk further here to fit the test budget)."""
import json
import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")

from fastat.cli import main  # noqa: E402
from fastat.experiments import digits as D  # noqa: E402
from fastat.experiments.image_metrics import ImageMetrics, train_classifier  # noqa: E402


def test_split_corruption_and_metric_floors():
    data = D.load_digits_split("cpu")
    assert data["train_x"].shape == (1437, 64) and data["test_x"].shape == (360, 64)
    assert float(data["train_x"].min()) == -1.0 and float(data["train_x"].max()) == 1.0
    x = data["train_x"][:200]
    noisy = D.corrupt_images(x, 0.2, 0.9, torch.Generator().manual_seed(0))
    changed = (noisy != x).any(1)
    assert int(changed.sum()) == 180 and float((noisy - x)[changed].std()) == pytest.approx(0.2, rel=0.05)
    clf = train_classifier(data["train_x"], data["train_y"], steps=150)
    assert float((clf.logits(data["test_x"]).argmax(1) == data["test_y"]).float().mean()) > 0.85
    metrics = ImageMetrics(clf, data["test_x"], data["train_x"])
    real = metrics(data["train_x"][:360])
    noise = metrics(torch.rand(360, 64) * 2 - 1)
    for key in ("fid", "sw2", "resid"):
        assert real[key] < noise[key], key  # real images beat uniform noise on every metric
    assert real["conf"] > noise["conf"]
    assert metrics.residual(data["train_x"]) < metrics.residual(D.corrupt_images(data["train_x"], 0.2, 1.0,
                                                                                 torch.Generator().manual_seed(1)))


def test_quick_config_and_cuda_config():
    quick = D.DigitsConfig.for_run(True, torch.device("cpu"))
    assert quick.seeds == 1 and quick.steps < D.DigitsConfig().steps
    gpu = D.DigitsConfig.for_run(False, torch.device("cuda"), seeds=3)
    assert gpu.hidden > D.DigitsConfig().hidden and gpu.seeds == 3
    with pytest.raises(ValueError, match="seeds"):
        D.DigitsConfig.for_run(False, torch.device("cpu"), seeds=0)


def test_quick_path_end_to_end_with_two_seeds(tmp_path, monkeypatch, capsys):
    original = D.DigitsConfig.for_run.__func__

    def tiny(cls, quick, device, seeds=None):
        cfg = original(cls, quick, device, seeds)
        assert quick and cfg.seeds == 1  # the real --quick configuration, then shrunk for the test budget
        return replace(cfg, seeds=2, hidden=32, depth=1, embed=16, steps=40, ft_steps=6, n_samples=80, batch=32,
                       sample_steps=(5, 10), noise_levels=(0.2,), timing_reps=1, classifier_steps=60, warmup=5)

    monkeypatch.setattr(D.DigitsConfig, "for_run", classmethod(tiny))
    out = tmp_path / "digits"
    assert main(["experiment", "digits", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Paired comparisons" in printed
    data = json.loads((out / "digits.json").read_text())
    assert data["quick"] and data["finite"] and set(data["results"]) == {"0", "1"}
    rows = data["results"]["0"]
    assert set(rows) == {"clean", "noisy0.2"}
    assert set(rows["clean"]) == {"standard", "standard_eqtime", "p2_adv_s1", "ft_replay", "ft_p1_free", "ft_p1_free_abs"}
    assert set(rows["noisy0.2"]) == {"standard", "standard_eqtime", "p2_adv_s0.1", "p2_adv_s1", "p2_rand_s1"}
    assert set(rows["clean"]["ft_p1_free"]["metrics"]) == {"5", "10"} and set(rows["noisy0.2"]["standard"]["metrics"]) == {"10"}
    assert rows["noisy0.2"]["standard_eqtime"]["train"]["optimizer_steps"] >= 40
    p1 = [c for c in data["comparisons"] if c["claim"] == "P1"]
    p2 = [c for c in data["comparisons"] if c["claim"] == "P2"]
    assert len(p1) == 2 * 2 * 3 and len(p2) == (1 + 3) * 2 * 3
    assert all(c["n"] == 2 and c["lo"] <= c["mean"] <= c["hi"] and math.isfinite(c["mean"]) for c in p1 + p2)
    assert (out / "digits.png").read_bytes()[:4] == b"\x89PNG" and "| P1 | clean | ft_p1_free |" in (out / "digits.md").read_text()
