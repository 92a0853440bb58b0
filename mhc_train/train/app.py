"""``mhc-train`` (also ``python -m mhc_train.train``): the Hydra application.

    mhc-train                                         defaults: small model, mHC, bundled corpus
    mhc-train model=tiny residual=hc train.steps=50   any key of configs/ as an override
    mhc-train -m residual=baseline,hc,mhc experiment=quickstart
    mhc-train --cfg job                               print the composed config

Before Hydra starts a run, every job's config (each combination of a ``-m`` sweep) is composed
with ``hydra.compose`` and validated; an unknown key, a wrong type or an impossible combination
stops there with one line on stderr (``config error: <key>: <reason>``) and exit code 2, before
any directory is created. Errors found inside a job (an incompatible checkpoint, too many
non-finite steps) are one line too; Hydra's multi-line reports are reserved for bugs.

Before Hydra writes anything into a run directory (``.hydra/``, the log), rank 0 takes the run
directory's lock (``run_lock.hold``): a second run in the same directory stops there with one
line naming the holder, exit 2; under torchrun the other ranks learn it in their first
collective and stop too. An ``output_root`` that is not a writable directory is refused in the
pre-validation, before any directory exists.

Exit codes: 0 done; 2 bad config / data / checkpoint, or the run directory in use; 3 training
stopped (non-finite updates); 4 a checkpoint could not be written (disk full); 128 + signal when
interrupted (after a checkpoint).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mhc_train.data import DataError
from mhc_train.train.config import CONFIG_DIR, omegaconf_message, register_configs, validate
from mhc_train.train.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    Interrupted,
    RunDirInUse,
    TrainingStopped,
)

CONFIG_NAME = "config"

# Exit codes of the jobs of this process (Hydra's basic launcher runs them here, one by one).
_job_codes: list[int] = []

# Nothing to validate (--cfg is validated, then printed by Hydra without a run).
_SKIP_PREVALIDATION = ("help", "hydra_help", "info", "shell_completion", "config_dir", "config_path",
                       "experimental_rerun")


def hydra_error_message(e: BaseException) -> str:
    """One line for a Hydra composition / override error: ``key: reason``."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = f" (available: {', '.join(e.options)})" if e.options else ""
        return f"{group}: unknown option {name!r}{options}"
    if isinstance(e, OverrideParseException):
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith("See ")]
        return f"override {e.override!r}: {lines[-1] if lines else 'cannot be parsed'}"
    cause = e.__cause__
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        return omegaconf_message(cause)
    if isinstance(e, OmegaConfBaseException):
        return omegaconf_message(e)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    if first.startswith("Ambiguous value for argument"):
        first += " (to sweep over the values, add -m / --multirun; for a list, use key=[a,b])"
    return first


def _job_overrides(args, compose) -> list[list[str]] | None:
    """The overrides of every job this command line starts (None: cannot tell, skip checking).

    For ``-m`` this expands the sweep as Hydra's basic sweeper does: the config's
    ``hydra.sweeper.params`` (experiments may set them) first, the command line after them.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(args.overrides)
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    if not args.multirun:
        return [overrides]
    base = [line for line, o in zip(overrides, parsed) if not o.is_sweep_override()]
    hydra_cfg = compose(args.config_name or CONFIG_NAME, overrides=base, return_hydra_config=True).hydra
    if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None  # another sweeper expands the sweep its own way
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    try:
        return [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)
                for job in batch]
    except Exception:
        return None


@dataclass
class PlannedJob:
    """A job of this command line as the pre-validation composed it."""

    run_cfg: object  # RunConfig
    run_dir: str | None  # absolute, as Hydra will make it (None: cannot tell before Hydra runs)


def _planned_run_dir(cfg: DictConfig, multirun: bool) -> str | None:
    """The job's run directory as Hydra will make it (``_task`` locks it then, if this is None)."""
    keys = ("hydra.sweep.dir", "hydra.sweep.subdir") if multirun else ("hydra.run.dir",)
    try:
        parts = [OmegaConf.select(cfg, key, throw_on_missing=True) for key in keys]
    except Exception:  # e.g. a subdir naming ${hydra.job.num}, known only inside the sweep
        return None
    if any(part is None for part in parts):
        return None
    return os.path.abspath(os.path.join(*map(str, parts)))


