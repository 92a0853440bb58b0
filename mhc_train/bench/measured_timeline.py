"""Timeline PNG of measured pipeline steps (``mhc-train-bench-pipeline --png``), in the style of the
simulator's (``mhc_train.parallel.timeline_plot``): one panel per case, per rank a compute row
(F/B/I/W in the simulator's colours, micro-batch ids in the bars, overlapped pairs outlined with
the forward chunk on top and the backward chunk below, blocked waits hatched over them) and a
communication row (all-to-all in flight above, pipeline messages in flight below, the part the
rank was blocked on in red); beside it, the same rows magnified over one overlapped pair."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from mhc_train.parallel.timeline_plot import COLOURS, COMM_H, COMPUTE_H, GAP, _legend_handles, _row_y

import matplotlib.pyplot as plt  # noqa: E402  (after timeline_plot chose the Agg backend)
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

COMM_COLOURS = {"a2a": "#9c36b5", "p2p": "#868e96", "exposed": "#e03131", "blocked": "#e9ecef"}
COMM_NAMES = {
    "a2a": "expert all-to-all in flight (dispatch, combine, split sizes)",
    "p2p": "pipeline send/recv in flight",
    "exposed": "in flight while the rank was blocked on it (exposed)",
    "blocked": "rank blocked waiting for communication (not computing)",
}


@dataclass
class RankRow:
    """One rank of one step; times in seconds from the step's start."""

    label: str
    bars: list  # (kind F/B/I/W, start, end, chunk 0/1, micro-batch or -1, half: full/top/bottom)
    pairs: list  # (start, end) of the overlapped F&B pairs
    blocked: list  # (start, end) waits, merged
    in_flight: dict  # "a2a" / "p2p" -> merged (start, end)
    exposed: dict  # "a2a" / "p2p" -> merged (start, end): in flight while blocked


@dataclass
class Panel:
    title: str
    step_s: float
    rows: list[RankRow]
    zoom: tuple[float, float] | None = None  # a window (seconds) drawn magnified beside the step
    zoom_title: str = ""


def _draw(ax, panel: Panel, px_per_ms: float, title: str) -> set[str]:
    used: set[str] = set()
    bars: dict[tuple, list] = {}  # (y, height, colour, edge, layer) -> [(x, width)] in ms

    def bar(y: float, h: float, colour: str, s: float, e: float, edge: str = "none", layer: float = 1) -> None:
        bars.setdefault((y, h, colour, edge, layer), []).append((s * 1e3, (e - s) * 1e3))

    for rank, row in enumerate(panel.rows):
        yc, ym = _row_y(rank)
        top = yc - COMPUTE_H / 2
        for kind, s, e, chunk, mb, half in row.bars:
            y, h = {"full": (top, COMPUTE_H), "top": (top, COMPUTE_H / 2), "bottom": (yc, COMPUTE_H / 2)}[half]
            bar(y, h, COLOURS[kind][chunk], s, e, "white")
            used.add(kind)
            text = str(mb) if mb >= 0 else ""
            if text and (e - s) * 1e3 * px_per_ms >= 5.5 * len(text) + 2:
                ax.text((s + e) / 2 * 1e3, y + h / 2, text, ha="center", va="center", fontsize=6, clip_on=True,
                        zorder=4)
        for kind, y in (("a2a", ym - COMM_H / 2), ("p2p", ym)):
            for s, e in row.in_flight[kind]:
                bar(y, COMM_H / 2, COMM_COLOURS[kind], s, e)
            for s, e in row.exposed[kind]:
                bar(y, COMM_H / 2, COMM_COLOURS["exposed"], s, e, layer=1.5)
            used |= {kind} if row.in_flight[kind] else set()
            used |= {"exposed"} if row.exposed[kind] else set()
        if row.pairs:
            ax.broken_barh([(s * 1e3, (e - s) * 1e3) for s, e in row.pairs], (top, COMPUTE_H), facecolors="none",
                           edgecolors="black", linewidth=0.7, zorder=3)
            used.add("F&B")
        if row.blocked:
            ax.broken_barh([(s * 1e3, (e - s) * 1e3) for s, e in row.blocked], (top, COMPUTE_H),
                           facecolors=COMM_COLOURS["blocked"], edgecolors="#555555", hatch="////", linewidth=0,
                           zorder=2)
            used.add("blocked")
    for (y, h, colour, edge, layer), xr in bars.items():
        ax.broken_barh(xr, (y, h), facecolors=colour, edgecolors=edge, linewidth=0.3, zorder=layer)
    ticks, names = [], []
    for rank, row in enumerate(panel.rows):
        yc, ym = _row_y(rank)
        ticks += [yc, ym]
        names += [row.label, "comm"]
        ax.axhline(ym + COMM_H / 2 + GAP / 2, color="#dddddd", linewidth=0.5)
    ax.set_yticks(ticks, names)
    for t in ax.get_yticklabels()[1::2]:
        t.set_fontsize(6)
        t.set_color("#666666")
    for t in ax.get_yticklabels()[0::2]:
        t.set_fontsize(8)
    ax.set_ylim(_row_y(len(panel.rows) - 1)[1] + COMM_H / 2 + 0.1, -0.1)
    ax.axvline(panel.step_s * 1e3, color="red", linewidth=0.8, linestyle="--")
    ax.set_title(title, fontsize=9, loc="left")
    return used


