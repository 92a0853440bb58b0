"""The runs a ``mhc-train`` command line starts, and where each one stands, without training.

    python -m mhc_train.analysis.sweeps -m experiment=sweep_n
    python -m mhc_train.analysis.sweeps -m experiment=sweep_n residual=mhc output_root=/data/runs
    python -m mhc_train.analysis.sweeps experiment=sweep_n residual=baseline      # one run (no -m)

takes the arguments of ``mhc-train`` and prints one line per job: its state (complete / partial
at step k / not started, from its metrics.jsonl), its run directory and its overrides; the last
line counts the complete ones (exit code 0 either way). With ``-m`` the expansion is Hydra's
own: the experiment's ``hydra.sweeper.params`` first, then the command line's overrides (a key
given on both: the command line wins), the cartesian product by the basic sweeper; each job's
directory is the trainer's ``hydra.sweep.dir/hydra.sweep.subdir`` for that job's overrides.
Without ``-m`` it is the one run of ``hydra.run.dir`` (the sweeper's params do not apply).

This is the one corner of the analysis package that reads the trainer's config tree (to know
what a sweep will run); it imports it lazily and trains nothing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mhc_train.analysis.runs import METRICS, AnalysisError, load_run_dir


@dataclass
class Job:
    overrides: list[str]  # as the sweeper passes them to the job
    run_dir: Path  # relative to the working directory unless output_root is absolute
    steps: int  # train.steps of the job

    def state(self) -> str:
        """complete / stopped (step k) / partial (step k) / not started, from the run's
        metrics.jsonl. Stopped: the trainer ended it for non-finite updates (a diverged run), an
        outcome that a relaunch would only repeat."""
        if not (self.run_dir / METRICS).is_file():
            return "not started"
        try:
            run = load_run_dir(self.run_dir)
        except (AnalysisError, OSError):
            return "not started"
        if run.complete:
            return "complete"
        ends = [r for r in run.records if r.get("kind") == "end"]
        if ends and ends[-1].get("status") == "stopped":
            return f"stopped (step {run.steps_done}, diverged)"
        return f"partial (step {run.steps_done} of {self.steps})"


def expand(overrides: Sequence[str], config_name: str = "config", multirun: bool = True) -> list[Job]:
    """The jobs of ``mhc-train -m <overrides>`` (``multirun=False``: the run of ``mhc-train <overrides>``)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from mhc_train.train.config import CONFIG_DIR, register_configs

    register_configs()
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    # The experiment (and any other group choice) decides the sweeper's params: compose once
    # with the first value of every swept override to read them.
    first = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            first.append(f"{key}={next(iter(o.sweep_string_iterator()))}")
        else:
            first.append(f"{key}={o.get_value_element_as_str()}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="mhc-train"):
            master = compose(config_name, overrides=first, return_hydra_config=True)
            if not multirun:
                if any(o.is_sweep_override() for o in parsed):
                    raise ValueError("a sweep (a=x,y) needs -m, as with mhc-train")
                run_dir = Path(str(master.hydra.run.dir))
                return [Job(list(overrides), run_dir, int(master.train.steps))]
            params = master.hydra.sweeper.get("params")  # None for an experiment without sweep params
            params = OmegaConf.to_container(params, resolve=False) if params else {}
            lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
            batches = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
            jobs = []
            for job_overrides in (job for batch in batches for job in batch):
                cfg = compose(config_name, overrides=job_overrides, return_hydra_config=True)
                run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                jobs.append(Job(list(job_overrides), run_dir, int(cfg.train.steps)))
            return jobs
    finally:
        GlobalHydra.instance().clear()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        jobs = expand([a for a in argv if a not in ("-m", "--multirun")], multirun=multirun)
    except Exception as e:  # Hydra's composition errors: one line
        msg = " ".join(str(e).split("Config search path")[0].split()) or type(e).__name__
        print(f"mhc-sweep-plan: error: {msg}", file=sys.stderr)
        sys.exit(2)
    for job in jobs:
        print(f"{job.state():28s} {job.run_dir}  [{' '.join(job.overrides)}]")
    done = sum(job.state() == "complete" for job in jobs)
    print(f"{len(jobs)} jobs, {done} complete (skipped when the sweep is launched again)")


if __name__ == "__main__":
    main()
