"""Write files so that a reader never sees a half-written one.

Everything is first written under a hidden temporary name in the same directory (same file system,
so the final ``os.replace`` is an atomic rename), flushed and fsync'ed, and only then given its final
name. A crash or exception leaves at most a ``.*.tmp-*`` file, which is removed on the error path.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator


def temp_name(final: Path) -> Path:
    """A unique hidden sibling of ``final``; pid + random suffix so concurrent writers never collide."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``final`` only if the ``with`` block succeeds."""
    final = Path(final)
    tmp = temp_name(final)
    encoding = None if "b" in mode else "utf-8"
    f = open(tmp, mode, encoding=encoding, newline="" if encoding else None)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_open(final, "wb") as f:
        f.write(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    # newline="" (set in atomic_open) so "\n" is written as-is on every platform.
    with atomic_open(final, "w") as f:
        f.write(text)


def write_json(final: str | os.PathLike, obj: Any) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of ``path`` (a rename into it, a new file) durable; best effort, as some
    file systems refuse to fsync a directory."""
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
