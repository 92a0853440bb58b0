"""Tokenize a document source into packed token shards (format: ``meta.py``), streaming, in
worker processes, resumable, and in parts that several machines can run.

    plan = make_plan(source, tokenizer, ...)     cut the inputs into units; every input check; nothing written
    out_dir/progress/plan.json                   written first
    each unit of this part, not done yet:        a worker streams its documents, tokenizes them and
        train_{u}.bin [validation_{u}.bin]       writes its shards (temporary name, then renamed)
        progress/done/{split}_{u}.json           then the coordinator marks it done
    all units of all parts done?  meta.json      written last: the directory is now complete

Resume: run the same command again; units with a valid done record are skipped, the rest redone
from their start (a unit is at most ``unit_bytes`` of input). Parts: ``part=(i, N)`` takes every
N-th unit; N machines write into one shared directory (the last to finish writes meta.json), or
into their own directories joined by ``merge_parts``. Either way the shards are byte-identical to
a single uninterrupted run: a unit's shards depend on the unit alone.

Disk: the output, plus one temporary shard per worker; no copy of the corpus (``datasets`` is used
in streaming mode for hub sources, local files are read directly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from . import atomic
from .errors import DataError
from .hf_tokenizer import CONFIG_NAME
from .meta import FORMAT, META_NAME, VERSION, dtype_name, token_dtype
from .progress import (
    PROGRESS_DIR, all_units, done_records, link_or_copy, part_lock, part_units, read_plan, records_summary,
    remove_temporaries, unit_files, write_done, write_plan,
)
from .sources import Source
from .tokenize_unit import init_worker, reset_worker, tokenize_unit, unit_outputs
from .tokenizer import load_tokenizer
from .units import hub_splits, plan_split

log = logging.getLogger(__name__)

DEFAULT_UNIT_BYTES = 64 << 20  # input per unit (~16M tokens, ~1 min of one core): the resume granularity
PLAN_FORMAT = "mhc-train-prepare-plan"


def _portable(plan: dict) -> dict:
    """The plan without what differs between machines preparing the same corpus (absolute paths)."""
    view = json.loads(json.dumps(plan))
    view.pop("id", None)
    view["source"].pop("files", None)
    for sp in view["splits"].values():
        sp.pop("where", None)
        for f in sp["files"]:
            f.pop("path", None)
    return view


def make_plan(source: Source, tokenizer, *, unit_bytes: int = DEFAULT_UNIT_BYTES, val_fraction: float = 0.01,
              seed: int = 0, extra_meta: dict | None = None) -> dict[str, Any]:
    """Everything a preparation will do, decided before anything is written: the units of each
    split, the carve-out, the tokenizer and the token dtype. Its ``id`` is a hash of the portable
    part, equal on every machine that sees the same inputs and settings."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    splits = hub_splits(source) if source.hub_name else source.splits()
    if "train" not in splits:
        raise DataError(f"{source.hub_name or 'the source'}: has no 'train' split")
    plan = {
        "format": PLAN_FORMAT, "version": 1,
        "tokenizer": {"kind": tokenizer.kind, "file": tokenizer.file_name, "sha256": tokenizer.sha256,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id},
        "dtype": dtype_name(token_dtype(tokenizer.vocab_size)),
        "unit_bytes": unit_bytes, "val_fraction": val_fraction, "seed": seed,
        "carve_every": max(2, round(1 / val_fraction)) if "validation" not in splits and val_fraction > 0 else 0,
        "source": source.describe(), "extra": extra_meta or {},
        "splits": {s: plan_split(source, s, unit_bytes) for s in splits},
    }
    plan["id"] = hashlib.sha256(json.dumps(_portable(plan), sort_keys=True).encode()).hexdigest()[:24]
    return plan


def _check_part(part: tuple[int, int]) -> tuple[int, int]:
    i, n = part
    if n < 1 or not 0 <= i < n:
        raise DataError(f"part {i}/{n}: need 0 <= i < N")
    return i, n


