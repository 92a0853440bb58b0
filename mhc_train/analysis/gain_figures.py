"""The gain figures: Amax gains against the layer (paper Figs 3 / 7), the largest composite gain
against the training step, and the H_res maps (Fig 8). Per run, nothing averaged, so every run
with gains is drawn whatever its settings. Each variant gets its own panels: HC's thousands on a
log axis, mHC's 1.0-1.12 on a linear one (one shared log axis flattened mHC onto 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mhc_train.analysis import draw
from mhc_train.analysis.groups import Grouping
from mhc_train.analysis.runs import AnalysisError, Run, composite_product

FORWARD = "forward gain (max |row sum|)"
BACKWARD = "backward gain (max |column sum|)"


def _gain_runs(runs: Sequence[Run], step: int | None) -> list[tuple[Run, dict[str, Any]]]:
    out = []
    for r in draw.sort_runs(runs):
        if r.n <= 1:
            continue
        g = r.gains(step)
        if g is not None and g.get("composite_forward"):
            out.append((r, g))
    if not out:
        at = f" at step {step}" if step is not None else ""
        raise AnalysisError(f"no gains records{at} in runs with n > 1 (the trainer logs them every "
                            "train.gains_every steps)")
    return out


def _labels_colors(runs: Sequence[Run]) -> tuple[dict[int, str], dict[int, str]]:
    """Legend text and colour per run, runs of other settings told apart by them (nothing is
    averaged here, so every run is drawn)."""
    names = Grouping().names(runs)
    return draw.labels(runs, group_of=names), draw.colors(runs, group_of=names)


def _direction_legend(fig, axes, extra_handles=(), extra_names=()) -> None:
    from matplotlib.lines import Line2D

    handles, names = list(extra_handles), list(extra_names)
    for ax in axes:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    handles += [Line2D([], [], color="gray", ls="-", marker="o", ms=3.5),
                Line2D([], [], color="gray", ls="--", marker="x", ms=3.5)]
    names += [FORWARD, BACKWARD]
    fig.legend(handles, names, loc="outside right center", fontsize=8)


# ----------------------------------------------------------------------------- Fig 3 / 7


def gains(runs: Sequence[Run], out: Path, *, step: int | None = None, pdf: bool = False) -> list[Path]:
    """Amax gain magnitude against layer index (paper Fig 3 for HC, Fig 7 for mHC), one row of
    panels per variant: (a) of each single-layer H_res, (b) of the composite products, forward
    H_l...H_1 (max |row sum|) and backward H_L...H_l (max |column sum|)."""
    items = _gain_runs(runs, step)
    families = draw.variant_families([r for r, _ in items])
    labels, colors = _labels_colors([r for r, _ in items])
    fig, axes = draw.figure(12.5, 0.6 + 3.6 * len(families), len(families), 2)
    for row, family in enumerate(families):
        name = draw.VARIANT_NAMES.get(family, family)
        for ax, which in zip(axes[row], ("single", "composite")):
            values = []
            for r, g in items:
                if r.variant != family:
                    continue
                for direction, style, marker in (("forward", "-", "o"), ("backward", "--", "x")):
                    ys = [float(v) for v in g[f"{which}_{direction}"]]
                    values += ys
                    ax.plot(range(1, len(ys) + 1), ys, ls=style, marker=marker, ms=3.5, lw=1.3, color=colors[id(r)],
                            label=labels[id(r)] if direction == "forward" else None)
            ax.axhline(1.0, color="gray", lw=0.8, ls=":")
            draw.gain_axis(ax, values)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("layer index l (attention and FFN sublayers in order)")
            ax.set_ylabel(f"{name}: Amax gain magnitude")
            ax.grid(alpha=0.3, which="both")
        axes[row][0].set_title(f"({chr(97 + 2 * row)}) {name}: single-layer $H^{{res}}_l$", fontsize=10)
        axes[row][1].set_title(rf"({chr(98 + 2 * row)}) {name}: composite, forward $H_l\cdots H_1$, "
                               rf"backward $H_L\cdots H_l$", fontsize=10)
    _direction_legend(fig, axes[:, 0])
    steps = sorted({int(g["step"]) for _, g in items})
    fig.suptitle(f"Amax gain magnitude (paper Fig 3 = HC, Fig 7 = mHC) at step {', '.join(map(str, steps))}; "
                 "ideal value 1 (dotted); each variant on its own scale", fontsize=10)
    return draw.save(fig, out, pdf)


# ------------------------------------------------------------------------ gains over steps


def gains_by_step(runs: Sequence[Run], out: Path, *, pdf: bool = False) -> list[Path]:
    """The largest composite Amax gain (forward and backward, over all layers) of each run at
    every step the trainer logged gains, one panel per variant: how HC's gain grows with
    training while mHC's stays near 1."""
    items = []
    for r in draw.sort_runs(runs):
        if r.n <= 1:
            continue
        points = []
        for s in sorted(set(r.gains_steps())):
            g = r.gains(s)
            if g and g.get("composite_forward"):
                points.append((s, max(map(abs, g["composite_forward"])), max(map(abs, g["composite_backward"]))))
        if points:
            items.append((r, points))
    if not items:
        raise AnalysisError("no gains records in runs with n > 1 (the trainer logs them every train.gains_every steps)")
    if max(len(p) for _, p in items) < 2:
        raise AnalysisError("gains logged at one step only: nothing to draw against the step "
                            "(train.gains_every smaller than train.steps logs more)")
    families = draw.variant_families([r for r, _ in items])
    labels, colors = _labels_colors([r for r, _ in items])
    fig, axes = draw.figure(5.2 * len(families) + 2.8, 4.4, 1, len(families))
    for ax, family in zip(axes[0], families):
        name = draw.VARIANT_NAMES.get(family, family)
        values = []
        for r, points in items:
            if r.variant != family:
                continue
            xs = [p[0] for p in points]
            ax.plot(xs, [p[1] for p in points], "o-", ms=4, lw=1.4, color=colors[id(r)], label=labels[id(r)])
            ax.plot(xs, [p[2] for p in points], "x--", ms=5, lw=1.4, color=colors[id(r)])
            values += [v for p in points for v in p[1:]]
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        draw.gain_axis(ax, values)
        ax.set_xlabel("training step")
        ax.set_ylabel("largest composite Amax gain (over layers)")
        ax.set_title(f"{name}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    _direction_legend(fig, axes[0])
    fig.suptitle("Largest composite Amax gain against the training step (ideal 1, dotted); "
                 "each variant on its own scale", fontsize=10)
    return draw.save(fig, out, pdf)


# ---------------------------------------------------------------------------------- Fig 8


def _matrices(h_res, layers: Sequence[int] | None) -> list[tuple[str, Any]]:
    """The paper's Fig 8 selection for L layers: H_1, H_{L/2}, H_L (or ``layers``), then
    H_{L/2}...H_1, H_L...H_{L/2+1} and H_L...H_1."""
    import numpy as np

    h = np.asarray(h_res, dtype=np.float64)
    n_layers = h.shape[0]
    half = max(1, n_layers // 2)
    singles = list(layers) if layers else sorted({1, half, n_layers})
    out = []
    for layer in singles:
        if not 1 <= layer <= n_layers:
            raise AnalysisError(f"--layers: layer {layer} outside 1..{n_layers}")
        out.append((f"$H^{{res}}_{{{layer}}}$", h[layer - 1]))
    out.append((rf"$\prod_{{i=1}}^{{{half}}} H^{{res}}_{{{half + 1}-i}}$", composite_product(h, 1, half)))
    if n_layers > half:
        out.append((rf"$\prod_{{i=1}}^{{{n_layers - half}}} H^{{res}}_{{{n_layers + 1}-i}}$",
                    composite_product(h, half + 1, n_layers)))
    out.append((rf"$\prod_{{i=1}}^{{{n_layers}}} H^{{res}}_{{{n_layers + 1}-i}}$", composite_product(h, 1, n_layers)))
    return out


def h_res(runs: Sequence[Run], out: Path, *, step: int | None = None, layers: Sequence[int] | None = None,
          pdf: bool = False) -> list[Path]:
    """Token-averaged H_res (paper Fig 8): one row per run, single layers then composites.
    Entries are printed in the cells; the tick labels are the sums: row sums (forward gain) on
    the right, column sums (backward gain) below. Colours are diverging, white at 0 (blue < 0 <
    red), scaled per matrix (HC's entries span orders of magnitude), each with its colorbar."""
    import numpy as np

    items = [(r, g) for r, g in _gain_runs(runs, step) if g.get("h_res") is not None]
    if not items:
        raise AnalysisError("no H_res in the gains records")
    labels, _ = _labels_colors([r for r, _ in items])
    mats = [(r, g, _matrices(g["h_res"], layers)) for r, g in items]
    cols = max(len(m) for _, _, m in mats)
    n = max(len(g["h_res"][0]) for _, g, _ in mats)
    size = 1.15 + 0.38 * n
    fig, axes = draw.figure(cols * (size + 0.75) + 0.6, len(mats) * (size + 0.6) + 0.6, len(mats), cols)
    for row, (r, g, selection) in enumerate(mats):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(selection):
                ax.axis("off")
                continue
            title, m = selection[col]
            cmap, norm = draw.diverging(m)
            image = ax.imshow(m, cmap=cmap, norm=norm)
            fig.colorbar(image, ax=ax, shrink=0.75, pad=0.02, aspect=12).ax.tick_params(labelsize=6)
            k = m.shape[0]
            if k <= 8:
                for (i, j), v in np.ndenumerate(m):
                    ax.text(j, i, draw.fmt(v), ha="center", va="center", fontsize=6.5 if k <= 4 else 5,
                            color=draw.text_color(cmap, norm, v))
            ax.set_xticks(range(k), [draw.fmt(v) for v in m.sum(axis=0)], fontsize=6.5, rotation=90 if k > 4 else 0)
            ax.set_yticks(range(k), [draw.fmt(v) for v in m.sum(axis=1)], fontsize=6.5)
            ax.yaxis.tick_right()
            ax.tick_params(length=0)
            ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{labels[id(r)]}\nstep {g['step']}", fontsize=8)
    fig.suptitle("$H^{res}$ averaged over tokens (paper Fig 8); blue < 0 < red, each matrix on its own colour scale.\n"
                 "Right ticks: row sums (forward gain); bottom ticks: column sums (backward gain)", fontsize=9)
    return draw.save(fig, out, pdf)


# ------------------------------------------------------------ one record (drawn by the trainer)


def plot_h_res(h_res, out: str | Path, *, step: int, title: str = "") -> Path:
    """Token-averaged H_res of every sublayer of one gains record (paper Fig 8, all layers):
    entries, row sums (forward gain) at the right of each matrix, column sums (backward gain)
    below it. One diverging scale for all layers, white at 0 (blue < 0 < red), with its
    colorbar. The trainer draws it at every gains step, beside the run."""
    import math

    import numpy as np

    h = np.asarray(h_res, dtype=float)
    layers, n = h.shape[0], h.shape[-1]
    cols = min(layers, 6 if layers <= 24 else 10)
    rows = math.ceil(layers / cols)
    size = 1.0 + 0.42 * n
    fig, axes = draw.figure(cols * size + 1.2, rows * (size + 0.35) + 0.8, rows, cols)
    cmap, norm = draw.diverging(h)
    image = None
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= layers:
            ax.axis("off")
            continue
        m = h[i]
        image = ax.imshow(m, cmap=cmap, norm=norm)
        ax.set_title(f"layer {i + 1} ({'attn' if i % 2 == 0 else 'ffn'} {i // 2 + 1})", fontsize=8)
        ax.set_xticks(range(n), [f"{c:.2f}" for c in m.sum(axis=0)], fontsize=6, rotation=90 if n > 4 else 0)
        ax.set_yticks(range(n), [f"{r:.2f}" for r in m.sum(axis=1)], fontsize=6)
        ax.yaxis.tick_right()
        ax.tick_params(length=0)
        if n <= 6:  # entries readable in the cells
            for (r, c), v in np.ndenumerate(m):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color=draw.text_color(cmap, norm, v))
    fig.suptitle(f"{title} H_res per layer at step {step}; blue < 0 < red  (right: row sums = forward gain; "
                 f"below: column sums = backward gain)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="H_res entry")
    return draw.save(fig, Path(out), False)[0]


def plot_gains(gains: dict[str, list[float]], out: str | Path, *, step: int, title: str = "") -> Path:
    """Amax gain magnitudes per layer of one gains record (paper Figs 3 / 7): single-layer and
    composite, each panel on the scale of its values (``draw.gain_axis``)."""
    fig, axes = draw.figure(11, 3.8, 1, 2)
    for ax, which in zip(axes[0], ("single", "composite")):
        for direction, color in (("forward", "tab:blue"), ("backward", "tab:orange")):
            values = gains.get(f"{which}_{direction}") or []
            ax.plot(range(1, len(values) + 1), values, "o-", ms=3, color=color,
                    label=FORWARD if direction == "forward" else BACKWARD)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("layer (attention and FFN sublayers, in order)")
        ax.set_ylabel("Amax gain magnitude")
        draw.gain_axis(ax, [v for d in ("forward", "backward") for v in (gains.get(f"{which}_{d}") or [])])
        ax.set_title("single-layer H_res" if which == "single" else "composite product of H_res", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} Amax gains at step {step}", fontsize=10)
    return draw.save(fig, Path(out), False)[0]
