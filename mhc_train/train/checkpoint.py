"""Checkpoints: ``torch.distributed.checkpoint`` for the tensors, JSON for the rest, atomic by
rename, every file checksummed.

Layout of ``run_dir/checkpoints/step_0000100/``::

    .metadata, __0_0.distcp   DCP: model (router expert_bias buffers included) and optimizer,
                              keyed by parameter name (get_state_dict with flattened optimizer
                              state: one key per parameter and entry), so a run under any layout
                              (one process, DDP, FSDP, DeepSpeed, pipeline stages that each save
                              their own keys) can later read the same files; one
                              ``__<rank>_<n>.distcp`` per rank that writes tensors
    trainer_state.json        step, tokens seen, skip counters, LR scheduler, data loader
                              position, RNG states (torch, CUDA, numpy, python), W&B run id
    meta.json                 written last, the completion marker: the config, its shape
                              signature and fingerprint, and ``files``: the size and xxh3-128 hash
                              of every other file of the directory

Save, on every rank: ``dcp.save`` into ``step_0000100.tmp``; rank 0 writes trainer_state.json;
rank 0 lists the directory (after the collective, so every rank's shard is there) and each rank
hashes the files it wrote (its ``__<rank>_*.distcp``, rank 0 the rest); rank 0 writes meta.json
with all of them, fsyncs and renames the directory to ``step_0000100``. A failed write on any
rank (a full disk) removes the ``.tmp`` at once and raises CheckpointWriteError on every rank; a
process killed mid-save leaves a ``.tmp`` that resume ignores and the next launch removes.

Resume: ``verify`` re-reads every file (shared out over the ranks) against meta.json before a
checkpoint is loaded; ``load_checkpoint`` turns any failure of torch's loader (its
CheckpointException is a BaseException) and any non-finite tensor into CheckpointUnusable; the
trainer then tries the next older checkpoint. Checkpoints written before checksums existed (no
``files`` in meta.json) load unverified, with a warning.

Rotation renames a checkpoint aside (``step_0000100.old-<pid>``) before deleting it, so no
directory named ``step_*`` ever lacks a file its meta.json lists.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from mhc_train.data import atomic
from mhc_train.train.config import flatten
from mhc_train.train.errors import CheckpointError, CheckpointUnusable, CheckpointWriteError

log = logging.getLogger("mhc_train.train")

STEP_DIR = re.compile(r"^step_(\d{7,})$")
SHARD_RANK = re.compile(r"^__(\d+)_")  # DCP's file names: __<rank>_<n>.distcp
META = "meta.json"
STATE = "trainer_state.json"
FILES = "files"  # meta.json: {name: {"size": bytes, <hash algorithm>: hex digest}}
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


# ----------------------------------------------------------------------------- ranks


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (object all-gather: works on gloo and NCCL); one process: [obj].

    Then a barrier: gloo's worker thread frees the gather's tensors only once it holds the GIL,
    and a process group destroyed before that (DDP's reducer does so holding the GIL, joining
    that thread) hangs the process at exit (pytorch/pytorch#190489; seen once here, in a 2-rank
    DDP run whose last collective was this gather). The barrier's wait releases the GIL.
    """
    _, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    dist.barrier()
    return out


def _first_failure(failure: Any) -> Any:
    """Collective: the first rank's failure (None when every rank succeeded)."""
    return next((f for f in all_gather_objects(failure) if f is not None), None)


def _broadcast_from_rank0(obj: Any) -> Any:
    if _rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _owner(name: str, world: int) -> int:
    """The rank that hashes / verifies a file: the writer of a ``__<rank>_*`` shard (its bytes are
    in that rank's page cache), rank 0 for the rest; folded onto a smaller world at load time."""
    m = SHARD_RANK.match(name)
    return (int(m.group(1)) if m else 0) % world


# ----------------------------------------------------------------------------- checksums