def prevalidate(argv: Sequence[str]) -> tuple[int, list[PlannedJob] | None]:
    """Compose and validate the config of every job; print one line and return 2 on error.
    Also returns the jobs (None for --cfg, --help and other sweepers: nothing to plan)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mhc_train.train.run_lock import check_output_root

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit as e:  # argparse already printed its usage line
        return int(e.code or 0), None
    if any(getattr(args, name, None) for name in _SKIP_PREVALIDATION):
        return 0, None
    GlobalHydra.instance().clear()
    planned: list[PlannedJob] = []
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="mhc-train"):
            jobs = _job_overrides(args, compose)
            checked_roots = set()
            for overrides in jobs or []:
                _refuse_group_lists(overrides)
                try:
                    cfg = compose(args.config_name or CONFIG_NAME, overrides=overrides, return_hydra_config=True)
                except ValueError as e:  # Hydra's own, for an override such as "=5"
                    bad = [o for o in overrides if not o.partition("=")[0].strip()] or overrides
                    raise ConfigError(f"override {' '.join(bad)!r}: {e}") from None
                run_cfg = validate(cfg)
                check_device(run_cfg.train.device)
                if args.cfg:
                    continue  # Hydra prints the config; no run, no directory
                if run_cfg.data.source == "prepared":
                    from mhc_train.train.trainer import check_data

                    check_data(run_cfg, Path(run_cfg.data.path).expanduser())
                if cfg.output_root not in checked_roots:
                    check_output_root(cfg.output_root)
                    checked_roots.add(cfg.output_root)
                planned.append(PlannedJob(run_cfg, _planned_run_dir(cfg, args.multirun)))
    except ConfigError as e:
        return _report(f"config error: {e}", 2), None
    except DataError as e:
        return _report(f"data error: {e}", 2), None
    except (HydraException, OmegaConfBaseException) as e:
        return _report(f"config error: {hydra_error_message(e)}", 2), None
    finally:
        GlobalHydra.instance().clear()
    return 0, (planned if jobs is not None and not args.cfg else None)


def _refuse_group_lists(overrides: list[str]) -> None:
    """``model=[tiny,small]`` is Hydra's syntax for merging several configs of a group into one (the
    last one wins, silently): a mistake for a sweep or a choice here, so it is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        group = override.key_or_group
        if (CONFIG_DIR / group).is_dir() and isinstance(override.value(), list):
            names = ",".join(map(str, override.value()))
            raise ConfigError(f"{group}: a list ({override.input_line}) would merge several {group} configs into "
                              f"one; choose one ({group}=NAME), or sweep over them with -m {group}={names}")


def check_device(device: str) -> None:
    """A CUDA device is asked for and none is visible: refused before any directory is made."""
    if device.startswith("cuda") and not _cuda_available():
        raise ConfigError(f"train.device: {device} requested, but CUDA is not available "
                          f"(train.device=auto picks the CPU here)")


def _report(line: str, code: int) -> int:
    print(" ".join(line.split("\n")), file=sys.stderr, flush=True)
    return code


def _process_group(run_cfg):
    """``distributed(...)`` for this job's config: the backend, device type and timeout."""
    from mhc_train.parallel.distributed import distributed

    p = run_cfg.parallel
    device_type = "cuda" if run_cfg.train.device.startswith("cuda") or (
        run_cfg.train.device == "auto" and _cuda_available()) else "cpu"
    return distributed(None if p.backend == "auto" else p.backend, device_type, timeout_s=p.timeout_s)


def _hold_run_dir(run_dir: str) -> None:
    """Rank 0 holds the run directory (already since ``main`` when the directory was known before
    Hydra); every rank learns the outcome, so all of them stop when rank 0 is refused."""
    from mhc_train.parallel.distributed import env_rank
    from mhc_train.train import run_lock

    refused = None
    if env_rank() == 0:
        try:
            run_lock.hold(run_dir)
        except RunDirInUse as e:
            refused = e
    if not run_lock.ranks_agree(refused is None):
        # the whole sweep stops (its other jobs would meet the same holder); ranks > 0 stay quiet
        raise SystemExit(_report(f"{refused.prefix}: {refused}", refused.exit_code) if refused
                         else RunDirInUse.exit_code)


