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

Exit codes: 0 done; 2 bad config / data / checkpoint; 3 training stopped (non-finite updates);
128 + signal when interrupted (after a checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from mhc_train.data import DataError
from mhc_train.train.config import CONFIG_DIR, omegaconf_message, register_configs, validate
from mhc_train.train.errors import CheckpointError, ConfigError, Interrupted, TrainingStopped

CONFIG_NAME = "config"

# Exit codes of the jobs of this process (Hydra's basic launcher runs them here, one by one).
_job_codes: list[int] = []

_SKIP_PREVALIDATION = ("help", "hydra_help", "info", "shell_completion", "cfg", "config_dir", "config_path",
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


def prevalidate(argv: Sequence[str]) -> int:
    """Compose and validate the config of every job; print one line and return 2 on error."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit as e:  # argparse already printed its usage line
        return int(e.code or 0)
    if any(getattr(args, name, None) for name in _SKIP_PREVALIDATION):
        return 0
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="mhc-train"):
            jobs = _job_overrides(args, compose)
            for overrides in jobs or []:
                run_cfg = validate(compose(args.config_name or CONFIG_NAME, overrides=overrides))
                if run_cfg.data.source == "prepared":
                    from mhc_train.train.trainer import check_data

                    check_data(run_cfg, Path(run_cfg.data.path).expanduser())
    except ConfigError as e:
        return _report(f"config error: {e}", 2)
    except (HydraException, OmegaConfBaseException) as e:
        return _report(f"config error: {hydra_error_message(e)}", 2)
    finally:
        GlobalHydra.instance().clear()
    return 0


def _report(line: str, code: int) -> int:
    print(" ".join(line.split("\n")), file=sys.stderr, flush=True)
    return code


def _task(cfg: DictConfig) -> int:
    """One job: validate, train, and turn the expected failures into one line and an exit code."""
    from hydra.core.hydra_config import HydraConfig

    try:
        run_cfg = validate(cfg)
        run_dir = HydraConfig.get().runtime.output_dir
        resolved = OmegaConf.to_container(cfg, resolve=True)
        from mhc_train.parallel.distributed import distributed, env_rank
        from mhc_train.train.trainer import Trainer

        if env_rank() > 0:
            _quiet_nonzero_rank()
        p = run_cfg.parallel
        device_type = "cuda" if run_cfg.train.device.startswith("cuda") or (
            run_cfg.train.device == "auto" and _cuda_available()) else "cpu"
        with distributed(None if p.backend == "auto" else p.backend, device_type, timeout_s=p.timeout_s):
            Trainer(run_cfg, run_dir, resolved).fit()
        code = 0
    except Interrupted as e:  # a scheduler's SIGTERM / Ctrl-C: stop the whole sweep too
        raise SystemExit(_report(f"{e.prefix}: {e}", e.exit_code)) from None
    except KeyboardInterrupt:  # a second signal while stopping
        raise SystemExit(_report("interrupted: aborted (second signal); the last checkpoint is intact", 130)) from None
    except (ConfigError, CheckpointError, TrainingStopped) as e:
        code = _report(f"{e.prefix}: {e}", e.exit_code)
    except DataError as e:
        code = _report(f"data error: {e}", 2)
    _job_codes.append(code)
    return code


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


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; ``argv`` (default ``sys.argv[1:]``) as on the command line."""
    from hydra.core.global_hydra import GlobalHydra

    argv = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    code = prevalidate(argv)
    if code:
        sys.exit(code)
    _job_codes.clear()
    saved = sys.argv
    sys.argv = [saved[0] if saved else "mhc-train", *_hydra_argv(argv)]
    try:
        GlobalHydra.instance().clear()
        _hydra_main()
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    failed = [c for c in _job_codes if c]
    if failed:
        sys.exit(failed[0] if len(set(failed)) == 1 else max(failed))


if __name__ == "__main__":
    main()
