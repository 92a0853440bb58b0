"""Figures from the run logs: a run's loss curve, H_res heatmaps and gains (drawn by the trainer
as it goes), and the comparison of several runs (paper Fig 5a style: EMA-smoothed loss and its
gap to the baseline).

    mhc-plot-losses runs/quickstart                   # a sweep directory: every run below it
    mhc-plot-losses RUN_DIR RUN_DIR ... -o cmp.png    # chosen runs; each one's baseline is found
    python -m mhc_train.train.plot ...                # the same

A run is measured against a baseline of its own settings only (model, steps, data, ...: the
analysis package's groups); a run without one is left out of the gap panel with a warning
naming it and why (``--allow-mixed``: the closest baseline, still named in a warning).
Reading, smoothing and the drawing rules are the analysis package's (``mhc-plot`` draws the
paper's figures).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from mhc_train.analysis import draw
from mhc_train.analysis.runs import METRICS, ema, read_metrics

__all__ = ["compare_runs", "ema", "plot_gains", "plot_h_res", "plot_run", "read_metrics"]
PROG = "mhc-plot-losses"


def series(records: Iterable[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
            if math.isfinite(r[key]):
                xs.append(r["step"])
                ys.append(float(r[key]))
    return xs, ys


def run_info(records: list[dict], run_dir: Path) -> dict[str, Any]:
    runs = [r for r in records if r.get("kind") == "run"]
    info = dict(runs[-1]) if runs else {}
    info.setdefault("run_name", run_dir.name)
    return info


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    return draw.figure(width, height, rows, cols, **kw)


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, ema_alpha: float = 0.9) -> Path:
    """Loss (raw, EMA, validation), learning rate and grad norm of one run."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    info = run_info(records, run_dir)
    fig, axes = _figure(11, 4, 1, 2)
    ax = axes[0][0]
    x, y = series(records, "train", "loss")
    if x:
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train (raw)")
        ax.plot(x, ema(y, ema_alpha), color="tab:blue", lw=1.6, label=f"train (EMA {ema_alpha})")
    vx, vy = series(records, "val", "val_loss")
    if vx:
        ax.plot(vx, vy, "o-", color="tab:orange", ms=4, lw=1.2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy + balance loss")
    ax.set_title(f"{info.get('run_name')}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    gx, gy = series(records, "train", "grad_norm")
    if gx:
        ax.plot(gx, gy, color="tab:green", lw=0.8, label="grad norm (before clipping)")
    ax.set_xlabel("step")
    ax.set_ylabel("grad norm")
    ax.grid(alpha=0.3)
    lx, ly = series(records, "train", "lr")
    if lx:
        ax2 = ax.twinx()
        ax2.plot(lx, ly, color="tab:red", lw=1.0, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
    ax.set_title("gradient norm and learning rate")
    return _save(fig, out or run_dir / "figures" / "loss.png")


def plot_h_res(h_res, out: str | Path, *, step: int, title: str = "") -> Path:
    """Token-averaged H_res of every sublayer (paper Fig 8): entries, row sums (forward gain) at
    the right of each matrix, column sums (backward gain) below it. One diverging scale for all
    layers, white at 0 (blue < 0 < red), with its colorbar."""
    import numpy as np

    h = np.asarray(h_res, dtype=float)
    layers, n = h.shape[0], h.shape[-1]
    cols = min(layers, 6 if layers <= 24 else 10)
    rows = math.ceil(layers / cols)
    size = 1.0 + 0.42 * n
    fig, axes = _figure(cols * size + 1.2, rows * (size + 0.35) + 0.8, rows, cols)
    cmap, norm = draw.diverging(h)
    image = None
    annotate = n <= 6
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= layers:
            ax.axis("off")
            continue
        m = h[i]
        image = ax.imshow(m, cmap=cmap, norm=norm)
        kind = "attn" if i % 2 == 0 else "ffn"
        ax.set_title(f"layer {i + 1} ({kind} {i // 2 + 1})", fontsize=8)
        ax.set_xticks(range(n), [f"{c:.2f}" for c in m.sum(axis=0)], fontsize=6, rotation=90 if n > 4 else 0)
        ax.set_yticks(range(n), [f"{r:.2f}" for r in m.sum(axis=1)], fontsize=6)
        ax.yaxis.tick_right()
        ax.tick_params(length=0)
        if annotate:
            for (r, c), v in np.ndenumerate(m):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color=draw.text_color(cmap, norm, v))
    fig.suptitle(f"{title} H_res per layer at step {step}; blue < 0 < red  (right: row sums = forward gain; "
                 f"below: column sums = backward gain)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="H_res entry")
    return _save(fig, out)


def plot_gains(gains: dict[str, list[float]], out: str | Path, *, step: int, title: str = "") -> Path:
    """Amax gain magnitudes per layer (paper Figs 3 / 7): single-layer and composite."""
    fig, axes = _figure(11, 3.8, 1, 2)
    for ax, which in zip(axes[0], ("single", "composite")):
        for direction, color in (("forward", "tab:blue"), ("backward", "tab:orange")):
            values = gains.get(f"{which}_{direction}") or []
            ax.plot(range(1, len(values) + 1), values, "o-", ms=3, color=color,
                    label=f"{direction} gain ({'max |row sum|' if direction == 'forward' else 'max |column sum|'})")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("layer (attention and FFN sublayers, in order)")
        ax.set_ylabel("Amax gain magnitude")
        draw.gain_axis(ax, [v for d in ("forward", "backward") for v in (gains.get(f"{which}_{d}") or [])])
        ax.set_title(f"{'single-layer H_res' if which == 'single' else 'composite product of H_res'}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} Amax gains at step {step}", fontsize=10)
    return _save(fig, out)


# ------------------------------------------------------------------------------ comparison


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding metrics.jsonl) given runs or directories containing runs."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / METRICS).is_file():
            runs.append(p)
        elif p.is_file() and p.name == METRICS:
            runs.append(p.parent)
        elif p.is_dir():
            below = sorted(m.parent for m in p.rglob(METRICS))
            if not below:
                raise SystemExit(f"{PROG}: {p}: no {METRICS} in it or below it")
            runs.extend(below)
        else:
            raise SystemExit(f"{PROG}: {p}: no such run directory")
    seen, out = set(), []
    for r in runs:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            out.append(r)
    return out


def compare_runs(run_dirs: Sequence[Path], out: str | Path, *, ema_alpha: float = 0.9,
                 baseline: Path | None = None, allow_mixed: bool = False) -> Path:
    """EMA-smoothed training loss of each run, its gap to the baseline of its own settings, and
    the grad norm. Runs of other settings than every baseline are left out of the gap panel,
    each named in a warning on stderr."""
    from mhc_train.analysis.groups import Grouping
    from mhc_train.analysis.runs import AnalysisError, load_run_dir

    try:
        runs = [r for r in map(load_run_dir, run_dirs) if r.series("train", "loss")[0]]
    except AnalysisError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    if not runs:
        raise SystemExit(f"{PROG}: no training records in the given runs")
    runs = draw.sort_runs(runs)
    grouping = Grouping(allow_mixed)
    labels = draw.labels(runs, group_of=grouping.names(runs))
    color = {id(r): f"C{i % 10}" for i, r in enumerate(runs)}
    base = None
    if baseline is not None:
        base = next((r for r in runs if Path(r.source).resolve() == Path(baseline).resolve()), None)
        if base is None:
            raise SystemExit(f"{PROG}: --baseline {baseline} is not among the runs")
    try:
        pairs, no_gap = grouping.baselines(runs, base, figure="the loss gap"), ""
    except AnalysisError as e:
        pairs, no_gap = [], str(e)
    for line in grouping.warnings():
        print(f"{PROG}: warning: {line}", file=sys.stderr)

    fig, axes = _figure(16, 4.4, 1, 3)
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
            bx, by = b.series("train", "loss")
            rx, ry = r.series("train", "loss")
            base_at, at = dict(zip(bx, ema(by, ema_alpha))), dict(zip(rx, ema(ry, ema_alpha)))
            xs = [s for s in rx if s in base_at]
            ax.plot(xs, [at[s] - base_at[s] for s in xs], lw=1.4, label=f"{labels[id(r)]} - {labels[id(b)]}",
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
    return _save(fig, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Loss curves of several runs and their gap to the baseline (paper Fig 5a style), "
                    "from their metrics.jsonl files.")
    parser.add_argument("runs", nargs="+", help="run directories, or directories with runs below them (a sweep)")
    parser.add_argument("-o", "--out", help="output PNG (default: loss_comparison.png in the sweep "
                        "directory when one directory is given, else in the current directory)")
    parser.add_argument("--ema", type=float, default=0.9,
                        help="EMA smoothing weight of the past, in [0, 1) (default 0.9)")
    parser.add_argument("--baseline", help="the run to compute gaps against (default: per run, the baseline run "
                        "with its settings)")
    parser.add_argument("--allow-mixed", action="store_true", help="measure runs against a baseline of other "
                        "settings (model, steps, data, ...) too, each named in a warning")
    args = parser.parse_args(argv)
    if not 0 <= args.ema < 1:
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    runs = find_runs(args.runs)
    if args.out:
        out = Path(args.out)
    elif len(args.runs) == 1 and Path(args.runs[0]).is_dir() and not (Path(args.runs[0]) / METRICS).is_file():
        out = Path(args.runs[0]) / "loss_comparison.png"
    else:
        out = Path("loss_comparison.png")
    path = compare_runs(runs, out, ema_alpha=args.ema, baseline=Path(args.baseline) if args.baseline else None,
                        allow_mixed=args.allow_mixed)
    print(f"{path}  ({len(runs)} runs: {', '.join(str(r) for r in runs)})")


if __name__ == "__main__":
    main(sys.argv[1:])