def _task(cfg: DictConfig) -> int:
    """One job: validate, train, and turn the expected failures into one line and an exit code."""
    from hydra.core.hydra_config import HydraConfig

    trainer = None
    try:
        run_cfg = validate(cfg)
        run_dir = HydraConfig.get().runtime.output_dir
        resolved = OmegaConf.to_container(cfg, resolve=True)
        from mhc_train.parallel.distributed import env_rank
        from mhc_train.train.trainer import Trainer

        if env_rank() > 0:
            _quiet_nonzero_rank()
        with _process_group(run_cfg):
            _hold_run_dir(run_dir)
            trainer = Trainer(run_cfg, run_dir, resolved)
            trainer.fit()
        code = 0
    except Interrupted as e:  # a scheduler's SIGTERM / Ctrl-C: stop the whole sweep too
        raise SystemExit(_report(f"{e.prefix}: {e}", e.exit_code)) from None
    except KeyboardInterrupt:  # a second signal while stopping
        last = trainer.ckpts.last_good if trainer is not None and trainer.ckpts is not None else None
        state = (f"the last checkpoint, {last}, is intact; the same command continues from it" if last else
                 "no checkpoint was saved or resumed from by this run")
        # the first signal once training runs only asks to stop; a KeyboardInterrupt is then the second
        how = "aborted (second signal)" if trainer is not None and trainer.handling_signals else "stopped while starting"
        raise SystemExit(_report(f"interrupted: {how}; {state}", 130)) from None
    except (ConfigError, DataError, CheckpointError) as e:  # found inside the job, before or as it began
        _remove_if_unused(HydraConfig.get().runtime.output_dir)
        code = _report(f"{getattr(e, 'prefix', 'data error')}: {e}", 2)
    except (CheckpointWriteError, TrainingStopped) as e:
        code = _report(f"{e.prefix}: {e}", e.exit_code)
    _job_codes.append(code)
    return code


# What a launch writes into a run directory before the run begins (Hydra's record, the log, the lock).
_LAUNCH_FILES = (".hydra", "mhc-train.log", ".lock")


def _remove_if_unused(run_dir: str) -> None:
    """A config or data error found inside a job: rank 0 removes the run directory when it holds
    only what this launch wrote before the run began, so a failed start leaves nothing behind
    (a directory with metrics or checkpoints is never touched)."""
    import shutil

    from mhc_train.parallel.distributed import env_rank
    from mhc_train.train import run_lock

    path = Path(run_dir)
    if env_rank() != 0 or not path.is_dir() or any(p.name not in _LAUNCH_FILES for p in path.iterdir()):
        return
    run_lock.release(path)
    shutil.rmtree(path, ignore_errors=True)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _quiet_nonzero_rank() -> None:
    """Ranks > 0 under torchrun: warnings only, and no second writer of the run's log file."""
    import logging

    root = logging.getLogger()
    for h in root.handlers[:]:
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.WARNING)
    logging.getLogger("mhc_train").setLevel(logging.WARNING)


def _hydra_argv(argv: list[str]) -> list[str]:
    """Every torchrun process runs Hydra with the same overrides (so the same run directory);
    only rank 0 writes ``.hydra/`` (the others would race on the same files)."""
    import os

    if int(os.environ.get("RANK", "0") or 0) > 0 and not any(a.startswith("hydra.output_subdir=") for a in argv):
        return [*argv, "hydra.output_subdir=null"]
    return argv


def _hydra_main() -> None:
    import hydra

    hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")(_task)()


def _hold_planned_run_dirs(jobs: list[PlannedJob]) -> None:
    """Rank 0 locks the run directory of every job before Hydra writes ``.hydra/`` or the log
    there (a sweep: all of its directories, so a sweep with one busy directory starts none).
    Refused under torchrun, it still joins the process group once, so that the other ranks,
    waiting in their first collective (``_hold_run_dir``), stop with it instead of timing out."""
    from mhc_train.parallel.distributed import env_rank, env_world_size
    from mhc_train.train import run_lock

    if env_rank() != 0:
        return
    try:
        for job in jobs:
            if job.run_dir is not None:
                run_lock.hold(job.run_dir)
    except RunDirInUse as e:
        run_lock.release_all()
        if env_world_size() > 1 and jobs:
            with _process_group(jobs[0].run_cfg):
                run_lock.ranks_agree(False)
        raise SystemExit(_report(f"{e.prefix}: {e}", e.exit_code)) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; ``argv`` (default ``sys.argv[1:]``) as on the command line."""
    from hydra.core.global_hydra import GlobalHydra

    from mhc_train.train import run_lock

    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    try:
        code, jobs = prevalidate(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up: nothing was made, nothing to say but that
        sys.exit(_report("interrupted: stopped while starting (nothing was written)", 130))
    if code:
        sys.exit(code)
    _job_codes.clear()
    saved = sys.argv
    sys.argv = [saved[0] if saved else "mhc-train", *_hydra_argv(argv)]
    try:
        _hold_planned_run_dirs(jobs or [])
        GlobalHydra.instance().clear()
        _hydra_main()
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
        run_lock.release_all()
    failed = [c for c in _job_codes if c]
    code = (failed[0] if len(set(failed)) == 1 else max(failed)) if failed else 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker(code)
    if code:
        sys.exit(code)


def _exit_worker(code: int) -> None:
    """End a torchrun worker without the interpreter's shutdown. Everything is written and the
    process group destroyed by now; under CPU contention a worker was seen to hang for good in
    that shutdown (a futex wait after its last step, with gloo's threads still being torn down),
    which left torchrun waiting on it. Flush what Python would flush, then leave."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
