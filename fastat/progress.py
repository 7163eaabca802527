"""Progress for long commands (demo, experiment, bench): tqdm when installed (the optional ``[demo]`` extra), else
one plain line per task on stderr. Either way the user sees "task k of N", elapsed time and an ETA.

    with Progress(total_units, tasks=N, enabled=True) as bar:
        bar.start_task("clean/standard")   # "task k/N: clean/standard"
        bar.advance(units)                 # work done (e.g. optimizer steps weighted by their cost)
"""
from __future__ import annotations

import sys
import time
from typing import Optional


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Overall progress over `tasks` tasks worth `total` units in all (units only set the ETA's pace)."""

    def __init__(self, total: float, tasks: int, *, enabled: bool = True, stream=None, unit: str = "step",
                 what: str = "model"):
        self.total, self.tasks, self.enabled = max(float(total), 1.0), tasks, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.what = what
        self.done, self.task = 0.0, 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                tty = hasattr(self.stream, "isatty") and self.stream.isatty()
                self.bar = tqdm(total=round(self.total), unit=unit, file=self.stream, dynamic_ncols=True,
                                mininterval=0.5 if tty else 10.0,
                                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def start_task(self, label: str) -> None:
        self.task += 1
        desc = f"{self.what} {self.task}/{self.tasks}: {label}"
        if self.bar is not None:
            self.bar.set_description_str(desc)
        elif self.enabled:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            left = "" if eta != eta else f", about {_fmt(eta)} left"
            print(f"  {desc}  [{_fmt(elapsed)} elapsed{left}]", file=self.stream, flush=True)

    def advance(self, units: float) -> None:
        self.done += units
        if self.bar is not None:
            if self.done > self.bar.total:  # the work was underestimated: grow the total, keep the bar honest
                self.bar.total = round(self.done)
            self.bar.update(round(self.done) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.n < self.bar.total:  # overestimated: finish at 100%
                self.bar.total = self.bar.n
                self.bar.refresh()
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None
