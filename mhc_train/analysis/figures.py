"""The paper's figures from runs, one function per figure. Each writes one PNG (and a PDF
beside it when ``pdf=True``), returns the paths, and raises ``AnalysisError`` when the runs
cannot make it (no baseline, nothing swept, no gains logged).

| function     | paper                | what                                                        |
|--------------|----------------------|-------------------------------------------------------------|
| loss_gap     | Fig 2a / 5a          | EMA training loss minus the baseline's, over steps          |
| grad_norm    | Fig 2b / 5b          | global gradient norm over steps                             |
| gains        | Fig 3 (HC) / 7 (mHC) | Amax gain, single-layer and composite, against layer index  |
| h_res        | Fig 8                | H_res of chosen layers and composites, row / column sums    |
| scaling      | Fig 6                | loss gap and loss ratio against training compute            |
| sweep        | (HC paper Table 1)   | final loss and composite gain against n or t_max            |
| ablation     | Table 1              | loss gap of each fixed / learned mapping combination        |

Drawn with matplotlib's object API on the Agg canvas: no display, no pyplot state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from mhc_train.analysis.runs import AnalysisError, Run, composite_product, ema, get, match_baselines

# The paper's values shown beside ours (docs/reproduction.md has the full comparison).
PAPER_TABLE1 = {("res",): -0.022, ("res", "pre"): -0.025, ("res", "pre", "post"): -0.027}
DPI = 100


# ------------------------------------------------------------------------------------ helpers


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _save(fig, out: Path, pdf: bool) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for path in [out] + ([out.with_suffix(".pdf")] if pdf else []):
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=DPI)
        tmp.replace(path)
        written.append(path)
    return written


def _labels(runs: Sequence[Run], seeds: bool = True) -> dict[int, str]:
    """Legend text per run: the variant's label, plus what tells apart runs sharing it
    (model width, experiment, seed, finally the run name)."""
    out = {id(r): r.label() for r in runs}
    extras = [lambda r: f"dim {get(r.config, 'model.dim')}", lambda r: r.experiment]
    if seeds:
        extras += [lambda r: f"seed {get(r.config, 'train.seed')}", lambda r: r.name]
    for extra in extras:
        groups: dict[str, list[Run]] = {}
        for r in runs:
            groups.setdefault(out[id(r)], []).append(r)
        for label, members in groups.items():
            if len(members) > 1 and len({extra(m) for m in members}) > 1:
                for m in members:
                    out[id(m)] = f"{label} [{extra(m)}]"
    return out


LINESTYLES = ("-", "--", ":", "-.")


def _colors(runs: Sequence[Run]) -> dict[int, str]:
    """One colour per variant setting (runs differing only in the seed share it); baselines black."""
    by_label = _labels(runs, seeds=False)
    out, palette = {}, {}
    for r in runs:
        if r.is_baseline:
            out[id(r)] = "black"
        else:
            out[id(r)] = palette.setdefault(by_label[id(r)], f"C{len(palette) % 10}")
    return out


def _linestyles(runs: Sequence[Run]) -> dict[int, str]:
    """Solid for the first run of a colour, then dashed, dotted, ... (the seeds of one setting)."""
    colors, seen, out = _colors(runs), {}, {}
    for r in runs:
        k = seen[colors[id(r)]] = seen.get(colors[id(r)], -1) + 1
        out[id(r)] = LINESTYLES[k % len(LINESTYLES)]
    return out


def _sort(runs: Sequence[Run]) -> list[Run]:
    order = {"baseline": 0, "hc": 1, "mhc": 2}
    return sorted(runs, key=lambda r: (get(r.config, "model.dim") or 0, order.get(r.variant, 3), r.n,
                                       r.t_max or 0, r.fixed, r.name))


def _fmt(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:.3g}" if a >= 1e5 else f"{v:.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _log_axis_if_spread(ax, values: Sequence[float], threshold: float = 10.0) -> bool:
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if finite and max(finite) > threshold:
        ax.set_yscale("log")
        return True
    return False


# --------------------------------------------------------------------------- Fig 2a / 5a


def loss_gap(runs: Sequence[Run], out: Path, *, ema_alpha: float = 0.9, baseline: Run | None = None,
             pdf: bool = False) -> list[Path]:
    """Absolute training-loss gap of each run to its baseline over steps, both EMA-smoothed
    (paper Fig 5a: mHC and HC against the baseline; Fig 2a plots HC against mHC, which is the
    difference of two of these curves). Dots: the gap of the validation losses."""
    pairs = match_baselines(runs, baseline)
    runs_drawn = _sort([r for r, _ in pairs])
    labels, colors, styles = _labels(runs_drawn), _colors(runs_drawn), _linestyles(runs_drawn)
    base_of = {id(r): b for r, b in pairs}
    fig, axes = _figure(7.5, 4.4)
    ax = axes[0][0]
    lo = hi = 0.0
    for r in runs_drawn:
        b = base_of[id(r)]
        bx, by = b.series("train", "loss")
        rx, ry = r.series("train", "loss")
        bat = dict(zip(bx, ema(by, ema_alpha)))
        rat = dict(zip(rx, ema(ry, ema_alpha)))
        xs = [s for s in rx if s in bat]
        gap = [rat[s] - bat[s] for s in xs]
        ax.plot(xs, gap, lw=1.5, color=colors[id(r)], ls=styles[id(r)], label=labels[id(r)])
        if gap:  # the y range from the last 80% of steps (the first steps' swings hide the rest)
            tail = gap[len(gap) // 5:] or gap
            lo, hi = min(lo, min(tail)), max(hi, max(tail))
        vbx, vby = b.series("val", "val_loss")
        vrx, vry = r.series("val", "val_loss")
        vb = dict(zip(vbx, vby))
        vgap = [(s, v - vb[s]) for s, v in zip(vrx, vry) if s in vb]
        if vgap:
            ax.plot([s for s, _ in vgap], [g for _, g in vgap], "o", ms=4, color=colors[id(r)], alpha=0.7)
            tail = [g for s, g in vgap if s >= (xs[len(xs) // 5] if xs else 0)]
            if tail:
                lo, hi = min(lo, min(tail)), max(hi, max(tail))
    ax.axhline(0.0, color="black", lw=1.0, ls="--", label="baseline (reference)")
    pad = 0.1 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"loss - baseline loss  (EMA {ema_alpha})")
    ax.set_title("Loss gap to the baseline (paper Fig 2a / 5a); below 0 = better than baseline\n"
                 "lines: training loss, dots: validation loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, pdf)


# --------------------------------------------------------------------------- Fig 2b / 5b


def grad_norm(runs: Sequence[Run], out: Path, *, ema_alpha: float = 0.9, pdf: bool = False) -> list[Path]:
    """Global gradient norm (before clipping) of every run over steps: raw (thin) and EMA."""
    runs = _sort(runs)
    labels, colors, styles = _labels(runs), _colors(runs), _linestyles(runs)
    fig, axes = _figure(7.5, 4.4)
    ax = axes[0][0]
    drawn = 0
    for r in runs:
        x, y = r.series("train", "grad_norm")
        if not x:
            continue
        ax.plot(x, y, lw=0.6, alpha=0.3, color=colors[id(r)])
        ax.plot(x, ema(y, ema_alpha), lw=1.5, color=colors[id(r)], ls=styles[id(r)], label=labels[id(r)])
        drawn += 1
    if not drawn:
        raise AnalysisError("no grad_norm in the training records")
    values = sorted(v for r in runs for v in r.series("train", "grad_norm")[1])
    if values and values[-1] > 10 * values[len(values) // 2]:  # spikes: keep the typical level readable
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("global gradient norm (before clipping)")
    ax.set_title(f"Gradient norm (paper Fig 2b / 5b); thin: per step, thick: EMA {ema_alpha}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, pdf)


# ----------------------------------------------------------------------------- Fig 3 / 7


def _gain_runs(runs: Sequence[Run], step: int | None) -> list[tuple[Run, dict[str, Any]]]:
    out = []
    for r in _sort(runs):
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


def gains(runs: Sequence[Run], out: Path, *, step: int | None = None, pdf: bool = False) -> list[Path]:
    """Amax gain magnitude against layer index (paper Fig 3 for HC, Fig 7 for mHC): (a) of each
    single-layer H_res, (b) of the composite products, forward H_l...H_1 (max |row sum|) and
    backward H_L...H_l (max |column sum|). Log y when a gain exceeds 10, as the paper's HC plot."""
    items = _gain_runs(runs, step)
    labels, colors = _labels([r for r, _ in items]), _colors([r for r, _ in items])
    fig, axes = _figure(12.5, 4.6, 1, 2)
    for ax, which in zip(axes[0], ("single", "composite")):
        values = []
        for r, g in items:
            for direction, style, marker in (("forward", "-", "o"), ("backward", "--", "x")):
                ys = [float(v) for v in g[f"{which}_{direction}"]]
                values += ys
                ax.plot(range(1, len(ys) + 1), ys, ls=style, marker=marker, ms=3.5, lw=1.3, color=colors[id(r)],
                        label=labels[id(r)] if direction == "forward" else None)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        if not _log_axis_if_spread(ax, values):
            ax.set_ylim(0, max(2.0, 1.1 * max(values)))
        ax.set_xlabel("layer index l (attention and FFN sublayers in order)")
        ax.set_ylabel("Amax gain magnitude")
        ax.grid(alpha=0.3, which="both")
    from matplotlib.lines import Line2D

    handles, names = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", ls="-", marker="o", ms=3.5),
                Line2D([], [], color="gray", ls="--", marker="x", ms=3.5)]
    names += ["forward gain (max |row sum|)", "backward gain (max |column sum|)"]
    fig.legend(handles, names, loc="outside right center", fontsize=8)
    axes[0][0].set_title("(a) single-layer $H^{res}_l$", fontsize=10)
    axes[0][1].set_title(r"(b) composite: forward $H_l\cdots H_1$, backward $H_L\cdots H_l$", fontsize=10)
    steps = sorted({int(g["step"]) for _, g in items})
    fig.suptitle(f"Amax gain magnitude (paper Fig 3 = HC, Fig 7 = mHC), step {', '.join(map(str, steps))}; "
                 "ideal value 1", fontsize=10)
    return _save(fig, out, pdf)


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
    the right, column sums (backward gain) below. Colours are scaled per matrix (HC's entries
    span orders of magnitude), blue < 0 < red."""
    import numpy as np

    items = [(r, g) for r, g in _gain_runs(runs, step) if g.get("h_res") is not None]
    if not items:
        raise AnalysisError("no H_res in the gains records")
    labels = _labels([r for r, _ in items])
    mats = [(r, g, _matrices(g["h_res"], layers)) for r, g in items]
    cols = max(len(m) for _, _, m in mats)
    n = max(len(g["h_res"][0]) for _, g, _ in mats)
    size = 1.15 + 0.38 * n
    fig, axes = _figure(cols * size + 0.6, len(mats) * (size + 0.55) + 0.5, len(mats), cols)
    for row, (r, g, selection) in enumerate(mats):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(selection):
                ax.axis("off")
                continue
            title, m = selection[col]
            bound = float(np.abs(m).max()) or 1.0
            ax.imshow(m, cmap="RdBu_r", vmin=-bound, vmax=bound)
            k = m.shape[0]
            if k <= 8:
                for (i, j), v in np.ndenumerate(m):
                    ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=6.5 if k <= 4 else 5,
                            color="white" if abs(v) > 0.6 * bound else "black")
            ax.set_xticks(range(k), [_fmt(v) for v in m.sum(axis=0)], fontsize=6.5, rotation=90 if k > 4 else 0)
            ax.set_yticks(range(k), [_fmt(v) for v in m.sum(axis=1)], fontsize=6.5)
            ax.yaxis.tick_right()
            ax.tick_params(length=0)
            ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{labels[id(r)]}\nstep {g['step']}", fontsize=8)
    fig.suptitle("$H^{res}$ averaged over tokens (paper Fig 8). Right ticks: row sums (forward gain); "
                 "bottom ticks: column sums (backward gain)", fontsize=9)
    return _save(fig, out, pdf)


# ---------------------------------------------------------------------------------- Fig 6


def _gap_ratio(r: Run, b: Run, window: float) -> tuple[float, float]:
    """Final-loss gap and ratio (%) of a run to its baseline, over the steps both reached."""
    upto = min(r.steps_done, b.steps_done)
    lr, lb = r.final_loss(window, upto), b.final_loss(window, upto)
    return lr - lb, 100.0 * lr / lb


def complete_runs(runs: Sequence[Run], what: str) -> list[Run]:
    """The runs that reached train.steps; final values of the others would mislead."""
    done = [r for r in runs if r.complete]
    if not done:
        raise AnalysisError(f"{what}: no complete run (every run stopped before train.steps)")
    return done


def scaling(runs: Sequence[Run], out: Path, *, window: float = 0.1, ema_alpha: float = 0.9,
            baseline: Run | None = None, pdf: bool = False) -> list[Path]:
    """Paper Fig 6. (a) compute scaling: the final-loss gap (run - baseline, mean of the last
    ``window`` of training) and the loss ratio (run / baseline, %) at each model size's training
    compute (tokens x training FLOPs per token). (b) token scaling: the same two quantities
    over the training of the largest model, against the compute spent so far."""
    pairs = match_baselines(complete_runs(runs, "scaling"), baseline)
    sizes = {json.dumps(r.config.get("model"), sort_keys=True) for r, _ in pairs}
    if len(sizes) < 2:
        raise AnalysisError("scaling needs runs of at least two model sizes, each with its baseline "
                            "(e.g. mhc-train -m experiment=scaling)")
    by_variant: dict[str, list[tuple[float, float, float, Run]]] = {}
    for r, b in pairs:
        tokens = r.tokens()
        flops = tokens[max(tokens)] * r.flops_per_token() if tokens else math.nan
        gap, ratio = _gap_ratio(r, b, window)
        by_variant.setdefault(r.label(), []).append((flops, gap, ratio, r))
    fig, axes = _figure(12, 4.4, 1, 2)
    ax = axes[0][0]
    ax2 = ax.twinx()
    for i, (label, pts) in enumerate(sorted(by_variant.items())):
        pts.sort(key=lambda p: p[0])
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], "o-", color=f"C{i}", label=f"{label}: loss gap")
        ax2.plot(xs, [p[2] for p in pts], "s--", color=f"C{i}", mfc="none", label=f"{label}: loss ratio")
        for p in pts:
            ax.annotate(f"dim {get(p[3].config, 'model.dim')}\n{(p[3].params or 0) / 1e6:.2f}M",
                        (p[0], p[1]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.2)  # room for the size labels
    ax.axhline(0.0, color="black", lw=0.8, ls=":")
    ax.set_xlabel("training compute (FLOPs = tokens x training FLOPs/token)")
    ax.set_ylabel(f"absolute loss gap to baseline (last {window:.0%} of steps)")
    ax2.set_ylabel("relative loss ratio to baseline (%)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend([ln for ln in lines if not ln.get_label().startswith("_")],
              [ln.get_label() for ln in lines if not ln.get_label().startswith("_")], fontsize=7, loc="best")
    ax.set_title("(a) compute scaling across model sizes", fontsize=10)
    ax.grid(alpha=0.3, which="both")

    ax = axes[0][1]
    ax2 = ax.twinx()
    for i, (label, pts) in enumerate(sorted(by_variant.items())):
        r = max(pts, key=lambda p: p[3].flops_per_token())[3]
        b = next(bb for rr, bb in pairs if rr is r)
        rx, ry = r.series("train", "loss")
        bx, by = b.series("train", "loss")
        bat = dict(zip(bx, ema(by, ema_alpha)))
        rat = dict(zip(rx, ema(ry, ema_alpha)))
        toks = r.tokens()
        start = len(rx) // 5  # the first steps' swings hide the rest
        xs = [s for s in rx[start:] if s in bat and s in toks]
        f = r.flops_per_token()
        ax.plot([toks[s] * f for s in xs], [rat[s] - bat[s] for s in xs], "-", color=f"C{i}",
                label=f"{label}: loss gap")
        ax2.plot([toks[s] * f for s in xs], [100 * rat[s] / bat[s] for s in xs], "--", color=f"C{i}",
                 label=f"{label}: loss ratio")
    ax.axhline(0.0, color="black", lw=0.8, ls=":")
    ax.set_xlabel("training compute so far (FLOPs)")
    ax.set_ylabel(f"absolute loss gap to baseline (EMA {ema_alpha})")
    ax2.set_ylabel("relative loss ratio to baseline (%)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend([ln for ln in lines if not ln.get_label().startswith("_")],
              [ln.get_label() for ln in lines if not ln.get_label().startswith("_")], fontsize=7, loc="best")
    ax.set_title("(b) token scaling of the largest model", fontsize=10)
    ax.grid(alpha=0.3)
    fig.suptitle("Scaling (paper Fig 6): below 0 / below 100% = better than the baseline", fontsize=10)
    return _save(fig, out, pdf)


# ----------------------------------------------------------------------------------- sweeps


SWEEPABLE = {"n": ("expansion rate n", lambda r: r.n, 2), "t_max": ("Sinkhorn iterations t_max", lambda r: r.t_max, 10)}


def swept_parameters(runs: Sequence[Run]) -> list[str]:
    """The knobs (n, t_max) that take two or more values among runs of one variant."""
    out = []
    for key, (_, value, _) in SWEEPABLE.items():
        for variant in ("hc", "mhc"):
            vals = {value(r) for r in runs if r.variant == variant and value(r) is not None}
            if len(vals) >= 2 and key not in out:
                out.append(key)
    return out


def sweep(runs: Sequence[Run], out: Path, *, param: str, window: float = 0.1, pdf: bool = False) -> list[Path]:
    """Sweep summary: (a) final training loss (mean of the last ``window`` of steps) and final
    validation loss against the swept knob, the baseline as horizontal lines; (b) the largest
    composite gain (forward and backward, last gains record) against the knob."""
    if param not in SWEEPABLE:
        raise AnalysisError(f"sweep over {param!r}: only {', '.join(SWEEPABLE)} are summarised")
    title, value, base = SWEEPABLE[param]
    runs = complete_runs(runs, "sweep")
    # One curve per variant and setting of the other knob and the model (runs of a t_max sweep
    # at n = 4 are no points of an n sweep at t_max = 20 unless t_max = 20 is theirs).
    other = "t_max" if param == "n" else "n"
    keyed: dict[tuple, list[Run]] = {}
    for r in runs:
        if not r.is_baseline and value(r) is not None and not r.fixed:
            key = (r.variant, SWEEPABLE[other][1](r), json.dumps(r.config.get("model"), sort_keys=True))
            keyed.setdefault(key, []).append(r)
    keyed = {k: v for k, v in keyed.items() if len({value(r) for r in v}) >= 2}
    groups: dict[str, list[Run]] = {}
    for (variant, other_value, _), members in keyed.items():
        name = {"hc": "HC", "mhc": "mHC"}.get(variant, variant)
        if sum(k[0] == variant for k in keyed) > 1 and other_value is not None:
            name += f" ({other}={other_value})"
        groups.setdefault(name, []).extend(members)
    if not groups:
        raise AnalysisError(f"no sweep over {param}: fewer than two values of it among the runs of one variant")
    fig, axes = _figure(12, 4.4, 1, 2)
    ax, gx = axes[0][0], axes[0][1]
    gain_values: list[float] = []
    seeds = False

    def draw(a, xs, per_value, style, color, label):
        """Mean over the runs of each value (several seeds), bars from min to max."""
        means = [sum(v) / len(v) for v in per_value]
        lo = [m - min(v) for m, v in zip(means, per_value)]
        hi = [max(v) - m for m, v in zip(means, per_value)]
        a.errorbar(xs, means, yerr=[lo, hi] if any(len(v) > 1 for v in per_value) else None, fmt=style,
                   color=color, mfc="none" if "s" in style else color, capsize=3, label=label)

    for i, (name, members) in enumerate(sorted(groups.items())):
        by_value: dict[Any, list[Run]] = {}
        for r in members:
            by_value.setdefault(value(r), []).append(r)
        xs = sorted(by_value)
        seeds = seeds or any(len(v) > 1 for v in by_value.values())
        draw(ax, xs, [[r.final_loss(window) for r in by_value[x]] for x in xs], "o-", f"C{i}",
             f"{name}: training loss (last {window:.0%})")
        vals = [[r.final_val_loss() for r in by_value[x] if math.isfinite(r.final_val_loss())] for x in xs]
        if all(vals):
            draw(ax, xs, vals, "s--", f"C{i}", f"{name}: validation loss")
        for direction, style in (("forward", "o-"), ("backward", "x--")):
            per_value = []
            for x in xs:
                ys = []
                for r in by_value[x]:
                    g = r.gains() if r.n > 1 else None
                    ys.append(max(abs(v) for v in g[f"composite_{direction}"]) if g else 1.0)
                per_value.append(ys)
                gain_values.extend(ys)
            draw(gx, xs, per_value, style, f"C{i}", f"{name}: composite {direction}")
    bases = [r for r in runs if r.is_baseline]
    if bases:  # mean over the baseline runs (seeds); their spread as a band
        for key, ls, what in (("train", "-", "training loss"), ("val", "--", "validation loss")):
            ys = [b.final_loss(window) if key == "train" else b.final_val_loss() for b in bases]
            ys = [y for y in ys if math.isfinite(y)]
            if ys:
                ax.axhline(sum(ys) / len(ys), color="black", lw=1.0, ls=ls,
                           label=f"baseline: {what}" + (f" (mean of {len(ys)})" if len(ys) > 1 else ""))
                if len(ys) > 1:
                    ax.axhspan(min(ys), max(ys), color="black", alpha=0.08)
    for a in (ax, gx):
        a.set_xscale("log", base=base)
        a.set_xlabel(title)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    xs_all = sorted({value(r) for m in groups.values() for r in m})
    for a in (ax, gx):
        a.set_xticks(xs_all, [str(x) for x in xs_all])
        a.minorticks_off()
    ax.set_ylabel("final loss")
    ax.set_title(f"(a) final loss against {param}", fontsize=10)
    gx.axhline(1.0, color="gray", lw=0.8, ls=":")
    if not _log_axis_if_spread(gx, gain_values):
        gx.set_ylim(0, max(2.0, 1.1 * max(gain_values)))
    gx.set_ylabel("max Amax gain of the composite H_res")
    gx.set_title(f"(b) largest composite gain against {param} (ideal 1)", fontsize=10)
    fig.suptitle(f"Sweep over {title}" + ("; mean over seeds, bars: min to max" if seeds else ""), fontsize=10)
    return _save(fig, out, pdf)


def ablation(runs: Sequence[Run], out: Path, *, window: float = 0.1, baseline: Run | None = None,
             pdf: bool = False) -> list[Path]:
    """Table 1 as bars: the final-loss gap to the baseline of each combination of learned (✓)
    and fixed (–) mappings; the paper's gap in the tick label where it has one."""
    pairs = match_baselines(complete_runs(runs, "ablation"), baseline)
    variants = {r.variant for r, _ in pairs}
    if not any(r.fixed for r, _ in pairs):
        raise AnalysisError("no ablation runs (residual.fix_res / fix_pre / fix_post) among the runs")
    rows = []
    for r, b in pairs:
        learned = tuple(m for m in ("res", "pre", "post") if m not in r.fixed)
        gap_train, _ = _gap_ratio(r, b, window)
        upto = min(r.steps_done, b.steps_done)
        gap_val = r.final_val_loss(upto) - b.final_val_loss(upto)
        rows.append((len(learned), learned, r, gap_train, gap_val))
    rows.sort(key=lambda t: (t[2].variant, t[0], t[1]))
    fig, axes = _figure(max(6.0, 1.3 * len(rows) + 2), 4.6)
    ax = axes[0][0]
    xs = list(range(len(rows) + 1))
    ticks = ["baseline\n(all fixed)\npaper 0.0"]
    ax.bar([0], [0.0], color="black", width=0.6)
    for x, (_, learned, r, gt, gv) in zip(xs[1:], rows):
        ax.bar(x - 0.17, gt, width=0.34, color="C0",
               label=f"training loss (last {window:.0%})" if x == 1 else None)
        if math.isfinite(gv):
            ax.bar(x + 0.17, gv, width=0.34, color="C1", label="validation loss" if x == 1 else None)
        marks = " ".join(f"{m}{'✓' if m in learned else '–'}" for m in ("res", "pre", "post"))
        paper = PAPER_TABLE1.get(learned) if r.variant == "hc" else None
        name = {"hc": "HC", "mhc": "mHC"}.get(r.variant, r.variant) if len(variants) > 1 else ""
        ticks.append(f"{name}\n{marks}\n" + (f"paper {paper:+.3f}" if paper is not None else "(not in paper)"))
        ax.annotate(f"{gt:+.3f}", (x - 0.17, gt), textcoords="offset points", xytext=(0, -10 if gt < 0 else 3),
                    ha="center", fontsize=7)
    ax.set_xticks(xs, ticks, fontsize=7.5)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("final loss - baseline final loss")
    ax.set_title("Component ablation (paper Table 1): ✓ learned, – fixed (res: I, pre: 1/n, post: 1)\n"
                 "final-loss gap to the baseline; below 0 = better", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, out, pdf)
