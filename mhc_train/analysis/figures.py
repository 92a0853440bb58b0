"""The paper's loss figures from runs, one function per figure. Each writes one PNG (and a PDF
beside it when ``pdf=True``), returns the paths, and raises ``AnalysisError`` when the runs
cannot make it (no baseline, nothing swept). Averages and differences are taken within a group
of comparable runs only (``groups.py``); several groups are drawn side by side, and a run that
has no partner in its group is set aside (``Grouping`` collects the warnings).

| function     | paper                | what                                                        |
|--------------|----------------------|-------------------------------------------------------------|
| loss_gap     | Fig 2a / 5a          | EMA training loss minus the baseline's, over steps          |
| grad_norm    | Fig 2b / 5b          | global gradient norm over steps                             |
| scaling      | Fig 6                | loss gap and loss ratio against training compute            |
| sweep        | (HC paper Table 1)   | final loss and composite gain against n or t_max            |
| ablation     | Table 1              | loss gap of each fixed / learned mapping combination        |

The gain figures (Figs 3 / 7, gains over steps, Fig 8) are in ``gain_figures.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from mhc_train.analysis import draw, stats
from mhc_train.analysis.groups import Grouping
from mhc_train.analysis.runs import AnalysisError, Run, ema, get

# The paper's values shown beside ours (docs/reproduction.md has the full comparison).
PAPER_TABLE1 = {("res",): -0.022, ("res", "pre"): -0.025, ("res", "pre", "post"): -0.027}


def complete_runs(runs: Sequence[Run]) -> list[Run]:
    """The runs that reached train.steps; final values of the others would mislead."""
    done = [r for r in runs if r.complete]
    if not done:
        raise AnalysisError("no complete run (every run stopped before train.steps)")
    return done


# --------------------------------------------------------------------------- Fig 2a / 5a


def _gap_curve(r: Run, b: Run, ema_alpha: float) -> dict[int, float]:
    """EMA training loss of ``r`` minus its baseline's, by step (the steps both logged)."""
    bx, by = b.series("train", "loss")
    rx, ry = r.series("train", "loss")
    bat = dict(zip(bx, ema(by, ema_alpha)))
    return {s: v - bat[s] for s, v in zip(rx, ema(ry, ema_alpha)) if s in bat}


def _val_gap(r: Run, b: Run) -> dict[int, float]:
    vb = dict(zip(*b.series("val", "val_loss")))
    return {s: v - vb[s] for s, v in zip(*r.series("val", "val_loss")) if s in vb}


