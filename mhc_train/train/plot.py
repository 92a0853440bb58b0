"""Figures from the run logs: a run's loss curve, H_res heatmaps and gains, and the comparison of
several runs (paper Fig 5a style: EMA-smoothed loss and its gap to the baseline).

    mhc-plot-losses runs/quickstart                   # a sweep directory: every run below it
    mhc-plot-losses RUN_DIR RUN_DIR ... -o cmp.png    # chosen runs; the baseline run is found
    python -m mhc_train.train.plot ...                # the same

Figures are drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

METRICS = "metrics.jsonl"


# ------------------------------------------------------------------------------------ reading


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a run's metrics.jsonl (a run directory or the file). For a step logged twice
    (a resumed run that had gone past its checkpoint) the later record wins."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    records: dict[tuple, dict] = {}
    order = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = (rec.get("kind"), rec.get("step")) if rec.get("kind") != "run" else ("run", order)
            order += 1
            records.pop(key, None)
            records[key] = rec
    return sorted(records.values(), key=lambda r: (r.get("step", 0), r.get("kind") != "run"))


def series(records: Iterable[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool):
            if math.isfinite(r[key]):
                xs.append(r["step"])
                ys.append(float(r[key]))
    return xs, ys


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing): alpha = weight of the past."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc / (1 - alpha ** i) if alpha > 0 else v)
    return out


def run_info(records: list[dict], run_dir: Path) -> dict[str, Any]:
    runs = [r for r in records if r.get("kind") == "run"]
    info = dict(runs[-1]) if runs else {}
    info.setdefault("run_name", run_dir.name)
    return info


def run_label(info: dict[str, Any]) -> str:
    variant = info.get("variant")
    if not variant:
        return str(info.get("run_name"))
    if variant == "baseline":
        return "baseline"
    label = f"{variant.upper() if variant == 'hc' else 'mHC'} (n={info.get('n')}"
    if variant == "mhc":
        label += f", t_max={info.get('t_max')}"
    return label + ")"


# ------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


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
    the right of each matrix, column sums (backward gain) below it."""
    import numpy as np

    h = np.asarray(h_res, dtype=float)
    layers, n = h.shape[0], h.shape[-1]
    cols = min(layers, 6 if layers <= 24 else 10)
    rows = math.ceil(layers / cols)
    size = 1.0 + 0.42 * n
    fig, axes = _figure(cols * size + 1.2, rows * (size + 0.35) + 0.8, rows, cols)
    lo, hi = float(min(h.min(), 0.0)), float(max(h.max(), 1.0))
    if lo < 0:  # HC: signed entries, centre the colormap on 0
        bound = max(-lo, hi)
        lo, hi, cmap = -bound, bound, "RdBu_r"
    else:
        cmap = "viridis"
    image = None
    annotate = n <= 6
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= layers:
            ax.axis("off")
            continue
        m = h[i]
        image = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi)
        kind = "attn" if i % 2 == 0 else "ffn"
        ax.set_title(f"layer {i + 1} ({kind} {i // 2 + 1})", fontsize=8)
        ax.set_xticks(range(n), [f"{c:.2f}" for c in m.sum(axis=0)], fontsize=6, rotation=90 if n > 4 else 0)
        ax.set_yticks(range(n), [f"{r:.2f}" for r in m.sum(axis=1)], fontsize=6)
        ax.yaxis.tick_right()
        ax.tick_params(length=0)
        if annotate:
            for (r, c), v in np.ndenumerate(m):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                        color="white" if (v - lo) / (hi - lo + 1e-12) < 0.5 else "black")
    fig.suptitle(f"{title} H_res per layer at step {step}  (right: row sums = forward gain; "
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
        values = [v for d in ("forward", "backward") for v in (gains.get(f"{which}_{d}") or [])]
        if values and max(values) / max(min(values), 1e-12) > 50:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(f"{'single-layer H_res' if which == 'single' else 'composite product of H_res'}", fontsize=10)
        ax.grid(alpha=0.3)
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
                raise SystemExit(f"mhc-plot-losses: {p}: no {METRICS} in it or below it")
            runs.extend(below)
        else:
            raise SystemExit(f"mhc-plot-losses: {p}: no such run directory")
    seen, out = set(), []
    for r in runs:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            out.append(r)
    return out


def compare_runs(run_dirs: Sequence[Path], out: str | Path, *, ema_alpha: float = 0.9,
                 baseline: Path | None = None) -> Path:
    """EMA-smoothed training loss of each run, its gap to the baseline, and the grad norm."""
    runs = []
    for d in run_dirs:
        records = read_metrics(d)
        info = run_info(records, Path(d))
        x, y = series(records, "train", "loss")
        vx, vy = series(records, "val", "val_loss")
        gx, gy = series(records, "train", "grad_norm")
        if x:
            runs.append({"dir": Path(d), "info": info, "label": run_label(info), "x": x, "y": ema(y, ema_alpha),
                         "vx": vx, "vy": vy, "gx": gx, "gy": gy})
    if not runs:
        raise SystemExit("mhc-plot-losses: no training records in the given runs")
    # the baseline first, then by label; one colour per run in every panel
    runs.sort(key=lambda r: (r["info"].get("variant") != "baseline", r["label"]))
    for i, r in enumerate(runs):
        r["color"] = f"C{i}"
    labels = [r["label"] for r in runs]
    for r in runs:  # two runs with the same variant: tell them apart by their directory
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} [{r['dir'].name}]"
    base = None
    if baseline is not None:
        base = next((r for r in runs if r["dir"].resolve() == Path(baseline).resolve()), None)
        if base is None:
            raise SystemExit(f"mhc-plot-losses: --baseline {baseline} is not among the runs")
    else:
        base = next((r for r in runs if r["info"].get("variant") == "baseline"), None)

    fig, axes = _figure(16, 4.4, 1, 3)
    ax = axes[0][0]
    for r in runs:
        ax.plot(r["x"], r["y"], lw=1.4, label=r["label"], color=r["color"])
        if r["vx"]:
            ax.plot(r["vx"], r["vy"], "o", ms=3.5, color=r["color"], alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (EMA {ema_alpha}); dots: validation")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lows = [min((r["y"][len(r["y"]) // 5:] or r["y"]) + r["vy"]) for r in runs]
    highs = [max((r["y"][len(r["y"]) // 5:] or r["y"]) + r["vy"][len(r["vy"]) // 5:]) for r in runs]
    if lows and highs:  # skip the first fifth (the steep start) so the end is readable
        pad = 0.05 * (max(highs) - min(lows) + 1e-9)
        ax.set_ylim(min(lows) - pad, max(highs) + pad)

    ax = axes[0][1]
    if base is not None:
        base_at = dict(zip(base["x"], base["y"]))
        for r in runs:
            if r is base:
                continue
            xs = [s for s in r["x"] if s in base_at]
            at = dict(zip(r["x"], r["y"]))
            ax.plot(xs, [at[s] - base_at[s] for s in xs], lw=1.4, label=r["label"], color=r["color"])
        ax.axhline(0.0, color=base["color"], lw=1.0, ls="--", label=f"{base['label']} (reference)")
        ax.set_title("absolute loss gap to the baseline (< 0: better)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no baseline run among these\n(pass --baseline RUN_DIR)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_title("loss gap to the baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss - baseline loss (both EMA)")
    ax.grid(alpha=0.3)

    ax = axes[0][2]
    for r in runs:
        if r["gx"]:
            ax.plot(r["gx"], r["gy"], lw=0.9, label=r["label"], color=r["color"])
    ax.set_xlabel("step")
    ax.set_ylabel("global grad norm (before clipping)")
    ax.set_title("gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mhc-plot-losses",
        description="Loss curves of several runs and their gap to the baseline (paper Fig 5a style), "
                    "from their metrics.jsonl files.")
    parser.add_argument("runs", nargs="+", help="run directories, or directories with runs below them (a sweep)")
    parser.add_argument("-o", "--out", help="output PNG (default: loss_comparison.png in the sweep "
                        "directory when one directory is given, else in the current directory)")
    parser.add_argument("--ema", type=float, default=0.9, help="EMA smoothing weight of the past, in [0, 1) (default 0.9)")
    parser.add_argument("--baseline", help="the run to compute gaps against (default: the run with residual=baseline)")
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
    path = compare_runs(runs, out, ema_alpha=args.ema, baseline=Path(args.baseline) if args.baseline else None)
    print(f"{path}  ({len(runs)} runs: {', '.join(str(r) for r in runs)})")


if __name__ == "__main__":
    main(sys.argv[1:])
