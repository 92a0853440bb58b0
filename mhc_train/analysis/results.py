"""Results as data: one JSON summary per reproduction experiment (``docs/results/<name>.json``),
written from the run directories of ``launch/reproduce.sh``; docs/reproduction.md's numbers and
tables are generated from these files (``results_doc.py``), never typed by hand.

A summary holds, for one experiment:

- ``config``: the settings its runs share (model, steps, tokens, learning rate: what makes them
  comparable) and what they sweep; ``commit``: the git commit the runs were trained at;
- ``runs``: per run its final training loss (the last step's), its averaged loss (the mean over
  the last ``window`` of the logged steps, which steps is said), its final validation loss, the
  gradient norm after warm-up (median and largest) and the Amax gains (composite and
  single-layer maxima, at the last gains record and at every step they were logged);
- ``groups``: per group of comparable runs (``groups.py``; several only in the scaling
  experiment, one per width) and per residual setting in it, the seeds and the gap of the
  averaged loss to the baseline of the same seed, with its 95% t-interval across seeds
  (``stats.py``; one seed: no interval), the same for the validation loss, and the gains over
  the seeds; ``contrasts``: HC minus mHC at the same n, paired by seed.

Which runs make up an experiment is ``EXPERIMENTS`` below: the directories reproduce.sh writes.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

from mhc_train.analysis import stats
from mhc_train.analysis.groups import Grouping, settings
from mhc_train.analysis.runs import AnalysisError, Run, get, load_runs

WINDOW = 0.1  # the averaged loss: mean training loss over the last 10% of the logged steps
FORMAT = 1  # bumped when the layout of a summary changes

# The settings shown as an experiment's config (all others agree within a group too, and are in
# the runs' own records; these are the ones a reader needs to tell the experiments apart).
CONFIG_KEYS = ("model.name", "model.dim", "model.n_layers", "model.moe_ffn_dim", "train.steps",
               "train.batch_size", "train.seq_len", "tokens per step", "lr", "optim.warmup_steps",
               "optim.weight_decay", "train.grad_clip", "precision")


def _main_runs(r: Run) -> bool:  # the n = 4 comparison: HC / mHC at n = 4 and the baselines
    return r.is_baseline or (r.n == 4 and not r.fixed and r.t_max in (None, 20))


# name -> (directory under the runs root, which of its runs, what it is); the order of the doc
EXPERIMENTS: dict[str, tuple[str, Callable[[Run], bool], str]] = {
    "main": ("sweep_n", _main_runs, "baseline, HC and mHC at n = 4 (the n = 4 runs of sweep_n), 3 seeds"),
    "instability": ("instability", lambda r: True, "12 blocks, lr 3e-2: can HC's gain growth hurt its loss?"),
    "stability": ("stability", lambda r: True, "6 blocks, lr 1e-2: composite gain growth (Figs 3, 7, 8)"),
    "sweep_n": ("sweep_n", lambda r: True, "expansion rate n = 1, 2, 4, 8 for HC and mHC"),
    "sweep_tmax": ("sweep_tmax", lambda r: True, "Sinkhorn iterations t_max = 1, 3, 5, 10, 20 (mHC, n = 4)"),
    "ablation": ("ablation", lambda r: True, "Table 1: HC with H_pre / H_post fixed or learned"),
    "scaling": ("scaling", lambda r: True, "baseline and mHC at model.dim 32, 64, 128 (Fig 6)"),
}


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _round(v: Any, digits: int = 6) -> Any:
    """Floats to 6 significant digits: the summaries are read by people and diffed in review."""
    if isinstance(v, float):
        return float(f"{v:.{digits}g}") if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _round(x, digits) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_round(x, digits) for x in v]
    return v


# ------------------------------------------------------------------------------------- runs


def averaged_steps(run: Run, window: float = WINDOW) -> list[int]:
    """The steps the averaged loss is taken over (as ``Run.final_loss``: the last ``window``)."""
    xs, _ = run.series("train", "loss")
    k = max(1, int(round(len(xs) * window)))
    return xs[-k:]


def status(run: Run) -> str:
    """complete, stopped (the trainer ended it after consecutive non-finite updates: diverged),
    or partial (interrupted; a relaunch continues it)."""
    if run.complete:
        return "complete"
    ends = [r for r in run.records if r.get("kind") == "end"]
    return "stopped" if ends and ends[-1].get("status") == "stopped" else "partial"


def first_nonfinite(run: Run) -> int | None:
    """The first step whose gradient norm was not finite (its update skipped), if any."""
    for r in run.records:
        if r.get("kind") == "train" and isinstance(r.get("grad_norm"), str):  # JSONL writes "nan" / "inf"
            return int(r["step"])
    return None


def run_summary(run: Run, window: float = WINDOW) -> dict[str, Any]:
    """One run's numbers (see the module docstring)."""
    steps, losses = run.series("train", "loss")
    vsteps, vlosses = run.series("val", "val_loss")
    warmup = int(get(run.config, "optim.warmup_steps") or 0)
    norms = [g for s, g in zip(*run.series("train", "grad_norm")) if s > warmup]
    avg = averaged_steps(run, window)
    out: dict[str, Any] = {
        "dir": Path(run.source).name, "label": run.label(), "variant": run.variant, "n": run.n,
        "t_max": run.t_max, "fixed": list(run.fixed), "seed": get(run.config, "train.seed"),
        "model_dim": get(run.config, "model.dim"), "params": run.params, "steps": run.steps_done,
        "status": status(run), "first_nonfinite_grad_step": first_nonfinite(run),
        "loss_last": losses[-1] if losses else None,
        "loss_avg": run.final_loss(window), "loss_avg_steps": [avg[0], avg[-1]] if avg else None,
        "val_loss": vlosses[-1] if vlosses else None, "val_step": vsteps[-1] if vsteps else None,
        "grad_norm_median": statistics.median(norms) if norms else None,
        "grad_norm_max": max(norms) if norms else None, "grad_norm_after_step": warmup,
        "step_time_s": _finite(run.mean_step_time()),
        # seconds of training the trainer reported at the end (CPU shared: an upper bound)
        "train_seconds": _finite(next((r.get("elapsed_s") for r in reversed(run.records) if r.get("kind") == "end"), None)),
    }
    gains = run.gains() if run.n > 1 else None
    if gains:
        out["gains"] = {"step": gains.get("step"), **{
            f"{kind}_{d}_max": max(abs(v) for v in gains[f"{kind}_{d}"])
            for kind in ("composite", "single") for d in ("forward", "backward")}}
        by_step = []
        for s in run.gains_steps():
            g = run.gains(s)
            if g and g.get("composite_forward"):
                by_step.append([s, max(map(abs, g["composite_forward"])), max(map(abs, g["composite_backward"]))])
        out["gains_by_step"] = by_step  # [step, composite forward max, composite backward max]
    else:
        out["gains"] = None  # baseline or one stream: no H_res products to compound
    return out


