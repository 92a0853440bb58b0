"""Intervals across seeds: the mean of a few per-seed values and its Student t-interval.

At CPU scale a loss gap of ~0.02 is the size of the seed-to-seed spread, so no gap is stated
without its interval. The interval is the two-sided 95% t-interval of the mean,
``mean +- t_{0.975, k-1} * sd / sqrt(k)`` over k seeds (sd with k - 1 in the denominator): with
k = 3 the quantile is 4.30, so three seeds only resolve gaps well above their spread. One seed
gives no interval, and says so.

No scipy here (the analysis package runs on the training install): the quantiles are tabulated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

LEVEL = 0.95
# t_{0.975, df} for df = 1..30 (any statistics table); beyond, 1.96 + 2.5 / df is within 0.002.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
METHOD = "95% Student t-interval of the mean over seeds"
NO_INTERVAL = "1 seed, no interval"


def t_quantile(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean, per-seed values, sd and the 95% t-interval (``ci`` null with one value)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "values": [], "k": 0, "sd": None, "ci": None, "method": "no values"}
    k = len(xs)
    mean = sum(xs) / k
    if k == 1:
        return {"mean": mean, "values": xs, "k": 1, "sd": None, "ci": None, "method": NO_INTERVAL}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (k - 1))
    half = t_quantile(k - 1) * sd / math.sqrt(k)
    return {"mean": mean, "values": xs, "k": k, "sd": sd, "ci": [mean - half, mean + half], "method": METHOD}


def sign(stat: dict[str, Any]) -> int | None:
    """-1 / +1 when the interval lies wholly below / above 0; 0 when it holds 0; None when there
    is no interval (one seed): nothing is decided."""
    if not stat or stat.get("ci") is None:
        return None
    lo, hi = stat["ci"]
    return -1 if hi < 0 else (1 if lo > 0 else 0)


def describe(stat: dict[str, Any], digits: int = 3, fmt: Callable[[float], str] | None = None) -> str:
    """``-0.023 [-0.034, -0.012] (95% t, 3 seeds)`` or ``-0.023 (1 seed, no interval)``; ``fmt``
    formats each number instead of ``digits`` decimals."""
    if not stat or stat.get("mean") is None:
        return "-"
    f = fmt or (lambda v: f"{v:+.{digits}f}")
    if stat.get("ci") is None:
        return f"{f(stat['mean'])} ({NO_INTERVAL})"
    lo, hi = stat["ci"]
    return f"{f(stat['mean'])} [{f(lo)}, {f(hi)}] (95% t, {stat['k']} seeds)"


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Per-seed values with their range, for quantities that are not averaged (gains span orders
    of magnitude across seeds; a t-interval of them would be meaningless)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"values": [], "k": 0, "min": None, "max": None, "median": None}
    s = sorted(xs)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return {"values": xs, "k": len(xs), "min": s[0], "max": s[-1], "median": median}
