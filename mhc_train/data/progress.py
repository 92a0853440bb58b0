"""The progress of a preparation on disk: what lets it resume after a crash and run in parts.

    out_dir/progress/plan.json                 the plan (units, inputs, settings), written before any
                                               shard; its "id" names it on every machine
    out_dir/progress/done/train_00012.json     one record per finished unit, written (atomically)
                                               after the unit's shards are in place
    out_dir/progress/part-0-of-2.lock          an OS lock held while a process works on that part

A unit counts as done when its record exists, names this plan and its shards have the recorded
sizes; anything else is redone. Every file is written under a temporary name and renamed, so a
kill at any moment leaves complete files plus temporaries, which the next run of that part removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import atomic
from .errors import DataError
from .tokenize_unit import shard_name, unit_outputs

PROGRESS_DIR = "progress"
PLAN_NAME = "plan.json"


def plan_path(out_dir: Path) -> Path:
    return out_dir / PROGRESS_DIR / PLAN_NAME


def read_plan(out_dir: Path) -> dict | None:
    try:
        return json.loads(plan_path(out_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{plan_path(out_dir)}: not valid JSON ({e}); remove {out_dir} to start over") from None


def write_plan(out_dir: Path, plan: dict) -> None:
    (out_dir / PROGRESS_DIR / "done").mkdir(parents=True, exist_ok=True)
    old = read_plan(out_dir)
    if old is None or old["id"] != plan["id"]:
        atomic.write_json(plan_path(out_dir), plan)


def all_units(plan: dict) -> list[tuple[str, int]]:
    """Every unit of the plan in its fixed order (train first); part i of N takes every N-th."""
    return [(s, i) for s, sp in plan["splits"].items() for i in range(len(sp["units"]))]


def part_units(plan: dict, part: tuple[int, int]) -> list[tuple[str, int]]:
    i, n = part
    return all_units(plan)[i::n]


def _record_path(out_dir: Path, split: str, unit: int) -> Path:
    return out_dir / PROGRESS_DIR / "done" / f"{split}_{unit:05d}.json"


def write_done(out_dir: Path, record: dict) -> None:
    atomic.write_json(_record_path(out_dir, record["split"], record["unit"]), record)


def _valid(out_dir: Path, plan: dict, record: dict) -> bool:
    itemsize = np.dtype(plan["dtype"]).itemsize
    for out in record["outputs"].values():
        if out["file"] is not None:
            f = out_dir / out["file"]
            if not f.is_file() or f.stat().st_size != out["num_tokens"] * itemsize:
                return False
    return record.get("plan_id") == plan["id"]


def done_records(out_dir: Path, plan: dict) -> dict[tuple[str, int], dict]:
    """The valid done records in ``out_dir``, by (split, unit)."""
    out = {}
    for split, unit in all_units(plan):
        try:
            record = json.loads(_record_path(out_dir, split, unit).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if _valid(out_dir, plan, record):
            out[(split, unit)] = record
    return out


def unit_files(plan: dict, split: str, unit: int) -> list[str]:
    return [shard_name(s, unit) for s in unit_outputs(plan, split)]


def remove_temporaries(out_dir: Path, plan: dict, units: list[tuple[str, int]]) -> None:
    """Remove what killed writers of these units left (``.NAME.tmp-*``). Only these units: another
    part may be writing its own right now."""
    names = {n for s, i in units for n in unit_files(plan, s, i)}
    names |= {_record_path(out_dir, s, i).name for s, i in units}
    for d in (out_dir, out_dir / PROGRESS_DIR / "done"):
        for entry in os.scandir(d) if d.is_dir() else ():
            if entry.name.startswith(".") and ".tmp-" in entry.name and entry.name[1:].split(".tmp-")[0] in names:
                Path(entry.path).unlink(missing_ok=True)


@contextlib.contextmanager
def part_lock(out_dir: Path, part: tuple[int, int]) -> Iterator[None]:
    """Hold ``part-i-of-N.lock`` (released by the kernel when the process dies, however it dies):
    a second process preparing the same part into the same directory is refused."""
    path = out_dir / PROGRESS_DIR / f"part-{part[0]}-of-{part[1]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            raise DataError(f"{out_dir}: part {part[0]}/{part[1]} is being prepared by {holder}; wait for it "
                            "or stop it (a killed one releases the lock at once)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content, atomically: a hard link (no extra disk) where the file
    system allows, else a copy."""
    tmp = atomic.temp_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as fin, atomic.atomic_open(dst, "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)
        return
    os.replace(tmp, dst)


def records_summary(records: dict[tuple[str, int], Any], plan: dict) -> str:
    missing = [f"{s} {i}" for s, i in all_units(plan) if (s, i) not in records]
    shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
    return f"{len(missing)} of {len(all_units(plan))} units missing ({shown})"