# ----------------------------------------------------------------------------------- groups


def _grad_norm_max(r: Run) -> float | None:
    return run_summary(r)["grad_norm_max"]


def _gap_stat(pairs: Sequence[tuple[Run, Run]], key: Callable[[Run], float]) -> dict[str, Any]:
    return stats.interval([key(r) - key(b) for r, b in pairs])


def _setting_key(r: Run) -> tuple:
    return (r.variant, r.n, r.t_max, r.fixed)


def group_summary(group: Sequence[Run], grouping: Grouping, among: Sequence[Run],
                  window: float = WINDOW) -> dict[str, Any]:
    """Per residual setting of one group: seeds, averaged loss and gaps to the baseline of the
    same seed with their intervals, gains over the seeds; HC minus mHC contrasts."""
    try:
        base_of = {id(r): b for r, b in grouping.baselines([r for r in group if r.complete], None, figure="results")}
    except AnalysisError:
        base_of = {}
    # Only runs that reached train.steps enter the statistics; a run that diverged is listed
    # with the step it stopped at (its last losses would compare a broken run at another step).
    by_setting: dict[tuple, list[Run]] = {}
    stopped: dict[tuple, list[Run]] = {}
    for r in sorted(group, key=lambda r: (get(r.config, "train.seed") or 0)):
        (by_setting if r.complete else stopped).setdefault(_setting_key(r), []).append(r)
    for key in stopped:
        by_setting.setdefault(key, [])
    order = {"baseline": 0, "hc": 1, "mhc": 2}
    rows = []
    for key in sorted(by_setting, key=lambda k: (order.get(k[0], 3), k[1], k[2] or 0, k[3])):
        members = by_setting[key]
        r0 = (members or stopped[key])[0]
        seeds = [get(r.config, "train.seed") for r in members]
        twice = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if twice:  # e.g. `experiment=sweep_n` and `... train.seed=0`: one run under two directory names
            dirs = [Path(r.source).name for r in members if str(get(r.config, "train.seed")) in twice]
            raise AnalysisError(f"{r0.label()}: seed {', '.join(twice)} trained more than once with the same "
                                f"settings ({', '.join(dirs)}); keep one of them, they are not independent seeds")
        pairs = [(r, base_of[id(r)]) for r in members if id(r) in base_of]
        row: dict[str, Any] = {
            "label": r0.label(), "variant": r0.variant, "n": r0.n, "t_max": r0.t_max, "fixed": list(r0.fixed),
            "seeds": [get(r.config, "train.seed") for r in members], "n_seeds": len(members),
            "runs": [Path(r.source).name for r in members],
            "not_complete": [{"dir": Path(r.source).name, "seed": get(r.config, "train.seed"), "status": status(r),
                              "step": r.steps_done, "first_nonfinite_grad_step": first_nonfinite(r)}
                             for r in stopped.get(key, [])],
            "loss_avg": stats.interval([r.final_loss(window) for r in members]),
            "val_loss": stats.interval([r.final_val_loss() for r in members]),
            "grad_norm_max": stats.spread([_grad_norm_max(r) for r in members]),
        }
        if pairs:
            row["baseline_runs"] = [Path(b.source).name for _, b in pairs]
            row["paired_by_seed"] = all(get(r.config, "train.seed") == get(b.config, "train.seed") for r, b in pairs)
            row["gap"] = _gap_stat(pairs, lambda x: x.final_loss(window))
            row["val_gap"] = _gap_stat(pairs, lambda x: x.final_val_loss())
        gains = [r.gains() for r in members if r.n > 1]
        if gains and all(gains):
            row["gains"] = {f"{kind}_{d}_max": stats.spread([max(abs(v) for v in g[f"{kind}_{d}"]) for g in gains])
                            for kind in ("composite", "single") for d in ("forward", "backward")}
        rows.append(row)
    return {"differs": grouping.describe(group, among), "settings": rows,
            "contrasts": contrasts(by_setting, window)}