def hash_algorithm() -> str:
    """xxh3-128 (xxhash ships with datasets and wandb; ~5 GB/s a core); sha256 without it."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def file_digest(path: Path, algorithm: str) -> str:
    if algorithm == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    else:
        h = hashlib.new(algorithm)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _file_problem(path: Path, entry: dict[str, Any], hash_it: bool) -> str | None:
    """Why ``path`` does not match its meta.json entry (None: it does)."""
    size = _size(path)
    if size is None:
        return f"{path.name} is missing"
    if size != entry.get("size"):
        return f"{path.name} has {size} bytes, {entry.get('size')} expected"
    if hash_it:
        algorithm = next((k for k in entry if k != "size"), None)
        if algorithm is None:
            return f"{path.name} has no checksum in {META}"
        try:
            if file_digest(path, algorithm) != entry[algorithm]:
                return f"{path.name} does not match its {algorithm} checksum"
        except (OSError, ValueError, ImportError) as e:
            return f"{path.name} cannot be checked ({e})"
    return None


def _read_meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {META} (not a complete checkpoint)"
    except (OSError, ValueError) as e:
        return None, f"unreadable {META} ({e})"
    files = meta.get(FILES, {}) if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        return None, f"unreadable {META} (not the expected JSON object)"
    return meta, None


def verify(path: Path) -> str | None:
    """Collective: why checkpoint ``path`` cannot be trusted, or None. Sizes are checked by every
    rank, the hashes of the files are shared out over the ranks."""
    rank, world = _rank_world()
    path = Path(path)
    meta, problem = _read_meta(path)
    if meta is not None and FILES not in meta:
        if rank == 0:
            log.warning("%s was written without checksums (an older version); loading it unverified", path)
    elif meta is not None:
        unlisted = sorted({".metadata", STATE} - set(meta[FILES]))
        if unlisted:
            problem = f"{META} does not list {', '.join(unlisted)}"
        for name in sorted(meta[FILES]):
            if problem:
                break
            problem = _file_problem(path / name, meta[FILES][name], hash_it=_owner(name, world) == rank)
    return _first_failure(problem)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Every ``step_XXXXXXX`` directory, complete or not, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def is_complete(path: Path) -> bool:
    """Named step_N with a meta.json, and every file that lists there at its size (no hashing,
    cheap enough for listings; ``verify`` reads the bytes)."""
    path = Path(path)
    if STEP_DIR.match(path.name) is None:
        return False
    meta, problem = _read_meta(path)
    if problem:
        return False
    if FILES not in meta:  # written before checksums
        return (path / STATE).is_file() and (path / ".metadata").is_file() and any(path.glob("*.distcp"))
    return all(_size(path / name) == entry.get("size") for name, entry in meta[FILES].items())


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    return [(step, p) for step, p in step_dirs(directory) if is_complete(p)]


def resume_candidates(path: Path) -> list[Path]:
    """The checkpoints ``resume=PATH`` may use, newest first: PATH itself when it is a checkpoint
    directory, else the step directories of a run or checkpoints directory."""
    path = Path(path).expanduser()
    if STEP_DIR.match(path.name) or (path / META).is_file():
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        return [path]
    for directory in (path / "checkpoints", path):
        found = step_dirs(directory)
        if found:
            return [p for _, p in reversed(found)]
    raise CheckpointError(f"{path}: no checkpoint there (expected step_XXXXXXX/ directories)")


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    meta, problem = _read_meta(Path(path))
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return meta


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


# ----------------------------------------------------------------------------- save


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, its causes, or a rank's failure inside torch's
    CheckpointException."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        if isinstance(x, CheckpointException):
            stack.extend(f[0] for f in x.failures.values() if isinstance(f, tuple) and f)
        stack.extend((x.__cause__, x.__context__))
    return None


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return (e.strerror or type(e).__name__).lower()


class CheckpointManager:
    def __init__(self, directory: Path, keep: int, rank: int = 0):
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        # The newest checkpoint this process verified and loaded, or wrote: the only one messages
        # may call intact.
        self.last_good: Path | None = None

    def candidates(self) -> list[Path]:
        """resume=auto: the step directories, newest first (damaged ones too: resume skips them
        by name, and stops when none is usable, instead of restarting from step 0)."""
        return [p for _, p in reversed(step_dirs(self.directory))]

    def remove_partial(self) -> None:
        """Delete leftovers of a process that died while writing (``.tmp``) or rotating (``.old-``)."""
        if self.rank != 0 or not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.name.endswith(".tmp") or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, state: ModelState, trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        final = self.directory / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            self._on_rank0(lambda: self._fresh(tmp))
            model_sd, optim_sd = state.state_dicts()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            self._on_rank0(lambda: atomic.write_json(tmp / STATE, trainer_state))
            files = self._checksums(tmp)
            self._on_rank0(lambda: self._complete(tmp, final, {**meta, "step": step, FILES: files}))
        except BaseException as e:  # KeyboardInterrupt (a second signal) included: no .tmp left behind
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = _os_error(e)
            if cause is None or not isinstance(e, (Exception, CheckpointException)):
                raise
            raise CheckpointWriteError(f"{_describe(cause)} writing checkpoint step {step} to {final}; "
                                       f"{self._previous()}") from None
        self.last_good = final
        return final

    def _previous(self) -> str:
        if self.last_good is None:
            return "no previous checkpoint (none yet)"
        m = STEP_DIR.match(self.last_good.name)
        step = f" step {int(m.group(1))}" if m else ""
        return f"the previous checkpoint{step} is intact ({self.last_good})"

    def _on_rank0(self, write: Callable[[], None]) -> None:
        """Collective: rank 0 writes; an OSError there is raised on every rank (the others would
        otherwise wait for rank 0 in the next collective)."""
        failure = None
        if self.rank == 0:
            try:
                write()
            except OSError as e:
                failure = e
        failure = _first_failure(failure)
        if failure is not None:
            raise failure

    def _fresh(self, tmp: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def _checksums(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """Collective: size and hash of every file rank 0 lists in ``tmp``, each hashed by its writer."""
        rank, world = _rank_world()
        names, failure = None, None
        if rank == 0:
            try:
                names = sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != META)
            except OSError as e:
                failure = e
        names, failure = _broadcast_from_rank0((names, failure))
        if failure is not None:
            raise failure
        algorithm = hash_algorithm()
        mine, failure = {}, None
        try:
            for name in names:
                if _owner(name, world) == rank:
                    mine[name] = {"size": (tmp / name).stat().st_size, algorithm: file_digest(tmp / name, algorithm)}
        except OSError as e:
            failure = e
        files: dict[str, dict[str, Any]] = {}
        for part, part_failure in all_gather_objects((mine, failure)):
            if part_failure is not None:
                raise part_failure
            files.update(part)
        return files

    def _complete(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        atomic.write_json(tmp / META, meta)
        atomic.fsync_dir(tmp)
        old = None
        if final.exists():  # the same step written again (e.g. after resuming from an older checkpoint)
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        atomic.fsync_dir(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        try:
            self._rotate()
        except OSError as e:  # the new checkpoint is complete; an old one left over is harmless
            log.warning("could not remove an old checkpoint in %s (%s)", self.directory, e)

    def _rotate(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; remove every step directory older than
        them (damaged ones included)."""
        complete = complete_checkpoints(self.directory)
        kept = complete[-self.keep:] if self.keep > 0 else []
        oldest_kept = kept[0][0] if kept else math.inf
        for step, path in step_dirs(self.directory):
            if step < oldest_kept:
                discard(path)


