"""fastat.progress: "model k of N" with elapsed time and an ETA, through tqdm or (without it) plain lines."""
import io
import sys

import pytest

from fastat.progress import Progress


def test_plain_lines_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    out = io.StringIO()
    with Progress(100, 2, stream=out) as bar:
        bar.start_task("clean/standard")
        bar.advance(50)
        bar.start_task("clean/ft_p1_free")
        bar.advance(50)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  model 1/2: clean/standard  [0:00 elapsed")
    assert lines[1].startswith("  model 2/2: clean/ft_p1_free") and "left]" in lines[1]


def test_tqdm_bar_counts_units_and_shows_the_task():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    with Progress(10, 3, stream=out, what="run") as bar:
        bar.start_task("a")
        bar.advance(4.4)
        assert bar.bar is not None and bar.bar.n == 4
        bar.advance(5.6)
        assert bar.bar.n == 10
        bar.advance(2)  # more work than announced: the total grows
        assert bar.bar.n == bar.bar.total == 12
    assert "run 1/3: a" in out.getvalue() and bar.bar is None


def test_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(10, 1, stream=out, enabled=False) as bar:
        bar.start_task("x")
        bar.advance(10)
    assert out.getvalue() == ""