def contrasts(by_setting: dict[tuple, list[Run]], window: float = WINDOW) -> list[dict[str, Any]]:
    """HC minus mHC (t_max 20) at the same n, paired by seed (paper Fig 2a: HC - mHC)."""
    out = []
    for (variant, n, _, fixed), hcs in by_setting.items():
        mhcs = by_setting.get(("mhc", n, 20, ()))
        if variant != "hc" or fixed or not mhcs:
            continue
        seed_of = lambda r: get(r.config, "train.seed")  # noqa: E731
        mhc_by_seed = {seed_of(r): r for r in mhcs}
        pairs = [(h, mhc_by_seed[seed_of(h)]) for h in hcs if seed_of(h) in mhc_by_seed]
        if pairs:
            out.append({"label": f"HC - mHC (n={n})", "n": n, "seeds": [seed_of(h) for h, _ in pairs],
                        "gap": _gap_stat(pairs, lambda x: x.final_loss(window)),
                        "val_gap": _gap_stat(pairs, lambda x: x.final_val_loss()),
                        "grad_norm_max": _gap_stat(pairs, _grad_norm_max)})
    return out


# ------------------------------------------------------------------------------- experiment


def experiment_config(runs: Sequence[Run]) -> dict[str, Any]:
    """The settings every run shares (``CONFIG_KEYS``), and per key those that differ."""
    per_run = [settings(r) for r in runs]
    shared, varies = {}, {}
    for key in CONFIG_KEYS:
        values = sorted({json.dumps(s.get(key), default=str) for s in per_run})
        if len(values) == 1:
            shared[key] = per_run[0].get(key)
        else:
            varies[key] = [json.loads(v) for v in values]
    swept = {"residual": sorted({r.variant for r in runs}), "train.seed": sorted({get(r.config, "train.seed") for r in runs})}
    for knob, value in (("residual.n", lambda r: r.n), ("residual.t_max", lambda r: r.t_max)):
        vals = sorted({value(r) for r in runs if not r.is_baseline and value(r) is not None})
        if len(vals) > 1:
            swept[knob] = vals
    fixed = sorted({"+".join(r.fixed) or "none" for r in runs if not r.is_baseline})
    if len(fixed) > 1:
        swept["residual.fix_*"] = fixed
    return {"shared": shared, "varies": varies, "swept": swept}