def _seed_mean(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps all seeds logged, the mean over seeds, and the 95% t-band (the mean itself with one seed)."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    mean, lo, hi = [], [], []
    for s in steps:
        st = stats.interval([c[s] for c in curves])
        mean.append(st["mean"])
        lo.append(st["ci"][0] if st["ci"] else st["mean"])
        hi.append(st["ci"][1] if st["ci"] else st["mean"])
    return steps, mean, lo, hi


def final_gap(pairs: Sequence[tuple[Run, Run]], window: float = 0.1) -> dict:
    """The final-loss gap of one setting over its seeds (each run minus its own baseline, over
    the steps both reached) with its 95% t-interval (``stats.interval``)."""
    gaps = []
    for r, b in pairs:
        upto = min(r.steps_done, b.steps_done)
        gaps.append(r.final_loss(window, upto) - b.final_loss(window, upto))
    return stats.interval(gaps)


def loss_gap(runs: Sequence[Run], out: Path, *, ema_alpha: float = 0.9, baseline: Run | None = None,
             grouping: Grouping | None = None, pdf: bool = False, window: float = 0.1) -> list[Path]:
    """Absolute training-loss gap of each run to its baseline over steps, both EMA-smoothed
    (paper Fig 5a: mHC and HC against the baseline; Fig 2a plots HC against mHC, which is the
    difference of two of these curves). Dots: the gap of the validation losses. One panel per
    group of comparable runs. Seeds of one setting (each against the baseline of its own seed)
    are drawn as their mean, a 95% t-band across seeds and each seed thin; the legend states the
    final gap (last ``window`` of the steps) with its interval, or "1 seed, no interval". The y
    range fits the last 80% of the steps (the first steps' swings would hide the rest); points
    beyond it are marked on the edge."""
    grouping = grouping or Grouping()
    pairs = grouping.baselines(runs, baseline, figure="loss_gap")
    drawn = list({id(r): r for pair in pairs for r in pair}.values())
    groups = [g for g in grouping.groups(drawn) if any(not r.is_baseline for r in g)]
    base_of = {id(r): b for r, b in pairs}
    rows, cols = draw.grid(len(groups), 2)
    fig, axes = draw.figure(7.5 * cols, 4.6 * rows + 0.4, rows, cols)
    for i, group in enumerate(groups):
        ax = axes[i // cols][i % cols]
        members = draw.sort_runs([r for r in group if id(r) in base_of])
        colors = draw.colors(members)
        setting_of = draw.labels(members, seeds=False)
        by_setting: dict[str, list[Run]] = {}
        for r in members:
            by_setting.setdefault(setting_of[id(r)], []).append(r)
        curves, lo, hi = [], 0.0, 0.0
        for label, runs_of in by_setting.items():
            color = colors[id(runs_of[0])]
            # A run that stopped early (diverged, or still running) is drawn thin up to where it
            # ended, an x there, and left out of the mean, the band and the final gap: averaging
            # it in would end the mean at its last step.
            seeds = [r for r in runs_of if r.complete] or runs_of
            ended = [r for r in runs_of if r not in seeds]
            final = final_gap([(r, base_of[id(r)]) for r in seeds], window)
            xs, mean, band_lo, band_hi = _seed_mean([_gap_curve(r, base_of[id(r)], ema_alpha) for r in seeds])
            for r in runs_of if len(runs_of) > 1 else ():
                c = _gap_curve(r, base_of[id(r)], ema_alpha)
                ax.plot(list(c), list(c.values()), lw=0.6, alpha=0.35, color=color)
                if r in ended and c:
                    ax.plot([max(c)], [c[max(c)]], "x", ms=7, mew=2, color=color)
                    curves.append(([max(c)], [c[max(c)]], color))
            if len(seeds) > 1:
                ax.fill_between(xs, band_lo, band_hi, color=color, alpha=0.18, lw=0)
            stopped = "".join(f"; seed {get(r.config, 'train.seed')} ended at step {r.steps_done} (x)" for r in ended)
            ax.plot(xs, mean, lw=1.6, color=color,
                    label=f"{label}: final gap {stats.describe(final)}{stopped}")
            curves.append((xs, mean, color))
            start = xs[len(xs) // 5] if xs else 0
            tail = [v for s, a, b in zip(xs, band_lo, band_hi) if s >= start for v in (a, b)]
            vx, vmean, _, _ = _seed_mean([_val_gap(r, base_of[id(r)]) for r in seeds])
            if vx:
                ax.plot(vx, vmean, "o", ms=4, color=color, alpha=0.7)
                curves.append((vx, vmean, color))
                tail += [g for s, g in zip(vx, vmean) if s >= start]
            if tail:
                lo, hi = min(lo, min(tail)), max(hi, max(tail))
        ax.axhline(0.0, color="black", lw=1.0, ls="--", label="baseline (reference)")
        clipped = draw.clip_marked(ax, curves, lo, hi)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"loss - baseline loss  (EMA {ema_alpha})")
        name = grouping.describe(group, drawn)
        k = max(len(v) for v in by_setting.values())
        what = (f"thick: mean of {k} seeds (each minus the baseline of its seed), thin: each seed,\n"
                f"band: {stats.METHOD}" if k > 1 else "one seed per setting")
        ax.set_title((f"runs with {name}\n" if name else "") + "lines: training loss, dots: validation loss; "
                     + f"{what}" + (f"\n{clipped}" if clipped else ""), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    for j in range(len(groups), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("Loss gap to the baseline of the same settings (paper Fig 2a / 5a)\nbelow 0 = better than "
                 f"baseline; final gap = mean over the last {window:.0%} of the steps", fontsize=10)
    return draw.save(fig, out, pdf)


# --------------------------------------------------------------------------- Fig 2b / 5b


def grad_norm(runs: Sequence[Run], out: Path, *, ema_alpha: float = 0.9, grouping: Grouping | None = None,
              pdf: bool = False) -> list[Path]:
    """Global gradient norm (before clipping) of every run over steps: raw (thin) and EMA.
    Nothing is averaged, so every run is drawn; runs of other settings are labelled by them."""
    grouping = grouping or Grouping()
    runs = draw.sort_runs(runs)
    names = grouping.names(runs)
    labels, colors, styles = draw.labels(runs, group_of=names), draw.colors(runs, names), draw.linestyles(runs)
    fig, axes = draw.figure(7.5, 4.4)
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
    return draw.save(fig, out, pdf)


# ---------------------------------------------------------------------------------- Fig 6


def _gap_ratio(r: Run, b: Run, window: float) -> tuple[float, float]:
    """Final-loss gap and ratio (%) of a run to its baseline, over the steps both reached."""
    upto = min(r.steps_done, b.steps_done)
    lr, lb = r.final_loss(window, upto), b.final_loss(window, upto)
    return lr - lb, 100.0 * lr / lb


def _twin_legend(ax, ax2) -> None:
    lines = [ln for ln in ax.get_lines() + ax2.get_lines() if not ln.get_label().startswith("_")]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="best")


def scaling(runs: Sequence[Run], out: Path, *, window: float = 0.1, ema_alpha: float = 0.9,
            baseline: Run | None = None, grouping: Grouping | None = None, pdf: bool = False) -> list[Path]:
    """Paper Fig 6. (a) compute scaling: the final-loss gap (run - baseline of its own model
    size, mean of the last ``window`` of training) and the loss ratio (run / baseline, %) at each
    model size's training compute (tokens x training FLOPs per token). (b) token scaling: the
    same two quantities over the training of the largest model, against the compute so far."""
    grouping = grouping or Grouping()
    pairs = grouping.baselines(complete_runs(runs), baseline, figure="scaling")
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
    fig, axes = draw.figure(12, 4.4, 1, 2)
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
    _twin_legend(ax, ax2)
    ax.set_title("(a) compute scaling across model sizes", fontsize=10)
    ax.grid(alpha=0.3, which="both")

    ax = axes[0][1]
    ax2 = ax.twinx()
    for i, (label, pts) in enumerate(sorted(by_variant.items())):
        r = max(pts, key=lambda p: p[3].flops_per_token())[3]
        b = next(bb for rr, bb in pairs if rr is r)
        rx, ry = r.series("train", "loss")
        bx, by = b.series("train", "loss")
        bat, rat = dict(zip(bx, ema(by, ema_alpha))), dict(zip(rx, ema(ry, ema_alpha)))
        toks = r.tokens()
        start = len(rx) // 5  # the first steps' swings hide the rest (said in the title)
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
    _twin_legend(ax, ax2)
    ax.set_title("(b) token scaling of the largest model (from 20% of its steps on)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.suptitle("Scaling (paper Fig 6): below 0 / below 100% = better than the baseline", fontsize=10)
    return draw.save(fig, out, pdf)


# ----------------------------------------------------------------------------------- sweeps


SWEEPABLE = {"n": ("expansion rate n", lambda r: r.n, 2), "t_max": ("Sinkhorn iterations t_max", lambda r: r.t_max, 10)}


def _sweep_curves(group: Sequence[Run], param: str) -> dict[str, list[Run]]:
    """One curve per variant and value of the other knob (runs of a t_max sweep at n = 4 are no
    points of an n sweep at t_max = 20 unless t_max = 20 is theirs), each with two or more
    values of ``param``; the runs of one value (seeds) are averaged."""
    value = SWEEPABLE[param][1]
    other = "t_max" if param == "n" else "n"
    keyed: dict[tuple, list[Run]] = {}
    for r in group:
        if not r.is_baseline and value(r) is not None and not r.fixed:
            keyed.setdefault((r.variant, SWEEPABLE[other][1](r)), []).append(r)
    keyed = {k: v for k, v in keyed.items() if len({value(r) for r in v}) >= 2}
    curves: dict[str, list[Run]] = {}
    for (variant, other_value), members in sorted(keyed.items(), key=lambda kv: str(kv[0])):
        name = draw.VARIANT_NAMES.get(variant, variant)
        if sum(k[0] == variant for k in keyed) > 1 and other_value is not None:
            name += f" ({other}={other_value})"
        curves[name] = members
    return curves


def swept_parameters(runs: Sequence[Run], grouping: Grouping | None = None) -> list[str]:
    """The knobs (n, t_max) that take two or more values among comparable runs of one variant."""
    grouping = grouping or Grouping()
    groups = grouping.groups(runs)
    return [p for p in SWEEPABLE if any(_sweep_curves(g, p) for g in groups)]


def _errorbars(ax, xs, per_value, style, color, label) -> None:
    """Mean over the runs of each value (seeds of one setting), bars from min to max."""
    means = [sum(v) / len(v) for v in per_value]
    lo = [m - min(v) for m, v in zip(means, per_value)]
    hi = [max(v) - m for m, v in zip(means, per_value)]
    ax.errorbar(xs, means, yerr=[lo, hi] if any(len(v) > 1 for v in per_value) else None, fmt=style,
                color=color, mfc="none" if "s" in style else color, capsize=3, label=label)


def _composite_max(r: Run, direction: str) -> float:
    g = r.gains() if r.n > 1 else None
    return max(abs(v) for v in g[f"composite_{direction}"]) if g else 1.0


def sweep(runs: Sequence[Run], out: Path, *, param: str, window: float = 0.1, grouping: Grouping | None = None,
          pdf: bool = False) -> list[Path]:
    """Sweep summary, one row per group of comparable runs: (a) final training loss (mean of the
    last ``window`` of steps) and final validation loss against the swept knob, the group's
    baseline as horizontal lines; then per variant the largest composite gain (forward and
    backward, last gains record) against the knob, on its own scale."""
    if param not in SWEEPABLE:
        raise AnalysisError(f"sweep over {param!r}: only {', '.join(SWEEPABLE)} are summarised")
    title, value, base = SWEEPABLE[param]
    grouping = grouping or Grouping()
    runs = complete_runs(runs)
    rows = []
    for group in grouping.groups(runs):
        curves = _sweep_curves(group, param)
        if curves:
            rows.append((group, curves))
    if not rows:
        raise AnalysisError(f"no sweep over {param}: fewer than two values of it among comparable runs of one variant")
    drawn = [r for g, _ in rows for r in g]
    drawn_ids = {id(r) for r in drawn}
    for group in grouping.groups(runs):
        if not any(id(r) in drawn_ids for r in group):  # its runs would have been averaged with the drawn ones
            why = grouping.describe(group, runs)
            for r in group:
                grouping.set_aside(r, f"sweep_{param}",
                                   f"no sweep over {param} among the runs with its settings ({why})")
    families = draw.variant_families([r for _, c in rows for m in c.values() for r in m])
    fig, axes = draw.figure(5.4 * (1 + len(families)) + 1.0, 4.4 * len(rows) + 0.4, len(rows), 1 + len(families))
    seeds = False
    for row, (group, curves) in enumerate(rows):
        ax = axes[row][0]
        gain_axes = dict(zip(families, axes[row][1:]))
        gain_values: dict[str, list[float]] = {f: [] for f in families}
        for i, (name, members) in enumerate(curves.items()):
            by_value: dict[Any, list[Run]] = {}
            for r in members:
                by_value.setdefault(value(r), []).append(r)
            xs = sorted(by_value)
            seeds = seeds or any(len(v) > 1 for v in by_value.values())
            _errorbars(ax, xs, [[r.final_loss(window) for r in by_value[x]] for x in xs], "o-", f"C{i}",
                       f"{name}: training loss (last {window:.0%})")
            vals = [[r.final_val_loss() for r in by_value[x] if math.isfinite(r.final_val_loss())] for x in xs]
            if all(vals):
                _errorbars(ax, xs, vals, "s--", f"C{i}", f"{name}: validation loss")
            family = members[0].variant
            for direction, style in (("forward", "o-"), ("backward", "x--")):
                per_value = [[_composite_max(r, direction) for r in by_value[x]] for x in xs]
                gain_values[family] += [v for vs in per_value for v in vs]
                _errorbars(gain_axes[family], xs, per_value, style, f"C{i}", f"{name}: composite {direction}")
        bases = [r for r in group if r.is_baseline]
        for key, ls, what in (("train", "-", "training loss"), ("val", "--", "validation loss")):
            ys = [b.final_loss(window) if key == "train" else b.final_val_loss() for b in bases]
            ys = [y for y in ys if math.isfinite(y)]
            if ys:  # mean over the group's baseline runs (seeds); their spread as a band
                ax.axhline(sum(ys) / len(ys), color="black", lw=1.0, ls=ls,
                           label=f"baseline: {what}" + (f" (mean of {len(ys)})" if len(ys) > 1 else ""))
                if len(ys) > 1:
                    ax.axhspan(min(ys), max(ys), color="black", alpha=0.08)
        xs_all = sorted({value(r) for m in curves.values() for r in m})
        name = grouping.describe(group, drawn)
        ax.set_ylabel("final loss")
        ax.set_title((f"runs with {name}: " if name else "") + f"final loss against {param}", fontsize=10)
        for family, gx in gain_axes.items():
            if not gain_values[family]:
                gx.axis("off")
                continue
            gx.axhline(1.0, color="gray", lw=0.8, ls=":")
            draw.gain_axis(gx, gain_values[family])
            gx.set_ylabel("max Amax gain of the composite H_res")
            gx.set_title(f"{draw.VARIANT_NAMES.get(family, family)}: largest composite gain (ideal 1)", fontsize=10)
        for a in [ax] + [gain_axes[f] for f in families if gain_values[f]]:
            a.set_xscale("log", base=base)
            a.set_xticks(xs_all, [str(x) for x in xs_all])
            a.minorticks_off()
            a.set_xlabel(title)
            a.grid(alpha=0.3, which="both")
            a.legend(fontsize=7)
    fig.suptitle(f"Sweep over {title}" + ("; mean over seeds, bars: min to max" if seeds else ""), fontsize=10)
    return draw.save(fig, out, pdf)


def ablation(runs: Sequence[Run], out: Path, *, window: float = 0.1, baseline: Run | None = None,
             grouping: Grouping | None = None, pdf: bool = False) -> list[Path]:
    """Table 1 as bars: the final-loss gap to the baseline (of the same settings) of each
    combination of learned (✓) and fixed (–) mappings; the paper's gap in the tick label."""
    grouping = grouping or Grouping()
    pairs = grouping.baselines(complete_runs(runs), baseline, figure="ablation")
    variants = {r.variant for r, _ in pairs}
    if not any(r.fixed for r, _ in pairs):
        raise AnalysisError("no ablation runs (residual.fix_res / fix_pre / fix_post) among the runs")
    group_of = grouping.names([r for r, _ in pairs])
    rows = []
    for r, b in pairs:
        learned = tuple(m for m in ("res", "pre", "post") if m not in r.fixed)
        gap_train, _ = _gap_ratio(r, b, window)
        upto = min(r.steps_done, b.steps_done)
        gap_val = r.final_val_loss(upto) - b.final_val_loss(upto)
        rows.append((group_of[id(r)], len(learned), learned, r, gap_train, gap_val))
    rows.sort(key=lambda t: (t[0], t[3].variant, t[1], t[2]))
    fig, axes = draw.figure(max(6.0, 1.3 * len(rows) + 2), 4.6)
    ax = axes[0][0]
    xs = list(range(len(rows) + 1))
    ticks = ["baseline\n(all fixed)\npaper 0.0"]
    ax.bar([0], [0.0], color="black", width=0.6)
    for x, (group, _, learned, r, gt, gv) in zip(xs[1:], rows):
        ax.bar(x - 0.17, gt, width=0.34, color="C0", label=f"training loss (last {window:.0%})" if x == 1 else None)
        if math.isfinite(gv):
            ax.bar(x + 0.17, gv, width=0.34, color="C1", label="validation loss" if x == 1 else None)
        marks = " ".join(f"{m}{'✓' if m in learned else '–'}" for m in ("res", "pre", "post"))
        paper = PAPER_TABLE1.get(learned) if r.variant == "hc" else None
        name = draw.VARIANT_NAMES.get(r.variant, r.variant) if len(variants) > 1 else ""
        ticks.append((f"[{group}]\n" if group else "") + f"{name}\n{marks}\n"
                     + (f"paper {paper:+.3f}" if paper is not None else "(not in paper)"))
        ax.annotate(f"{gt:+.3f}", (x - 0.17, gt), textcoords="offset points", xytext=(0, -10 if gt < 0 else 3),
                    ha="center", fontsize=7)
    ax.set_xticks(xs, ticks, fontsize=7.5)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylabel("final loss - baseline final loss")
    ax.set_title("Component ablation (paper Table 1): ✓ learned, – fixed (res: I, pre: 1/n, post: 1)\n"
                 "final-loss gap to the baseline of the same settings; below 0 = better", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return draw.save(fig, out, pdf)


# ------------------------------------------------------- one run, several runs (mhc-plot-losses)


def plot_run(run_dir: str | Path, out: str | Path | None = None, ema_alpha: float = 0.9) -> Path:
    """Loss (raw, EMA, validation), gradient norm and learning rate of one run: the figure the
    trainer draws beside the run (``run_dir/figures/loss.png``) as it goes."""
    from mhc_train.analysis.runs import load_run_dir

    run = load_run_dir(run_dir)
    fig, axes = draw.figure(11, 4, 1, 2)
    ax = axes[0][0]
    x, y = run.series("train", "loss")
    if x:
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train (raw)")
        ax.plot(x, ema(y, ema_alpha), color="tab:blue", lw=1.6, label=f"train (EMA {ema_alpha})")
    vx, vy = run.series("val", "val_loss")
    if vx:
        ax.plot(vx, vy, "o-", color="tab:orange", ms=4, lw=1.2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy + balance loss")
    ax.set_title(f"{run.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    gx, gy = run.series("train", "grad_norm")
    if gx:
        ax.plot(gx, gy, color="tab:green", lw=0.8, label="grad norm (before clipping)")
    ax.set_xlabel("step")
    ax.set_ylabel("grad norm")
    ax.grid(alpha=0.3)
    lx, ly = run.series("train", "lr")
    if lx:
        ax2 = ax.twinx()
        ax2.plot(lx, ly, color="tab:red", lw=1.0, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
    ax.set_title("gradient norm and learning rate")
    return draw.save(fig, Path(out) if out else Path(run_dir) / "figures" / "loss.png", False)[0]


def loss_comparison(runs: Sequence[Run], out: Path, *, ema_alpha: float = 0.9, baseline: Run | None = None,
                    grouping: Grouping | None = None) -> Path:
    """``mhc-plot-losses``: every run's EMA training loss (dots: validation), its gap to the
    baseline of its own settings, and the grad norm, side by side. Runs without a baseline of
    their settings stay out of the gap panel (``grouping`` holds the warnings naming them), and
    the panel says why when none has one."""
    grouping = grouping or Grouping()
    runs = draw.sort_runs(runs)
    labels = draw.labels(runs, group_of=grouping.names(runs))
    color = {id(r): f"C{i % 10}" for i, r in enumerate(runs)}
    try:
        pairs, no_gap = grouping.baselines(runs, baseline, figure="the loss gap"), ""
    except AnalysisError as e:
        pairs, no_gap = [], str(e)
    fig, axes = draw.figure(16, 4.4, 1, 3)
    ax = axes[0][0]
    curves = []
    for r in runs:
        x, y = r.series("train", "loss")
        vx, vy = r.series("val", "val_loss")
        y = ema(y, ema_alpha)
        ax.plot(x, y, lw=1.4, label=labels[id(r)], color=color[id(r)])
        if vx:
            ax.plot(vx, vy, "o", ms=3.5, color=color[id(r)], alpha=0.8)
        curves += [(x, y, color[id(r)]), (vx, vy, color[id(r)])]
    # the y range of the last four fifths (the steep start would flatten the end), the start's
    # points marked on the edge
    tails = [y for xs, ys, _ in curves for y in ys[len(ys) // 5:]]
    clipped = draw.clip_marked(ax, curves, min(tails), max(tails), signed=False) if tails else ""
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (EMA {ema_alpha}); dots: validation")
    ax.set_title("training loss" + (f"\n{clipped}" if clipped else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    if pairs:
        for r, b in pairs:
            gap = _gap_curve(r, b, ema_alpha)
            ax.plot(list(gap), list(gap.values()), lw=1.4, label=f"{labels[id(r)]} - {labels[id(b)]}",
                    color=color[id(r)])
        ax.axhline(0.0, color="black", lw=1.0, ls="--", label="baseline (reference)")
        ax.set_title("absolute loss gap to the baseline of the same settings (< 0: better)", fontsize=10)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no loss gap:\n{no_gap}", ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_title("loss gap to the baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss - baseline loss (both EMA)")
    ax.grid(alpha=0.3)

    ax = axes[0][2]
    for r in runs:
        gx, gy = r.series("train", "grad_norm")
        if gx:
            ax.plot(gx, gy, lw=0.9, label=labels[id(r)], color=color[id(r)])
    ax.set_xlabel("step")
    ax.set_ylabel("global grad norm (before clipping)")
    ax.set_title("gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return draw.save(fig, out, False)[0]
