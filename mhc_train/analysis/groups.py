"""Which runs may be combined: a figure averages runs (as seeds) or takes the difference of two
(a loss gap) only within a *group*, the runs that agree in every setting but the residual
connection and the seed.

Everything-but, not a list of what matters: a list misses the key nobody thought of (a 30-step
and a 150-step run were once averaged "as seeds", tiny runs measured against a small-model
baseline). A setting that does not change what a run learns belongs in ``NOT_COMPARED``.

Figures draw several groups side by side (one panel each), never merged; a run that a figure
cannot use within its group (no baseline with its settings, nothing to sweep against) is set
aside, and ``mhc-plot`` prints one warning line per such run, naming it and why.
``--allow-mixed`` makes all runs one group: the old nearest-baseline pairing, each cross-group
pairing still named in a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from mhc_train.analysis.runs import WANDB_PREFIX, AnalysisError, Run, get, load_run_dir
from mhc_train.nested import flatten

# Settings in which runs of one group may differ: what the figures compare (the residual variant
# and its knobs), what they average over (the seed), and what changes how a run is executed or
# logged but not what it learns. parallel.* is here because the data-parallel degree shows in
# the tokens per step, compared instead; optim.lr and train.precision are compared as resolved
# (optim.lr: null means lr_by_size[model], precision auto means bf16 on some GPUs only), and so is
# train.matmul_precision (it changes nothing on a CPU).
NOT_COMPARED = ("residual", "train.seed", "experiment", "logging", "parallel", "run_name", "run_dir",
                "output_root", "resume", "data.cache_dir", "train.device", "train.threads",
                "train.deterministic", "train.precision", "train.eval_every", "train.eval_batches",
                "train.checkpoint_every", "train.keep_checkpoints", "train.gains_every", "train.gains_sequences",
                "train.max_consecutive_skips", "train.stop_at", "train.peak_flops", "train.activation_checkpoint",
                "train.compile", "train.matmul_precision", "optim.lr", "optim.lr_by_size")


def _compared(key: str) -> bool:
    return not any(key == p or key.startswith(p + ".") for p in NOT_COMPARED)


def settings(run: Run) -> dict[str, Any]:
    """What must agree for two runs to be averaged or differenced (flattened config keys, plus
    the resolved learning rate, precision and tokens per step)."""
    out = {k: v for k, v in flatten(run.config).items() if _compared(k)}
    lr = run.info.get("lr", get(run.config, "optim.lr"))
    if lr is None:
        lr = get(run.config, f"optim.lr_by_size.{get(run.config, 'model.name')}")
    out["lr"] = lr
    out["precision"] = run.info.get("precision", get(run.config, "train.precision"))
    # train.matmul_precision acts on CUDA only (TF32 or not); on a CPU every fp32 matmul is IEEE,
    # whatever the setting, and runs from before the key existed lack it.
    on_cuda = str(run.info.get("device", get(run.config, "train.device"))).startswith("cuda")
    out["fp32 matmuls"] = get(run.config, "train.matmul_precision", "high") if on_cuda else "ieee"
    steps, tokens = run.series("train", "tokens")
    out["tokens per step"] = int(round(tokens[0] / steps[0])) if steps and steps[0] > 0 else None
    return out


def _key(run: Run) -> str:
    return json.dumps(settings(run), sort_keys=True, default=str)


def differences(a: Run, b: Run) -> list[str]:
    """The settings in which two runs differ, ``key: a vs b`` (the model name first, the
    resolved lr, precision and tokens per step last)."""
    sa, sb = settings(a), settings(b)
    derived = ("lr", "precision", "fp32 matmuls", "tokens per step")  # after the config keys, which they follow from
    keys = sorted((k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k)),
                  key=lambda k: (k != "model.name", k in derived, k))
    return [f"{k}: {sa.get(k)} vs {sb.get(k)}" for k in keys]


def _listed(diffs: Sequence[str], most: int = 3) -> str:
    return "; ".join(diffs[:most]) + ("; ..." if len(diffs) > most else "")


def _short(key: str) -> str:
    return {"model.name": "model", "tokens per step": "tokens/step"}.get(key, key.rsplit(".", 1)[-1])


def run_path(run: Run) -> str:
    """How a warning names a run: its directory (unique, unlike run names of one sweep)."""
    return run.source if run.source.startswith(WANDB_PREFIX) else str(Path(run.source))


class Grouping:
    """The groups of one ``mhc-plot`` call's runs, and the runs its figures set aside."""

    def __init__(self, allow_mixed: bool = False):
        self.allow_mixed = allow_mixed
        self._notes: dict[int, tuple[Run, str, dict[str, str]]] = {}  # id(run) -> (run, kind, figure -> why)

    # ----------------------------------------------------------------------------- groups

    def groups(self, runs: Sequence[Run]) -> list[list[Run]]:
        """Runs split by their settings, in the order first met (one group with --allow-mixed)."""
        if self.allow_mixed:
            return [list(runs)] if runs else []
        by_key: dict[str, list[Run]] = {}
        for r in runs:
            by_key.setdefault(_key(r), []).append(r)
        return list(by_key.values())

    def describe(self, group: Sequence[Run], among: Sequence[Run]) -> str:
        """What sets a group apart from the other groups of ``among`` (``model=tiny, steps=30``);
        empty when there is one group. Other model keys are left out when the model name differs."""
        groups = self.groups(among)
        if len(groups) < 2 or not group:
            return ""
        mine = settings(group[0])
        others = [settings(g[0]) for g in groups]
        keys = sorted(k for k in mine if len({json.dumps(o.get(k), default=str) for o in others}) > 1)
        if "model.name" in keys:
            keys = ["model.name"] + [k for k in keys if not k.startswith("model.")]
        parts = [f"{_short(k)}={mine[k]}" for k in keys]
        return ", ".join(parts[:3]) + (", ..." if len(parts) > 3 else "")

    def names(self, runs: Sequence[Run]) -> dict[int, str]:
        """Per run (by id), what sets its group apart from the others among ``runs``: the legend
        suffix that tells a tiny mHC run from a small one ("" when all are comparable)."""
        out = {}
        for group in self.groups(runs):
            name = self.describe(group, runs)
            out.update({id(r): name for r in group})
        return out

    # -------------------------------------------------------------------------- baselines

    def baselines(self, runs: Sequence[Run], baseline: Run | None = None, *,
                  figure: str) -> list[tuple[Run, Run]]:
        """(run, its baseline) for every non-baseline run that has one in its group: ``baseline``
        when given, else the group's baseline run of the same seed (else the closest in the
        settings not compared, then of the same experiment). Runs without one are set aside;
        AnalysisError when no run has one."""
        others = [r for r in runs if r is not baseline and not r.is_baseline]
        if not others:
            raise AnalysisError("only baseline runs: nothing to compare to the baseline")
        bases = [baseline] if baseline is not None else [r for r in runs if r.is_baseline]
        if not bases:
            raise AnalysisError(f"no baseline run among the {len(runs)} runs (train one with residual=baseline and "
                                "the same settings, or pass --baseline RUN_DIR)")
        pairs, unpaired = [], []
        for r in others:
            same = [b for b in bases if self.allow_mixed or _key(b) == _key(r)]
            if not same:
                closest = min(bases, key=lambda b: len(differences(r, b)))
                detail = f"closest {run_path(closest)} differs in {_listed(differences(r, closest))}"
                unpaired.append(f"{run_path(r)}: {detail}")
                self.set_aside(r, figure, f"no baseline with its settings ({detail})")
                continue
            same.sort(key=lambda b: (len(differences(r, b)), get(b.config, "train.seed") != get(r.config, "train.seed"),
                                     _setting_distance(r, b), b.experiment != r.experiment))
            if differences(r, same[0]):
                self.mixed(r, figure, f"baseline {run_path(same[0])} differs in {_listed(differences(r, same[0]))}")
            pairs.append((r, same[0]))
        if not pairs:  # the figure is not drawn: its error says why, for the first run
            raise AnalysisError(f"none of the {len(others)} runs has a baseline with its settings ({unpaired[0]})")
        return pairs

    # ------------------------------------------------------------------------------ notes

    def set_aside(self, run: Run, figure: str, why: str) -> None:
        self._note(run, "set aside", figure, why)

    def mixed(self, run: Run, figure: str, why: str) -> None:
        self._note(run, "mixed across settings (--allow-mixed)", figure, why)

    def _note(self, run: Run, kind: str, figure: str, why: str) -> None:
        entry = self._notes.setdefault(id(run), (run, kind, {}))
        entry[2].setdefault(figure, why)

    def forget(self, figure: str) -> None:
        """Drop the notes of a figure that was not drawn after all: it set nothing aside."""
        for run, kind, why in list(self._notes.values()):
            why.pop(figure, None)
            if not why:
                del self._notes[id(run)]

    def warnings(self) -> list[str]:
        """One line per run set aside (or mixed), naming it, the figures and why."""
        lines = []
        for run, kind, why in self._notes.values():
            by_reason: dict[str, list[str]] = {}
            for figure, reason in why.items():
                by_reason.setdefault(reason, []).append(figure)
            text = "; ".join(f"from {', '.join(figures)}: {reason}" for reason, figures in by_reason.items())
            lines.append(f"{kind} {run_path(run)} {text}")
        return lines


def _setting_distance(a: Run, b: Run) -> int:
    """How many settings outside the comparison differ (lr schedule aside: eval frequency,
    experiment, ...): among equal baselines the closest wins."""
    fa, fb = flatten(a.config), flatten(b.config)
    keys = {k for k in set(fa) | set(fb) if not k.startswith(("residual", "run_name", "run_dir"))}
    return sum(fa.get(k) != fb.get(k) for k in keys)


def find_baseline(runs: Sequence[Run], spec: str | None) -> Run | None:
    """The run named by ``--baseline`` (a directory among the runs, or a run name)."""
    if spec is None:
        return None
    for r in runs:
        if r.name == spec or (not r.source.startswith(WANDB_PREFIX) and Path(spec).exists()
                              and Path(r.source).resolve() == Path(spec).resolve()):
            return r
    try:
        return load_run_dir(spec)
    except (AnalysisError, OSError):
        raise AnalysisError(f"--baseline {spec}: not among the runs and not a run directory") from None