def _differs(old: dict, new: dict) -> str:
    a, b = _portable(old), _portable(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(keys) or "inputs"


def _existing(out_dir: Path, plan: dict, overwrite: bool) -> tuple[dict | None, bool]:
    """(the complete meta when ``out_dir`` already holds this preparation, whether another one must
    be cleared first). Another preparation is refused unless ``overwrite``."""
    old_plan = read_plan(out_dir) if out_dir.is_dir() else None
    has_meta = (out_dir / META_NAME).is_file()
    if old_plan is not None and old_plan["id"] == plan["id"]:
        return (json.loads((out_dir / META_NAME).read_text(encoding="utf-8")) if has_meta else None), False
    if old_plan is None and not has_meta:
        return None, False
    if not overwrite:
        what = "a prepared dataset" if has_meta else "an unfinished preparation"
        differs = f" (differs in: {_differs(old_plan, plan)})" if old_plan else ""
        raise DataError(f"{out_dir}: holds {what} of other inputs or settings{differs}; run the same command "
                        "as before to resume it, choose another directory, or pass --overwrite (overwrite=True)")
    return None, True


def _clear(out_dir: Path) -> None:
    """Remove another preparation's outputs (not the lock files: this process holds one)."""
    (out_dir / META_NAME).unlink(missing_ok=True)
    progress = out_dir / PROGRESS_DIR
    shutil.rmtree(progress / "done", ignore_errors=True)
    (progress / "plan.json").unlink(missing_ok=True)
    for old in list(out_dir.glob("train_*.bin")) + list(out_dir.glob("validation_*.bin")):
        old.unlink()


def _run_units(todo, plan: dict, source: Source, tokenizer, out_dir: Path, num_proc: int):
    """Done records of the units in ``todo`` as they finish: in this process, or in a pool of
    ``num_proc`` spawned workers (spawn: no inherited threads or tokenizer state)."""
    if num_proc <= 1 or len(todo) <= 1:
        init_worker(plan, source, tokenizer, str(out_dir))
        try:
            yield from map(tokenize_unit, todo)
        finally:
            reset_worker()
        return
    spec = (str(out_dir / tokenizer.file_name), getattr(tokenizer, "eos_token", None))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(num_proc, len(todo)), init_worker, (plan, source, spec, str(out_dir), os.getpid())) as pool:
        yield from pool.imap_unordered(tokenize_unit, todo)


def prepare_dataset(
    source: Source,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    unit_bytes: int = DEFAULT_UNIT_BYTES,
    num_proc: int | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    part: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    eos_token: str | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    on_unit_done: Callable[[dict], None] | None = None,
) -> dict[str, Any] | None:
    """Tokenize ``source`` into ``out_dir``; returns the meta dict, or None when this part is done
    but other parts are not yet.

    ``tokenizer``: a SentencePiece ``.model``, a ``tokenizer.json`` or a Hugging Face directory (or a
    loaded one). Without a validation split, one document in round(1 / ``val_fraction``) of the
    train documents is held out (``val_fraction=0``: train only). ``extra_meta`` is stored under
    ``meta["extra"]``. ``on_unit_done(record)`` is called after each unit is marked done.
    Running it again resumes; a directory holding another preparation is refused unless
    ``overwrite``.
    """
    tokenizer = load_tokenizer(tokenizer, eos_token)
    part = _check_part(part)
    out_dir = Path(out_dir)
    plan = make_plan(source, tokenizer, unit_bytes=unit_bytes, val_fraction=val_fraction, seed=seed,
                     extra_meta=extra_meta)
    meta, clear = _existing(out_dir, plan, overwrite)
    if meta is not None:
        log.info("%s: already complete", out_dir)
        return meta
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with part_lock(out_dir, part):
        todo: list[tuple[str, int]] = []
        try:
            if clear:
                _clear(out_dir)
            tokenizer.save_to(out_dir)
            write_plan(out_dir, plan)
            done = done_records(out_dir, plan)
            todo = [u for u in part_units(plan, part) if u not in done]
            remove_temporaries(out_dir, plan, todo)
            _work(todo, plan, source, tokenizer, out_dir, num_proc or min(8, os.cpu_count() or 1),
                  progress, on_unit_done)
            return _finish(out_dir, plan)
        except BaseException:
            remove_temporaries(out_dir, plan, todo)
            if created and not any(r["outputs"][s]["num_tokens"] for r in done_records(out_dir, plan).values()
                                   for s in r["outputs"]):
                shutil.rmtree(out_dir, ignore_errors=True)  # nothing of value: leave nothing behind
            raise


def _work(todo, plan, source, tokenizer, out_dir: Path, num_proc: int, progress: bool, on_unit_done) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="unit", desc=f"tokenizing {out_dir.name}", disable=not progress)
    records = _run_units(todo, plan, source, tokenizer, out_dir, num_proc)
    try:
        for record in records:
            write_done(out_dir, record)
            bar.update(1)
            if on_unit_done is not None:
                on_unit_done(record)
    finally:
        records.close()  # on an error: stop the workers now, before their temporaries are removed
        bar.close()


def _finish(out_dir: Path, plan: dict) -> dict | None:
    """Write meta.json when every unit of every part is done (idempotent)."""
    records = done_records(out_dir, plan)
    if len(records) < len(all_units(plan)):
        log.info("%s: this part is done; %s", out_dir, records_summary(records, plan))
        return None
    meta = assemble_meta(plan, records, out_dir)
    atomic.write_json(out_dir / META_NAME, meta)
    return meta


