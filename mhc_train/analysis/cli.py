"""``mhc-plot`` (also ``python -m mhc_train.analysis``): the paper's figures from training runs.

    mhc-plot runs/stability                          # every figure these runs support, into runs/stability/figures
    mhc-plot runs/sweep_n runs/sweep_tmax -o figs    # several sweeps at once
    mhc-plot RUN_DIR RUN_DIR --figures loss_gap,grad_norm --ema 0.95 --pdf
    mhc-plot runs/stability --figures h_res --layers 1,6,12 --step 300
    mhc-plot wandb:ENTITY/PROJECT/GROUP -o figs      # from W&B (online, logged in)
    mhc-plot runs/ --list                            # the runs found, one line each

Figures (``--figures``, comma-separated; default ``auto`` = every one the runs support, the
others skipped with a note): loss_gap (Fig 2a/5a), grad_norm (Fig 2b/5b), gains (Figs 3/7),
gains_by_step (the largest composite gain against the training step), h_res (Fig 8), scaling
(Fig 6), sweep (final loss and composite gain against n and against t_max), ablation (Table 1).
``summary`` writes summary.json and summary.md (one row per run: final losses, gap to its
baseline, composite gain maxima, time per step).

Runs are averaged or differenced only within a group of comparable runs (same settings but the
residual connection and the seed, ``groups.py``); groups are drawn side by side, and each run a
figure sets aside gets one warning line on stderr (``--allow-mixed``: one group of all runs).
A figure that cannot be drawn is reported in one line, and its file from an earlier call removed.

Exit codes: 0 figures written; 2 bad input (no runs, no baseline, a figure that was asked for
by name and cannot be made), with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from mhc_train.analysis import draw, figures as F, gain_figures as G
from mhc_train.analysis.groups import Grouping, find_baseline
from mhc_train.analysis.runs import AnalysisError, Run, get, load_runs

FIGURES = ("loss_gap", "grad_norm", "gains", "gains_by_step", "h_res", "scaling", "sweep", "ablation", "summary")
PROG = "mhc-plot"


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AnalysisError(f"--layers: expected comma-separated layer numbers, got {text!r}") from None


def summarize(runs: Sequence[Run], baseline: Run | None, window: float,
              grouping: Grouping | None = None) -> list[dict[str, Any]]:
    """One row per run: final losses, gap and time ratio to the baseline of its group (none
    when its group has no baseline), composite gain maxima."""
    grouping = grouping or Grouping()
    try:
        base_of = {id(r): b for r, b in grouping.baselines(runs, baseline, figure="summary")}
    except AnalysisError:
        base_of = {}
    group_of = {id(r): grouping.describe(g, runs) for g in grouping.groups(runs) for r in g}
    rows = []
    for r in draw.sort_runs(runs):
        g = r.gains() if r.n > 1 else None
        b = base_of.get(id(r))
        row: dict[str, Any] = {
            "experiment": r.experiment, "run": r.name, "dir": Path(r.source).name, "label": r.label(),
            "variant": r.variant, "n": r.n,
            "t_max": r.t_max, "fixed": list(r.fixed), "model_dim": get(r.config, "model.dim"),
            "params": r.params, "group": group_of[id(r)], "steps": r.steps_done, "complete": r.complete,
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
    grouping = Grouping()
    group_of = {id(r): grouping.describe(g, runs) for g in grouping.groups(runs) for r in g}
    for r in sorted(draw.sort_runs(runs), key=lambda r: r.experiment):
        done = "complete" if r.complete else f"partial ({r.steps_done} steps)"
        group = f"  [{group_of[id(r)]}]" if group_of[id(r)] else ""
        print(f"{r.experiment or '-':12s} {r.label():36s} {done:20s} loss {r.final_loss(window):.4f}  "
              f"val {r.final_val_loss():.4f}  {r.source}{group}")


def _outputs(out_dir: Path, prefix: str, name: str) -> list[Path]:
    """Every file figure ``name`` may write (a stale one of them is removed when it fails)."""
    if name == "summary":
        return [out_dir / f"{prefix}summary.json", out_dir / f"{prefix}summary.md"]
    stems = [f"sweep_{p}" for p in F.SWEEPABLE] if name == "sweep" else [name]
    return [out_dir / f"{prefix}{stem}{ext}" for stem in stems for ext in (".png", ".pdf")]


def _remove_stale(paths: Sequence[Path]) -> str:
    """Remove the files that exist; their names, for the one-line report."""
    gone = [p for p in paths if p.is_file()]
    for p in gone:
        p.unlink()
    return f" (removed the stale {', '.join(p.name for p in gone)})" if gone else ""


def _draw(name: str, runs: Sequence[Run], args, baseline: Run | None, grouping: Grouping, out_dir: Path,
          layers: list[int] | None) -> list[Path]:
    path = lambda stem: out_dir / f"{args.prefix}{stem}.png"  # noqa: E731
    if name == "loss_gap":
        return F.loss_gap(runs, path(name), ema_alpha=args.ema, baseline=baseline, grouping=grouping, pdf=args.pdf,
                          window=args.window)
    if name == "grad_norm":
        return F.grad_norm(runs, path(name), ema_alpha=args.ema, grouping=grouping, pdf=args.pdf)
    if name == "gains":
        return G.gains(runs, path(name), step=args.step, pdf=args.pdf)
    if name == "gains_by_step":
        return G.gains_by_step(runs, path(name), pdf=args.pdf)
    if name == "h_res":
        return G.h_res(runs, path(name), step=args.step, layers=layers, pdf=args.pdf)
    if name == "scaling":
        return F.scaling(runs, path(name), window=args.window, ema_alpha=args.ema, baseline=baseline,
                         grouping=grouping, pdf=args.pdf)
    if name == "sweep":
        params = F.swept_parameters(runs, grouping)
        if not params:
            raise AnalysisError("no sweep: n and t_max each take at most one value per variant among comparable runs")
        written = []
        for p in params:
            written += F.sweep(runs, path(f"sweep_{p}"), param=p, window=args.window, grouping=grouping, pdf=args.pdf)
        return written
    if name == "ablation":
        return F.ablation(runs, path(name), window=args.window, baseline=baseline, grouping=grouping, pdf=args.pdf)
    assert name == "summary", name
    rows = summarize(runs, baseline, args.window, grouping)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = _outputs(out_dir, args.prefix, "summary")
    js.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    md.write_text(summary_markdown(rows, args.window))
    return [js, md]


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
    parser.add_argument("--baseline", help="the run every gap is taken against (default: per run, a baseline "
                        "run with the same settings but the residual connection)")
    parser.add_argument("--allow-mixed", action="store_true", help="average and difference runs of different "
                        "settings (model, steps, data, ...) too, each such pairing named in a warning")
    parser.add_argument("--step", type=int, help="step of the gains / H_res records (default: the last)")
    parser.add_argument("--layers", help="single layers shown in the H_res figure, e.g. 1,6,12 "
                        "(default: first, middle, last)")
    parser.add_argument("--pdf", action="store_true", help="also write a PDF of every figure")
    parser.add_argument("--list", action="store_true", help="list the runs found and exit")
    args = parser.parse_args(argv)
    grouping = Grouping(allow_mixed=args.allow_mixed)

    warned: list[str] = []

    def warn() -> None:  # once, before the skipped figures or the error line
        if not warned:
            warned.extend(grouping.warnings())
            for line in warned:
                print(f"{PROG}: warning: {line}", file=sys.stderr)

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

        written: list[Path] = []
        skipped: list[str] = []
        for name in wanted:
            try:
                drawn = _draw(name, runs, args, baseline, grouping, out_dir, layers)
            except AnalysisError as e:
                grouping.forget(name)
                removed = _remove_stale(_outputs(out_dir, args.prefix, name))
                if not auto:
                    raise AnalysisError(f"{name}{removed}: {e}") from None
                skipped.append(f"{name}{removed}: {e}")
                continue
            written += drawn
            if name == "sweep":  # a sweep now over n only: no earlier sweep over t_max left beside it
                stems = {p.stem for p in drawn}
                removed = _remove_stale([p for p in _outputs(out_dir, args.prefix, name) if p.stem not in stems])
                if removed:
                    left = [p for p in F.SWEEPABLE if f"{args.prefix}sweep_{p}" not in stems]
                    skipped.append(f"sweep over {' and '.join(left)}{removed}: not swept among comparable runs")
        partial = [r for r in runs if not r.complete]
        if partial and any(f in wanted for f in ("sweep", "scaling", "ablation")):
            print(f"{PROG}: note: {len(partial)} incomplete run(s) left out of the sweep / scaling / ablation "
                  f"figures: {', '.join(r.name for r in partial[:4])}{' ...' if len(partial) > 4 else ''}",
                  file=sys.stderr)
        warn()
        for note in skipped:
            print(f"{PROG}: skipped {note}", file=sys.stderr)
        if not written:
            raise AnalysisError(f"no figure could be made from these {len(runs)} runs")
        for p in written:
            print(p)
        return 0
    except AnalysisError as e:
        warn()
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


# ------------------------------------------------------------------------ mhc-plot-results

RESULTS_PROG = "mhc-plot-results"


def _machine(root: Path) -> dict[str, Any]:
    """How and where the runs were made: the commit and wall time reproduce.sh recorded beside
    them ($OUT/commit, $OUT/runs_seconds), a note written by hand ($OUT/note, optional), this
    machine, the torch of the runs."""
    import datetime
    import os
    import platform

    def read(name: str) -> str | None:
        p = root / name
        return p.read_text().strip() if p.is_file() else None

    torch = None
    for m in sorted(root.glob("*/*/metrics.jsonl"))[:1]:
        first = json.loads(m.read_text().splitlines()[0])
        torch = first.get("torch")
    secs = read("runs_seconds")
    return {"commit": read("commit"), "runs_seconds": float(secs) if secs else None, "torch": torch,
            "note": read("note"),  # anything about the passes a reader needs (restarts, load)
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "date": datetime.date.today().isoformat()}


def results_run(argv: Sequence[str] | None = None) -> int:
    """``mhc-plot-results write RUNS_ROOT``: the JSON summaries of every reproduction experiment
    under RUNS_ROOT into docs/results/; ``mhc-plot-results doc``: every generated region of
    docs/reproduction.md from those summaries (``--check``: exit 1 if the doc is out of date)."""
    from mhc_train.analysis import results as RS, results_doc as RD

    parser = argparse.ArgumentParser(prog=RESULTS_PROG, description="Reproduction results as data: JSON summaries "
                                     "from run directories, and docs/reproduction.md's numbers from them.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="summaries of the experiments under RUNS_ROOT (reproduce.sh's $OUT)")
    w.add_argument("root", metavar="RUNS_ROOT")
    w.add_argument("-o", "--out", default="docs/results", help="where the JSON files go (default docs/results)")
    w.add_argument("--only", help="comma-separated experiment names (default: every one found: "
                   f"{', '.join(RS.EXPERIMENTS)})")
    w.add_argument("--commit", help="commit the runs were trained at (default: RUNS_ROOT/commit, which "
                   "reproduce.sh writes, else the current HEAD)")
    d = sub.add_parser("doc", help="regenerate the results regions of the doc from the summaries")
    d.add_argument("--results", default="docs/results")
    d.add_argument("--doc", default="docs/reproduction.md")
    d.add_argument("--check", action="store_true", help="write nothing; exit 1 when the doc differs")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "write":
            root = Path(args.root)
            extra = _machine(root)
            commit = args.commit or extra.pop("commit") or RS.git_commit()
            extra.pop("commit", None)
            only = [x.strip() for x in args.only.split(",")] if args.only else None
            for p in RS.write_results(root, args.out, commit=commit, only=only, extra=extra):
                print(p)
            return 0
        doc = Path(args.doc)
        text = doc.read_text(encoding="utf-8")
        results = RS.load_results(args.results)
        if not results:
            raise AnalysisError(f"{args.results}: no summaries (run {RESULTS_PROG} write RUNS_ROOT first)")
        new = RD.render(text, results)
        if args.check:
            if new != text:
                print(f"{RESULTS_PROG}: {doc} is out of date with {args.results} (run {RESULTS_PROG} doc)",
                      file=sys.stderr)
                return 1
            return 0
        if new != text:
            doc.write_text(new, encoding="utf-8")
        print(f"{doc}: {len(RD.regions(text))} regions from {len(results)} summaries")
        return 0
    except (AnalysisError, KeyError, OSError) as e:
        print(f"{RESULTS_PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def results_main(argv: Sequence[str] | None = None) -> None:
    sys.exit(results_run(sys.argv[1:] if argv is None else argv))


# ------------------------------------------------------------- mhc-plot-losses (kept as an alias)

LOSSES_PROG = "mhc-plot-losses"


def losses_main(argv: Sequence[str] | None = None) -> None:
    """``mhc-plot-losses``: loss curves of several runs, their gap to the baseline of their own
    settings, and the grad norm, in one figure (``figures.loss_comparison``). The older command,
    kept with its arguments; ``mhc-plot --figures loss_gap,grad_norm`` draws the paper's versions.

        mhc-plot-losses runs/quickstart                   # a sweep directory: every run below it
        mhc-plot-losses RUN_DIR RUN_DIR ... -o cmp.png    # chosen runs; each one's baseline is found
    """
    from mhc_train.analysis.runs import METRICS, find_run_dirs, load_run_dir

    parser = argparse.ArgumentParser(
        prog=LOSSES_PROG,
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
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 <= args.ema < 1:
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    try:
        dirs = list({d.resolve(): d for p in args.runs for d in find_run_dirs(p)}.values())
        runs = [r for r in map(load_run_dir, dirs) if r.series("train", "loss")[0]]
        if not runs:
            raise AnalysisError("no training records in the given runs")
        grouping = Grouping(args.allow_mixed)
        base = None
        if args.baseline is not None:
            base = next((r for r in runs if Path(r.source).resolve() == Path(args.baseline).resolve()), None)
            if base is None:
                raise AnalysisError(f"--baseline {args.baseline} is not among the runs")
        if args.out:
            out = Path(args.out)
        elif len(args.runs) == 1 and Path(args.runs[0]).is_dir() and not (Path(args.runs[0]) / METRICS).is_file():
            out = Path(args.runs[0]) / "loss_comparison.png"
        else:
            out = Path("loss_comparison.png")
        path = F.loss_comparison(runs, out, ema_alpha=args.ema, baseline=base, grouping=grouping)
    except AnalysisError as e:
        raise SystemExit(f"{LOSSES_PROG}: {e}") from None
    for line in grouping.warnings():
        print(f"{LOSSES_PROG}: warning: {line}", file=sys.stderr)
    print(f"{path}  ({len(dirs)} runs: {', '.join(str(d) for d in dirs)})")
