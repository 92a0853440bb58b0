"""``mhc-plot`` (also ``python -m mhc_train.analysis``): the paper's figures from training runs.

    mhc-plot runs/stability                          # every figure these runs support, into runs/stability/figures
    mhc-plot runs/sweep_n runs/sweep_tmax -o figs    # several sweeps at once
    mhc-plot RUN_DIR RUN_DIR --figures loss_gap,grad_norm --ema 0.95 --pdf
    mhc-plot runs/stability --figures h_res --layers 1,6,12 --step 300
    mhc-plot wandb:ENTITY/PROJECT/GROUP -o figs      # from W&B (online, logged in)
    mhc-plot runs/ --list                            # the runs found, one line each

Figures (``--figures``, comma-separated; default ``auto`` = every one the runs support, the
others skipped with a note): loss_gap (Fig 2a/5a), grad_norm (Fig 2b/5b), gains (Figs 3/7),
h_res (Fig 8), scaling (Fig 6), sweep (final loss and composite gain against n and against
t_max), ablation (Table 1). ``summary`` writes summary.json and summary.md (one row per run:
final losses, gap to its baseline, composite gain maxima, time per step).

Exit codes: 0 figures written; 2 bad input (no runs, no baseline, incompatible runs, a figure
that was asked for by name and cannot be made), with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from mhc_train.analysis import figures as F
from mhc_train.analysis.runs import AnalysisError, Run, find_baseline, load_runs, match_baselines

FIGURES = ("loss_gap", "grad_norm", "gains", "h_res", "scaling", "sweep", "ablation", "summary")
PROG = "mhc-plot"


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AnalysisError(f"--layers: expected comma-separated layer numbers, got {text!r}") from None


def summarize(runs: Sequence[Run], baseline: Run | None, window: float) -> list[dict[str, Any]]:
    """One row per run: final losses, gap and time ratio to its baseline, composite gain maxima."""
    try:
        base_of = {id(r): b for r, b in match_baselines(runs, baseline)}
    except AnalysisError:
        base_of = {}
        for r in runs:  # runs that have a baseline get their gap; the rest none
            try:
                base_of.update({id(a): b for a, b in match_baselines([r] + [x for x in runs if x.is_baseline],
                                                                     baseline)})
            except AnalysisError:
                pass
    rows = []
    for r in F._sort(runs):
        g = r.gains() if r.n > 1 else None
        b = base_of.get(id(r))
        row: dict[str, Any] = {
            "experiment": r.experiment, "run": r.name, "dir": Path(r.source).name, "label": r.label(),
            "variant": r.variant, "n": r.n,
            "t_max": r.t_max, "fixed": list(r.fixed), "model_dim": F.get(r.config, "model.dim"),
            "params": r.params, "steps": r.steps_done, "complete": r.complete,
            "final_loss": r.final_loss(window), "final_val_loss": r.final_val_loss(),
            "step_time_s": r.mean_step_time(),
            "composite_forward_max": max(map(abs, g["composite_forward"])) if g else (1.0 if r.n == 1 else None),
            "composite_backward_max": max(map(abs, g["composite_backward"])) if g else (1.0 if r.n == 1 else None),
            "single_forward_max": max(map(abs, g["single_forward"])) if g else (1.0 if r.n == 1 else None),
            "single_backward_max": max(map(abs, g["single_backward"])) if g else (1.0 if r.n == 1 else None),
            "gains_step": g["step"] if g else None, "source": r.source,
        }
        try:
            row["training_flops"] = max(r.tokens().values()) * r.flops_per_token()
        except (AnalysisError, ValueError):
            row["training_flops"] = None
        if b is not None:  # over the steps both reached
            upto = min(r.steps_done, b.steps_done)
            row["baseline"] = b.name
            row["gap"] = r.final_loss(window, upto) - b.final_loss(window, upto)
            row["val_gap"] = r.final_val_loss(upto) - b.final_val_loss(upto)
            row["time_vs_baseline"] = row["step_time_s"] / b.mean_step_time() if b.mean_step_time() else None
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if abs(v) >= 1e4 or (abs(v) < 1e-3 and v != 0):
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, list):
        return "+".join(v) if v else "-"
    return str(v)


def summary_markdown(rows: Sequence[dict[str, Any]], window: float) -> str:
    cols = [("experiment", "experiment"), ("label", "run"), ("dir", "directory"), ("steps", "steps"),
            ("complete", "complete"),
            ("final_loss", f"loss (last {window:.0%})"), ("final_val_loss", "val loss"), ("gap", "gap"),
            ("val_gap", "val gap"), ("composite_forward_max", "composite fwd max"),
            ("composite_backward_max", "composite bwd max"), ("single_forward_max", "single fwd max"),
            ("step_time_s", "s/step"), ("time_vs_baseline", "time vs baseline")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def _list(runs: Sequence[Run], window: float) -> None:
    for r in sorted(F._sort(runs), key=lambda r: r.experiment):
        done = "complete" if r.complete else f"partial ({r.steps_done} steps)"
        print(f"{r.experiment or '-':12s} {r.label():36s} {done:20s} loss {r.final_loss(window):.4f}  "
              f"val {r.final_val_loss():.4f}  {r.source}")


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The mHC paper's figures (loss gap, grad norm, Amax gains, H_res maps, "
                               "scaling, sweeps, ablation) from training runs' metrics.jsonl or W&B.")
    parser.add_argument("sources", nargs="+", metavar="RUNS",
                        help="run directories, directories with runs below them (a sweep), or "
                             "wandb:ENTITY/PROJECT[/GROUP]")
    parser.add_argument("-o", "--out", help="output directory (default: <first source>/figures, or ./figures)")
    parser.add_argument("--figures", default="auto",
                        help=f"comma-separated, from {', '.join(FIGURES)}; or auto (default) / all")
    parser.add_argument("--prefix", default="", help="prefix of the file names (e.g. repro_stability_)")
    parser.add_argument("--ema", type=float, default=0.9, help="EMA weight of the past for loss and grad-norm "
                        "curves, in [0, 1); 0 = raw (default 0.9)")
    parser.add_argument("--window", type=float, default=0.1, help="final loss = mean training loss over this "
                        "fraction of the last steps (default 0.1)")
    parser.add_argument("--baseline", help="the run every gap is taken against (default: per run, the baseline "
                        "run with the same model, tokens per step, steps and data)")
    parser.add_argument("--step", type=int, help="step of the gains / H_res records (default: the last)")
    parser.add_argument("--layers", help="single layers shown in the H_res figure, e.g. 1,6,12 "
                        "(default: first, middle, last)")
    parser.add_argument("--pdf", action="store_true", help="also write a PDF of every figure")
    parser.add_argument("--list", action="store_true", help="list the runs found and exit")
    args = parser.parse_args(argv)
    try:
        if not 0 <= args.ema < 1:
            raise AnalysisError(f"--ema must be in [0, 1), got {args.ema}")
        if not 0 < args.window <= 1:
            raise AnalysisError(f"--window must be in (0, 1], got {args.window}")
        runs = load_runs(args.sources)
        if args.list:
            _list(runs, args.window)
            return 0
        baseline = find_baseline(runs, args.baseline)
        layers = _parse_layers(args.layers)
        wanted = [f.strip() for f in args.figures.split(",") if f.strip()]
        auto = wanted in (["auto"], ["all"])
        if auto:
            wanted = list(FIGURES)
        unknown = [f for f in wanted if f not in FIGURES]
        if unknown:
            raise AnalysisError(f"--figures: unknown figure {unknown[0]!r} (choose from {', '.join(FIGURES)}, auto)")
        if args.out:
            out_dir = Path(args.out)
        else:
            first = Path(args.sources[0])
            out_dir = first / "figures" if first.is_dir() else Path("figures")
        path = lambda name: out_dir / f"{args.prefix}{name}.png"  # noqa: E731

        written: list[Path] = []
        skipped: list[str] = []
        for name in wanted:
            try:
                if name == "loss_gap":
                    written += F.loss_gap(runs, path("loss_gap"), ema_alpha=args.ema, baseline=baseline, pdf=args.pdf)
                elif name == "grad_norm":
                    written += F.grad_norm(runs, path("grad_norm"), ema_alpha=args.ema, pdf=args.pdf)
                elif name == "gains":
                    written += F.gains(runs, path("gains"), step=args.step, pdf=args.pdf)
                elif name == "h_res":
                    written += F.h_res(runs, path("h_res"), step=args.step, layers=layers, pdf=args.pdf)
                elif name == "scaling":
                    written += F.scaling(runs, path("scaling"), window=args.window, ema_alpha=args.ema,
                                         baseline=baseline, pdf=args.pdf)
                elif name == "sweep":
                    params = F.swept_parameters(runs)
                    if not params:
                        raise AnalysisError("no sweep: n and t_max each take at most one value per variant")
                    for p in params:
                        written += F.sweep(runs, path(f"sweep_{p}"), param=p, window=args.window, pdf=args.pdf)
                elif name == "ablation":
                    written += F.ablation(runs, path("ablation"), window=args.window, baseline=baseline, pdf=args.pdf)
                elif name == "summary":
                    rows = summarize(runs, baseline, args.window)
                    out_dir.mkdir(parents=True, exist_ok=True)
                    js, md = out_dir / f"{args.prefix}summary.json", out_dir / f"{args.prefix}summary.md"
                    js.write_text(json.dumps(rows, indent=1, default=str) + "\n")
                    md.write_text(summary_markdown(rows, args.window))
                    written += [js, md]
            except AnalysisError as e:
                if not auto:
                    raise AnalysisError(f"{name}: {e}") from None
                skipped.append(f"{name}: {e}")
        partial = [r for r in runs if not r.complete]
        if partial and any(f in wanted for f in ("sweep", "scaling", "ablation")):
            print(f"{PROG}: note: {len(partial)} incomplete run(s) left out of the sweep / scaling / ablation "
                  f"figures: {', '.join(r.name for r in partial[:4])}{' ...' if len(partial) > 4 else ''}",
                  file=sys.stderr)
        for note in skipped:
            print(f"{PROG}: skipped {note}", file=sys.stderr)
        if not written:
            raise AnalysisError(f"no figure could be made from these {len(runs)} runs")
        for p in written:
            print(p)
        return 0
    except AnalysisError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # mhc-plot ... --list | head
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
