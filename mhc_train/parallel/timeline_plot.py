"""Timeline PNG of simulated pipeline schedules: one panel per (schedule, overlap mode), one
compute row and one communication row per rank, micro-batch ids written in the bars."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

from mhc_train.parallel.simulator import SCHEDULE_TITLES, SimResult  # noqa: E402

# (dark, light): dark = the rank's first chunk (stage r, direction 0), light = its second chunk
COLOURS = {
    "F": ("#f28e2b", "#fbd0a4"),
    "B": ("#2f9e44", "#a9dfb2"),
    "I": ("#138d90", "#9edcdc"),
    "W": ("#4263eb", "#b7c4f7"),
    "send": ("#9c36b5", "#9c36b5"),
}
NAMES = {
    "F": "F  forward",
    "B": "B  full backward",
    "I": "I  input-grad part of a split backward (B = I + W)",
    "W": "W  weight-grad part (deferred to fill bubbles)",
    "F&B": "F&B overlapped pair (top: F, bottom: B)",
    "send": "send on the rank's link (upper half: to the next rank, lower: to the previous)",
    "blocked": "compute waits for its send (no comm overlap)",
}
COMPUTE_H, COMM_H, GAP = 0.8, 0.4, 0.35


def _row_y(rank: int) -> tuple[float, float]:
    """(compute row centre, comm row centre); rank 0 at the top."""
    top = rank * (COMPUTE_H + COMM_H + GAP)
    return top + COMPUTE_H / 2, top + COMPUTE_H + COMM_H / 2


def _panel_title(r: SimResult) -> str:
    mode = {"off": "no overlap", "fb": "F&B overlap only", "comm": "comm overlap only",
            "on": "F&B + comm overlap"}[r.overlap_label]
    if r.schedule not in ("dualpipe", "dualpipev"):  # no F&B pairs in these schedules
        mode = "comm overlap" if r.overlap_comm else "no overlap"
    return (f"{SCHEDULE_TITLES[r.schedule]}, {r.ranks} ranks, {r.microbatches} micro-batches, "
            f"{mode}, message time {r.message_time:.3g}: step time {r.makespan:.4g}, "
            f"bubble {100 * r.bubble_fraction:.1f}%, exposed comm {r.exposed_comm:.3g}, "
            f"peak activations {max(r.peak_memory)} stage-micro-batches")


def _draw(ax, r: SimResult, xmax: float, px_per_unit: float) -> set[str]:
    used: set[str] = set()
    bars: dict[tuple, list[tuple[float, float]]] = {}  # (y, height, colour, edge) -> xranges

    def bar(x0: float, w: float, y: float, h: float, colour: str, edge: str = "white") -> None:
        bars.setdefault((y, h, colour, edge), []).append((x0, w))

    def label(x0: float, w: float, y: float, text: str, size: float) -> None:
        if text and w * px_per_unit >= 5.5 * len(text) + 2:
            ax.text(x0 + w / 2, y, text, ha="center", va="center", fontsize=size, clip_on=True)

    for iv in r.intervals:
        yc, ym = _row_y(iv.rank)
        w = iv.end - iv.start
        if iv.lane == "compute" and iv.kind == "F&B":
            f_mb, f_ch, b_mb, b_ch = iv.detail
            h = COMPUTE_H / 2
            bar(iv.start, w, yc - h, h, COLOURS["F"][f_ch], "none")
            bar(iv.start, w, yc, h, COLOURS["B"][b_ch], "none")
            bar(iv.start, w, yc - h, COMPUTE_H, "none", "black")
            label(iv.start, w, yc - h / 2, str(f_mb), 6)
            label(iv.start, w, yc + h / 2, str(b_mb), 6)
            used.add("F&B")
        elif iv.lane == "compute":
            bar(iv.start, w, yc - COMPUTE_H / 2, COMPUTE_H, COLOURS[iv.kind][iv.chunk])
            label(iv.start, w, yc, iv.label, 7)
            used.add(iv.kind)
        elif iv.lane == "blocked":
            ax.broken_barh([(iv.start, w)], (yc - COMPUTE_H / 2, COMPUTE_H), facecolors="#eeeeee",
                           edgecolors="#888888", hatch="////", linewidth=0.3)
            used.add("blocked")
        else:  # send: upper half towards the next rank, lower half towards the previous one
            y0 = ym - COMM_H / 2 if iv.detail[0] > iv.rank else ym
            bar(iv.start, w, y0, COMM_H / 2, COLOURS["send"][0])
            used.add("send")
    for (y, h, colour, edge), xr in bars.items():
        ax.broken_barh(xr, (y, h), facecolors=colour, edgecolors=edge,
                       linewidth=0.8 if edge == "black" else 0.4)
    ticks, names = [], []
    for rank in range(r.ranks):
        yc, ym = _row_y(rank)
        ticks += [yc, ym]
        names += [f"rank {rank}", "sends"]
        ax.axhline(ym + COMM_H / 2 + GAP / 2, color="#dddddd", linewidth=0.5)
    ax.set_yticks(ticks, names)
    for t in ax.get_yticklabels()[1::2]:
        t.set_fontsize(6)
        t.set_color("#666666")
    ax.set_ylim(_row_y(r.ranks - 1)[1] + COMM_H / 2 + 0.1, -0.1)
    ax.set_xlim(0, xmax)
    ax.axvline(r.makespan, color="red", linewidth=0.8, linestyle="--")
    ax.set_title(_panel_title(r), fontsize=9, loc="left")
    return used


def _legend_handles(used: set[str], two_chunks: bool) -> list[Patch]:
    handles = []
    for kind in ("F", "B", "I", "W"):
        if kind in used:
            handles.append(Patch(facecolor=COLOURS[kind][0], label=NAMES[kind]))
    if "F&B" in used:
        handles.append(Patch(facecolor=COLOURS["F"][0], edgecolor="black", label=NAMES["F&B"]))
    if "send" in used:
        handles.append(Patch(facecolor=COLOURS["send"][0], label=NAMES["send"]))
    if "blocked" in used:
        handles.append(Patch(facecolor="#eeeeee", edgecolor="#888888", hatch="////",
                             label=NAMES["blocked"]))
    if two_chunks:
        handles.append(Patch(facecolor="#dddddd", label="light shade: the rank's 2nd chunk "
                             "(V: stage 2R-1-r; DualPipe: reverse direction)"))
    handles.append(Patch(facecolor="white", edgecolor="red", linestyle="--",
                         label="red dashed line: step time"))
    return handles


def plot_timelines(results: list[SimResult], path: str | Path, *, dpi: int = 90) -> list[Path]:
    """Write the timelines; a path containing {schedule}/{overlap} gives one file per result.
    Panels of one file share the time axis. Returns the written paths."""
    spath = str(path)
    groups: dict[Path, list[SimResult]] = {}
    for r in results:
        groups.setdefault(Path(spath.format(schedule=r.schedule, overlap=r.overlap_label)),
                          []).append(r)
    written = []
    for out, rs in groups.items():
        xmax = max(r.makespan for r in rs) * 1.01
        heights = [r.ranks * (COMPUTE_H + COMM_H + GAP) * 0.55 for r in rs]
        width, title_in, legend_in = 15.0, 0.5, 0.25 * 3 + 0.55
        height = sum(heights) + title_in * len(rs) + legend_in
        fig, axes = plt.subplots(len(rs), 1, figsize=(width, height), sharex=True,
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        fig.subplots_adjust(left=1.35 / width, right=1 - 0.2 / width, top=1 - title_in / height,
                            bottom=legend_in / height,
                            hspace=title_in / (sum(heights) / len(rs)))
        # pixels per time unit, to decide whether a micro-batch id fits in its bar
        px_per_unit = (width - 1.55) * dpi / xmax
        used: set[str] = set()
        for ax, r in zip(axes[:, 0], rs):
            used |= _draw(ax, r, xmax, px_per_unit)
        axes[-1, 0].set_xlabel("time (units of the input times)")
        two = any(r.schedule not in ("1f1b", "zb1p") for r in rs)
        fig.legend(handles=_legend_handles(used, two), loc="lower center", ncol=3, fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        # a flat-colour chart loses nothing visible in a 128-colour palette, and shrinks 3x
        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=128).save(out, optimize=True)
        written.append(out)
    return written
