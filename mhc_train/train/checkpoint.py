"""Checkpoints: ``torch.distributed.checkpoint`` for the tensors, JSON for the rest, atomic by rename.

Layout of ``run_dir/checkpoints/step_0000100/``::

    .metadata, __0_0.distcp   DCP: model (router expert_bias buffers included) and optimizer,
                              keyed by parameter name (get_state_dict with flattened optimizer
                              state: one key per parameter and entry), so a run under any layout
                              (one process, DDP, FSDP, DeepSpeed, pipeline stages that each save
                              their own keys) can later read the same files
    trainer_state.json        step, tokens seen, skip counters, LR scheduler, data loader
                              position, RNG states (torch, CUDA, numpy, python), W&B run id
    meta.json                 written last: the config, its shape signature and fingerprint

Everything is first written to ``step_0000100.tmp`` and renamed to ``step_0000100`` only when
complete (files fsync'ed), so a process killed mid-write leaves a ``.tmp`` directory that
``latest()`` ignores and the next save removes; the previous checkpoint stays loadable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from mhc_train.data import atomic
from mhc_train.train.config import flatten
from mhc_train.train.errors import CheckpointError

log = logging.getLogger("mhc_train.train")

STEP_DIR = re.compile(r"^step_(\d{7,})$")
META = "meta.json"
STATE = "trainer_state.json"
# Keys whose difference between a checkpoint and the run resuming it is expected.
IGNORED_DIFFERENCES = ("run_dir", "resume", "train.stop_at", "train.threads", "train.device", "logging.",
                       "output_root", "data.cache_dir", "data.path", "train.inject_nonfinite_at", "parallel.timeout_s")


# One key per parameter for the optimizer state too ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"):
# pipeline ranks then save disjoint keys and any layout loads the subset it holds.
STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelState:
    """What a checkpoint holds of the tensors: a module and its optimizer, FQN-keyed. Layouts with
    another optimizer structure (DeepSpeed's ZeRO partitions) provide the same two methods."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dicts(self) -> tuple[dict, dict]:
        return get_state_dict(self.module, self.optimizer, options=STATE_OPTIONS)

    def load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        set_state_dict(self.module, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=STATE_OPTIONS)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist_ready():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    path = Path(path)
    return (STEP_DIR.match(path.name) is not None and (path / META).is_file() and (path / STATE).is_file()
            and (path / ".metadata").is_file())


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the newest complete one of a run or checkpoints dir."""
    path = Path(path).expanduser()
    if is_complete(path):
        return path
    for directory in (path / "checkpoints", path):
        found = complete_checkpoints(directory)
        if found:
            return found[-1][1]
    raise CheckpointError(f"{path}: no complete checkpoint there (expected step_XXXXXXX/ with {META})")


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {META} ({e})") from None


def check_compatible(path: Path, meta: dict[str, Any], signature: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Refuse a checkpoint whose tensors do not fit this run; return the other differences."""
    saved = meta.get("signature", {})
    diffs = [f"{k} {saved.get(k)!r} (checkpoint) vs {v!r} (this run)"
             for k, v in signature.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} does not fit this run: {'; '.join(diffs)}. "
                              f"Start fresh with resume=none, or pick another run_name / experiment.name")
    before, now = flatten(meta.get("config", {})), flatten(config)
    changed = []
    for key in sorted(set(before) | set(now)):
        if any(key == p or key.startswith(p) for p in IGNORED_DIFFERENCES):
            continue
        if before.get(key) != now.get(key):
            changed.append(f"{key}: {before.get(key)!r} -> {now.get(key)!r}")
    return changed


class CheckpointManager:
    def __init__(self, directory: Path, keep: int, rank: int = 0):
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.directory)
        return found[-1][1] if found else None

    def remove_partial(self) -> None:
        """Delete ``*.tmp`` leftovers of a process that died while writing."""
        if self.rank != 0 or not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.name.endswith(".tmp") or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, state: ModelState, trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        final = self.directory / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        model_sd, optim_sd = state.state_dicts()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        if self.rank == 0:
            atomic.write_json(tmp / STATE, trainer_state)
            atomic.write_json(tmp / META, {**meta, "step": step})
            _fsync_dir(tmp)
            old = None
            if final.exists():  # the same step written again (e.g. a run restarted from scratch)
                old = final.with_name(f"{final.name}.old-{os.getpid()}")
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._rotate()
        _barrier()
        return final

    def _rotate(self) -> None:
        found = complete_checkpoints(self.directory)
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, state: ModelState) -> dict[str, Any]:
    """Load model and optimizer in place; return the trainer state."""
    path = Path(path)
    try:
        trainer_state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE} ({e})") from None
    model_sd, optim_sd = state.state_dicts()  # the template; initialises empty optimizer state
    tensors = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({"model": tensors["model"]}, checkpoint_id=str(path))
            # Parameters that never received a gradient (e.g. HC's dynamic post weights under
            # residual.fix_post) have no optimizer state in the checkpoint; they keep the empty
            # state get_state_dict created, which is what the optimizer would create lazily.
            dcp.load({"optim": tensors["optim"]}, checkpoint_id=str(path),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
    except Exception as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: cannot load tensors ({first[-1] if first else type(e).__name__})") from None
    _warn_missing_optimizer_state(path, tensors["optim"])
    state.load_state_dicts(tensors["model"], tensors["optim"])
    return trainer_state


def _warn_missing_optimizer_state(path: Path, optim_sd: dict) -> None:
    """Optimizer entries this run has and the checkpoint lacks start fresh: say how many (the
    hyper-parameters in param_groups come from this run's config anyway)."""
    try:
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception:  # unreadable metadata already failed the load above
        return
    missing = [k for k in optim_sd if k.startswith("state.") and f"optim.{k}" not in saved]
    if missing:
        params = sorted({k[len("state."):].rsplit(".", 1)[0] for k in missing})
        log.warning("%s: no optimizer state for %d parameter(s) (e.g. %s); their AdamW moments start at zero",
                    path, len(params), params[0])


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