def discard(path: Path) -> None:
    """Delete a checkpoint so that no moment leaves a ``step_*`` directory missing files that its
    meta.json lists: rename it aside first (an atomic rename), or, where that fails, remove the
    marker first; a crash midway leaves a ``.old-`` directory that the next launch removes."""
    aside = path.with_name(f"{path.name}.old-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        (path / META).unlink(missing_ok=True)
        atomic.fsync_dir(path)
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------- load


def _one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception (of the first failed rank's, for torch's
    CheckpointException, whose own text is every rank's traceback)."""
    if isinstance(e, CheckpointException) and e.failures:
        first = next(iter(e.failures.values()))
        e = first[0] if isinstance(first, tuple) and first else e
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    line = line if len(line) <= 120 else line[:117] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _nonfinite(tensors: dict[str, dict]) -> str | None:
    """The first floating tensor with NaN / Inf (this rank's shard of a DTensor)."""
    for group, sd in tensors.items():
        for key, value in sd.items():
            local = value.to_local() if hasattr(value, "to_local") else value
            if torch.is_tensor(local) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
                return f"non-finite values in {group}.{key}"
    return None


def load_checkpoint(path: Path, state: ModelState) -> dict[str, Any]:
    """Collective: load model and optimizer in place; return the trainer state. Any failure (on
    any rank) is CheckpointUnusable on every rank; the model may then be partly overwritten, and
    the next checkpoint loaded overwrites all of it."""
    path = Path(path)

    def agree(problem: str | None) -> None:
        problem = _first_failure(problem)
        if problem is not None:
            raise CheckpointUnusable(f"{path}: {problem}")

    trainer_state, problem = None, None
    try:
        trainer_state = json.loads((path / STATE).read_text(encoding="utf-8"))
        if not isinstance(trainer_state, dict):
            problem = f"unreadable {STATE} (not a JSON object)"
    except (OSError, ValueError) as e:
        problem = f"unreadable {STATE} ({e})"
    agree(problem)
    try:  # read here first: torch's loader would log two tracebacks before it fails on a bad one
        dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        problem = f"unreadable .metadata ({_one_line(e)})"
    agree(problem)
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
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        problem = f"cannot load tensors ({_one_line(e)})"
    agree(problem)
    agree(_nonfinite(tensors))
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
