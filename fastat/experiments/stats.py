"""Paired comparisons over seeds: the mean difference (method - baseline) with a Student-t confidence interval."""
from __future__ import annotations

import math
from typing import Dict, Sequence


def paired_difference(method: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """d_i = method_i - baseline_i over n paired runs (seeds): mean, sd, and the two-sided `level` interval
    mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) (lo = hi = mean for n = 1), plus the count of runs with d_i < 0."""
    from scipy.stats import t as student_t

    if len(method) != len(baseline) or not method:
        raise ValueError(f"need equally many (>= 1) method and baseline values, got {len(method)} and {len(baseline)}")
    d = [float(a) - float(b) for a, b in zip(method, baseline)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": n, "lower_in": sum(x < 0 for x in d)}


def verdict(diff: Dict[str, float]) -> str:
    """'lower' / 'higher' when the interval excludes 0, else 'no difference' ('1 run' for n = 1)."""
    if diff["n"] < 2:
        return "1 run"
    if diff["hi"] < 0:
        return "lower"
    if diff["lo"] > 0:
        return "higher"
    return "no difference"
