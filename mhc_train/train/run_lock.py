"""Who may write a run directory: one process at a time, and only where it can.

    check_output_root(root)   before any directory is made: ``output_root`` is (or can become) a
                              writable directory, else ConfigError naming ``output_root``
    hold(run_dir)             rank 0, before Hydra writes ``.hydra/`` and the log: an exclusive
                              ``fcntl.flock`` on ``run_dir/.lock`` for the process's life; a second
                              holder is refused with RunDirInUse naming the first one's PID and host
    ranks_agree(ok)           under torchrun: every rank learns whether rank 0 got the lock

The kernel drops a ``flock`` when its holder dies (SIGKILL included), so a lock file left by a
dead process never blocks: only its content (PID, host, start time) stays, for the message. The
file is never deleted (deleting it would let a third process lock a new file while the second
still holds the old one). The descriptor is close-on-exec and closed in forked children, so no
child process outlives its parent holding the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from mhc_train.train.errors import ConfigError, RunDirInUse

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # resolved run dir -> descriptor of its locked .lock file


def check_output_root(root: str | os.PathLike) -> None:
    """``output_root`` is a writable directory, or one that can be created (ConfigError otherwise).

    Nothing is left behind: a probe directory is made and removed in the nearest existing
    ancestor, which catches what ``os.access`` misses for root (read-only mounts, /proc).
    """
    path = Path(root).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is not a directory" if existing == path else f"cannot be created: {existing} is not a directory"
        raise ConfigError(f"output_root: {path} {what}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mhc-train-probe-", dir=existing))
    except OSError as e:
        where = "" if existing == path else f" (in {existing})"
        raise ConfigError(f"output_root: {path} is not writable{where}: {e.strerror or e}") from None


def hold(run_dir: str | os.PathLike) -> None:
    """Lock ``run_dir`` for this process (a no-op when it already holds it); RunDirInUse if taken."""
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    Path(key).mkdir(parents=True, exist_ok=True)
    path = Path(key) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a file system without flock (some FUSE, old NFS)
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror}); make sure no other run writes {key}",
                  file=sys.stderr, flush=True)
            return
        holder = _holder(fd)
        os.close(fd)
        raise RunDirInUse(f"{key} is being written by {holder} (lock {path}); wait for it to end or stop "
                          f"it, or choose another run_name / output_root") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    _held[key] = fd


def held(run_dir: str | os.PathLike) -> bool:
    return os.path.realpath(run_dir) in _held


def release(run_dir: str | os.PathLike) -> None:
    """Unlock ``run_dir`` if this process holds it."""
    fd = _held.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    """Unlock every run directory this process holds (for in-process reuse; exit does it anyway)."""
    while _held:
        _, fd = _held.popitem()
        os.close(fd)


def _holder(fd: int) -> str:
    """'PID 123 on host h (since ...)' from the lock file; the holder writes it just after locking."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        try:
            info = json.loads(raw)
            return f"PID {info['pid']} on host {info['host']} (since {info['started']})"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process (it has not recorded its PID yet)"


def ranks_agree(ok: bool) -> bool:
    """All ranks of the process group: True only when every rank says ok. One process: ``ok``."""
    from mhc_train.train.checkpoint import all_gather_objects

    return all(all_gather_objects(bool(ok)))


def _close_in_child() -> None:
    # flock belongs to the open file description that fork shares: a child that kept it would
    # hold the lock after its parent died. The parent's descriptor keeps the lock.
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
