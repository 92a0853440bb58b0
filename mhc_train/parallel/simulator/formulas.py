"""The per-rank bubble formulas of the DualPipe README and the conditions under which the
simulation reproduces them exactly (docs/simulator.md, "Agreement")."""

from __future__ import annotations

import math

from mhc_train.parallel.simulator.engine import Times
from mhc_train.parallel.simulator.schedules import Op, Pair

_PAIR = Pair(Op("F", 0, 0), Op("B", 0, 0))  # a forward paired with a full backward


def formula_bubble(name: str, ranks: int, times: Times) -> float | None:
    """Per-rank bubble of the README table for per-stage times F, B, W, F&B and no comm.

    PP = number of stages of one pipeline: ranks for 1F1B / ZB1P / DualPipe, 2 x ranks for
    DualPipeV (its #devices is PP/2). F&B = the pair time the simulator uses."""
    F, B, W = times.F, times.B, times.W
    FB = times.pair_time(_PAIR)  # the pair time the simulator uses
    if name == "1f1b":
        return (ranks - 1) * (F + B)
    if name == "zb1p":
        return (ranks - 1) * (F + B - 2 * W)
    if name == "dualpipe":
        return (ranks / 2 - 1) * (FB + B - 3 * W)
    if name == "dualpipev":
        return (2 * ranks / 2 - 1) * (FB + B - 3 * W)
    return None


def formula_conditions(name: str, times: Times) -> str:
    """Empty when the README formula is exact in this model, else the assumption it misses
    (found by simulation over a grid of times, docs/simulator.md)."""
    if name == "zb1p" and times.W > min(times.F, times.B - times.W):
        return "formula assumes W <= min(F, B - W)"
    if name in ("dualpipe", "dualpipev"):
        if not math.isclose(times.F, times.B - times.W):
            return "formula assumes F = B - W"
        if times.W > times.F:
            return "formula assumes W <= F"
    return ""