def summarize_experiment(name: str, runs: Sequence[Run], *, commit: str | None, description: str = "",
                         window: float = WINDOW) -> dict[str, Any]:
    grouping = Grouping()
    groups = grouping.groups(runs)
    summaries = [run_summary(r, window) for r in runs]
    steps = {tuple(s["loss_avg_steps"] or ()) for s in summaries if s["status"] == "complete"}
    return _round({
        "format": FORMAT, "experiment": name, "description": description, "commit": commit,
        "config": experiment_config(runs),
        "loss_avg": {"window": window, "steps": sorted(steps)[0] if len(steps) == 1 else sorted(steps),
                     "what": f"mean training loss over the last {window:.0%} of the logged steps"},
        "interval": stats.METHOD + " (gap: run minus the baseline of the same seed)",
        "complete": all(r.complete for r in runs), "n_runs": len(runs),
        "runs": sorted(summaries, key=lambda s: (s["model_dim"] or 0, s["variant"], s["n"], s["t_max"] or 0,
                                                 s["fixed"], s["seed"] or 0)),
        "groups": [group_summary(g, grouping, runs, window) for g in groups],
    })


def write_results(root: str | Path, out_dir: str | Path, *, commit: str | None = None,
                  only: Sequence[str] | None = None, extra: dict[str, Any] | None = None) -> list[Path]:
    """The summaries of every experiment found under ``root`` (one per EXPERIMENTS entry whose
    directory exists) into ``out_dir/<name>.json``; ``extra`` goes to ``out_dir/reproduce.json``
    (how and when the runs were made)."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (sub, keep, description) in EXPERIMENTS.items():
        if only and name not in only:
            continue
        if not (root / sub).is_dir():
            continue
        runs = [r for r in load_runs([root / sub]) if keep(r)]
        if not runs:
            continue
        summary = summarize_experiment(name, runs, commit=commit, description=description)
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
        written.append(path)
    if extra is not None:
        path = out_dir / "reproduce.json"
        path.write_text(json.dumps(_round({"commit": commit, **extra}), indent=1) + "\n")
        written.append(path)
    if not written:
        raise AnalysisError(f"{root}: none of the experiment directories ({', '.join(sorted({v[0] for v in EXPERIMENTS.values()}))}) found")
    return written


def load_results(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` of a results directory, by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))}


if __name__ == "__main__":  # python -m mhc_train.analysis.results write RUNS_ROOT | doc [--check]
    from mhc_train.analysis.cli import results_main

    results_main()
