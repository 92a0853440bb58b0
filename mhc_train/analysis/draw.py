"""What every figure shares: the canvas and saving, legend text and colours per run, and the
axis rules that keep a figure honest (clipped points marked, gains on readable scales,
diverging colours centred at 0).

Drawn with matplotlib's object API on the Agg canvas: no display, no pyplot state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from mhc_train.analysis.runs import Run, get

DPI = 100
VARIANT_NAMES = {"baseline": "baseline", "hc": "HC", "mhc": "mHC"}
LINESTYLES = ("-", "--", ":", "-.")


def figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def save(fig, out: Path, pdf: bool) -> list[Path]:
    """PNG (and PDF) through a temporary name, so a reader never sees half a file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for path in [out] + ([out.with_suffix(".pdf")] if pdf else []):
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=DPI)
        tmp.replace(path)
        written.append(path)
    return written


def grid(count: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(count, max_cols)
    return math.ceil(count / cols), cols


# ------------------------------------------------------------------------------- runs


def sort_runs(runs: Sequence[Run]) -> list[Run]:
    order = {"baseline": 0, "hc": 1, "mhc": 2}
    return sorted(runs, key=lambda r: (get(r.config, "model.dim") or 0, order.get(r.variant, 3), r.n,
                                       r.t_max or 0, r.fixed, r.name))


def labels(runs: Sequence[Run], seeds: bool = True, group_of: dict[int, str] | None = None) -> dict[int, str]:
    """Legend text per run: the variant's label, plus what tells apart runs sharing it (the
    settings of its group, ``Grouping.names``; model width, experiment, seed, finally the
    directory)."""
    out = {id(r): r.label() for r in runs}
    extras = [lambda r: (group_of or {}).get(id(r), ""), lambda r: f"dim {get(r.config, 'model.dim')}",
              lambda r: r.experiment]
    if seeds:
        extras += [lambda r: f"seed {get(r.config, 'train.seed')}", lambda r: Path(r.source).name]
    for extra in extras:
        same: dict[str, list[Run]] = {}
        for r in runs:
            same.setdefault(out[id(r)], []).append(r)
        for label, members in same.items():
            if len(members) > 1 and len({extra(m) for m in members}) > 1:
                for m in members:
                    out[id(m)] = f"{label} [{extra(m)}]"
    return out


def colors(runs: Sequence[Run], group_of: dict[int, str] | None = None) -> dict[int, str]:
    """One colour per variant setting (runs differing only in the seed share it); baselines black."""
    by_label = labels(runs, seeds=False, group_of=group_of)
    out, palette = {}, {}
    for r in runs:
        out[id(r)] = "black" if r.is_baseline else palette.setdefault(by_label[id(r)], f"C{len(palette) % 10}")
    return out


def linestyles(runs: Sequence[Run]) -> dict[int, str]:
    """Solid for the first run of a colour, then dashed, dotted, ... (the seeds of one setting)."""
    cols, seen, out = colors(runs), {}, {}
    for r in runs:
        k = seen[cols[id(r)]] = seen.get(cols[id(r)], -1) + 1
        out[id(r)] = LINESTYLES[k % len(LINESTYLES)]
    return out


def fmt(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:.3g}" if a >= 1e5 else f"{v:.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


# ------------------------------------------------------------------------------- axes


def clip_marked(ax, curves: Sequence[tuple[Sequence[float], Sequence[float], str]], lo: float, hi: float,
                signed: bool = True) -> str:
    """Set the y range to [lo, hi] padded, and mark every point of ``curves`` ((xs, ys, colour))
    beyond it with a triangle on the edge: a spike outside the chosen range stays visible.
    Returns what to say of them in the title (how many, the farthest value), "" if none."""
    pad = 0.1 * (hi - lo) + 1e-3
    y0, y1 = lo - pad, hi + pad
    ax.set_ylim(y0, y1)
    clipped: list[tuple[float, float]] = []
    for xs, ys, color in curves:
        for edge_y, marker, beyond in ((y1, "^", lambda y: y > y1), (y0, "v", lambda y: y < y0)):
            pts = [(x, y) for x, y in zip(xs, ys) if beyond(y)]
            if pts:
                ax.plot([x for x, _ in pts], [edge_y] * len(pts), marker, ms=5, color=color, clip_on=False,
                        ls="none", gid="clipped")
                clipped += pts
    if not clipped:
        return ""
    x, y = max(clipped, key=lambda p: abs(p[1]))
    points = f"{len(clipped)} point{'s' if len(clipped) > 1 else ''}"
    return f"▲▼: {points} beyond the axis, farthest {y:{'+' if signed else ''}.3g} at step {x:g}"


def gain_axis(ax, values: Sequence[float]) -> None:
    """Log y when a gain exceeds 10 (HC's thousands), else a linear range fitted to the values
    and 1, so that mHC's 1.0-1.12 spans the panel instead of lying flat on 1."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and max(abs(v) for v in finite) > 10:
        ax.set_yscale("log")
        return
    lo, hi = min(finite + [1.0]), max(finite + [1.0])
    pad = max(0.1 * (hi - lo), 0.01)
    ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def variant_families(runs: Sequence[Run]) -> list[str]:
    """The variants present, in the order baseline, HC, mHC, others."""
    order = {"baseline": 0, "hc": 1, "mhc": 2}
    return sorted({r.variant for r in runs}, key=lambda v: (order.get(v, 3), v))


def diverging(values):
    """Colormap and norm for signed matrices: RdBu_r, white at 0, each side scaled to its own
    extreme, so that -0.3 beside +366 (HC's composites) is still visibly blue; one symmetric
    scale printed such entries white on white. Non-negative matrices: symmetric (reds only)."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    lo, hi = float(np.min(values)), float(np.max(values))
    if lo >= 0 and hi <= 0:
        lo, hi = -1.0, 1.0
    elif lo >= 0:
        lo = -hi
    elif hi <= 0:
        hi = -lo
    return "RdBu_r", TwoSlopeNorm(vmin=lo, vcenter=0.0, vmax=hi)


def text_color(cmap, norm, value: float) -> str:
    """Black or white, whichever reads on the cell's colour."""
    from matplotlib import colormaps

    r, g, b, _ = colormaps[cmap](norm(value))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