def assemble_meta(plan: dict, records: dict, out_dir: Path) -> dict[str, Any]:
    """meta.json from the plan and every unit's record, shards in unit order."""
    splits = {}
    for out in ("train", "validation"):
        producers = [s for s in plan["splits"] if out in unit_outputs(plan, s)]
        if not producers:
            continue
        parts = [records[(s, i)]["outputs"][out] for s in producers for i in range(len(plan["splits"][s]["units"]))]
        where = plan["splits"][producers[0]]["where"]
        if out not in plan["splits"]:
            where = f"one document in {plan['carve_every']} of {where} (seed {plan['seed']})"
        docs = sum(p["num_documents"] for p in parts)
        if docs == 0:
            hint = ""
            if out not in plan["splits"]:
                hint = (f" ({splits['train']['num_documents']} train documents in {len(parts)} units of about "
                        f"{plan['unit_bytes']} bytes); give validation files, or a larger val_fraction (with "
                        f"overwrite, to redo {out_dir})")
            raise DataError(f"{where}: no non-empty documents{hint}")
        shards = [{"file": p["file"], "num_tokens": p["num_tokens"], "sha256": p["sha256"]} for p in parts if p["file"]]
        splits[out] = {"num_documents": docs, "num_tokens": sum(p["num_tokens"] for p in parts),
                       "max_token_id": max(p["max_token_id"] for p in parts), "shards": shards,
                       "source": _relative_to(where, out_dir)}
    described = dict(plan["source"])
    described["files"] = {k: [_relative_to(f, out_dir) for f in v] for k, v in described["files"].items()}
    lossless = all(r["lossless"] for r in records.values())
    if not lossless:
        log.warning("%s: the tokenizer does not give some documents back exactly (decode(encode(text)) != text)",
                    plan["tokenizer"]["file"])
    return {
        "format": FORMAT, "version": VERSION,
        "dtype": plan["dtype"], "byteorder": "little",
        "tokenizer": dict(plan["tokenizer"]),
        "source": described,
        "splits": splits,
        "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "preparation": {"plan_id": plan["id"], "unit_bytes": plan["unit_bytes"], "units": len(records),
                        "val_fraction": plan["val_fraction"], "seed": plan["seed"], "lossless_sample": lossless},
        "extra": plan["extra"],
    }


def merge_parts(out_dir: str | os.PathLike, part_dirs: list[str | os.PathLike]) -> dict[str, Any]:
    """Join parts prepared into separate directories (``part=(i, N)`` each) into ``out_dir``
    (which may be one of them): checks that they share one plan and together hold every unit,
    hard-links (or copies) their shards, writes meta.json. Returns the meta dict."""
    out_dir = Path(out_dir)
    plans = []
    for d in map(Path, part_dirs):
        p = read_plan(d) if d.is_dir() else None
        if p is None:
            raise DataError(f"{d}: not a (partial) preparation: no {PROGRESS_DIR}/plan.json")
        if plans and p["id"] != plans[0][1]["id"]:
            raise DataError(f"{d}: prepared with another plan than {plans[0][0]} (differs in: "
                            f"{_differs(plans[0][1], p)}); parts must be prepared with the same inputs and settings")
        plans.append((d, p))
    if not plans:
        raise DataError("merge_parts: no part directories given")
    plan = plans[0][1]
    _existing(out_dir, plan, overwrite=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plan(out_dir, plan)
    have = done_records(out_dir, plan)
    for d, _ in plans:
        if d.resolve() == out_dir.resolve():
            continue
        for key, record in done_records(d, plan).items():
            if key in have:
                continue
            for name in unit_files(plan, *key):
                if (d / name).is_file():
                    link_or_copy(d / name, out_dir / name)
            write_done(out_dir, record)
            have[key] = record
        for name in (plan["tokenizer"]["file"], CONFIG_NAME):
            if not (out_dir / name).is_file() and (d / name).is_file():
                link_or_copy(d / name, out_dir / name)
    if len(have) < len(all_units(plan)):
        raise DataError(f"{out_dir}: the parts are incomplete: {records_summary(have, plan)}; run the missing "
                        "parts (or resume them) and merge again")
    meta = _finish(out_dir, plan)
    assert meta is not None
    return meta


def _relative_to(path: str, out_dir: Path) -> str:
    """Paths inside ``out_dir`` are recorded relative to it, so the directory stays valid when moved
    (the bundled dataset is built in a temporary directory and renamed into place)."""
    try:
        return str(Path(path).resolve().relative_to(out_dir.resolve()))
    except (ValueError, OSError):
        return path