def plot_measured(panels: list[Panel], path: str | Path, title: str = "", *, dpi: int = 100) -> Path:
    """Write the panels (one time axis, in ms; the magnified windows each their own) to ``path``."""
    xmax = max(p.step_s for p in panels) * 1e3 * 1.01
    heights = [len(p.rows) * (COMPUTE_H + COMM_H + GAP) * 0.6 for p in panels]
    zoomed = any(p.zoom for p in panels)
    width, title_in, legend_in, left_in = 20.0 if zoomed else 16.0, 0.7, 0.25 * 4 + 0.55, 1.2
    ratios = [2.8, 1] if zoomed else [1]
    suptitle_in = 0.4 if title else 0.0
    height = sum(heights) + title_in * len(panels) + legend_in + suptitle_in
    fig, axes = plt.subplots(len(panels), len(ratios), figsize=(width, height), sharey="row",
                             gridspec_kw={"height_ratios": heights, "width_ratios": ratios}, squeeze=False)
    wspace = 0.4 / ((width - left_in - 0.2) / len(ratios))
    fig.subplots_adjust(left=left_in / width, right=1 - 0.2 / width, top=1 - (title_in + suptitle_in) / height,
                        bottom=legend_in / height, hspace=title_in / (sum(heights) / len(panels)), wspace=wspace)
    if title:
        fig.suptitle(title, fontsize=10, x=left_in / width, ha="left", y=1 - 0.12 / height, va="top")
    full_px = (width - left_in - 0.2) * ratios[0] / sum(ratios) * dpi  # pixels of the full view's axis
    used: set[str] = set()
    for row_axes, panel in zip(axes, panels):
        ax = row_axes[0]
        used |= _draw(ax, panel, full_px / xmax, panel.title)
        ax.set_xlim(0, xmax)
        if zoomed:
            zax = row_axes[1]
            if panel.zoom is None:
                zax.set_visible(False)
                continue
            z0, z1 = (t * 1e3 for t in panel.zoom)
            ax.axvspan(z0, z1, color="#fff3bf", zorder=0)  # where the magnified window lies
            _draw(zax, panel, full_px / ratios[0] / (z1 - z0), panel.zoom_title)
            zax.set_xlim(z0, z1)
            zax.tick_params(labelleft=False)
    axes[-1, 0].set_xlabel("time since the step's start (ms)")
    if zoomed:
        axes[-1, 1].set_xlabel("ms (magnified: yellow window)")
    handles = _legend_handles(used & {"F", "B", "I", "W", "F&B"}, two_chunks=True)
    handles += [Patch(facecolor=COMM_COLOURS["blocked"], edgecolor="#555555", hatch="////",
                      label=COMM_NAMES["blocked"])]
    handles += [Patch(facecolor=COMM_COLOURS[k], label=COMM_NAMES[k]) for k in ("a2a", "p2p", "exposed") if k in used]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)  # a flat-colour chart loses nothing visible in a 128-colour palette
    Image.open(buf).convert("RGB").quantize(colors=128).save(out, optimize=True)
    return out
